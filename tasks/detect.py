"""Stage 2: decode on CPU tasks and detect on an actor pool with Ray Data; stage results."""

import time

import ray
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from detectflow import workarounds
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.orchestration import alive_nodes
from detectflow.pipeline import DetectStats, plan_resources, run_detection
from detectflow.publish import run_paths
from detectflow.stages import Listing

PROGRESS_EVERY_S = 5.0


@task(name="detect")
@output_errors("detect")
def detect(cfg: RunConfig, listing: Listing, spec: ModelSpec) -> DetectStats:
    logger = get_run_logger()
    if not listing.to_detect:  # an incremental run with nothing new: no actors start
        logger.info("nothing to detect: every listed image is already in the table")
        return DetectStats()
    plan = plan_resources(cfg, ray.cluster_resources(), alive_nodes(), listing.to_detect)
    logger.info("resource plan: %s", plan.describe())
    artifact_id = create_progress_artifact(
        progress=0.0, key="detect-progress", description="Images detected (%)"
    )
    last = {"t": 0.0}

    def on_progress(done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if done < total and now - last["t"] < PROGRESS_EVERY_S:
            return
        last["t"] = now
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else float("nan")
        logger.info(
            "detect: %d/%d images (%.0f%%), %.2f images/s, ETA %.0f s",
            done, total, 100 * done / total, rate, eta,
        )
        update_progress_artifact(artifact_id, progress=100.0 * done / total)

    paths = run_paths(cfg.run_uri)
    stats = run_detection(
        cfg, listing.detect_uri, paths["staged"], listing.to_detect, plan, on_progress,
        spec=spec, actor_env=workarounds.actor_runtime_env(),
    )
    if stats.shards_reused:
        logger.info("resumed: reused %d staged shard(s) (%d images); inferred %d images",
                    stats.shards_reused, stats.images_reused, stats.images_inferred)
    logger.info(
        "detected %d boxes on %d images (%d failed) in %.1f s: %.2f images/s",
        stats.detections, stats.images, stats.failed, stats.seconds,
        stats.images / max(stats.seconds, 1e-9),
    )
    return stats
