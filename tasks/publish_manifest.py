"""Stage 5: write the manifest last (the commit point), then tidy staging and link it in Prefect."""

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact

from detectflow import failpoints, storage
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.orchestration import retry_unless_user_error
from detectflow.pipeline import DetectStats
from detectflow.publish import build_manifest, run_paths, write_manifest
from detectflow.stages import Exports, Listing, Sample, Scored, Written


@task(name="publish_manifest", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("publish_manifest")
def publish_manifest(
    cfg: RunConfig, spec: ModelSpec, listing: Listing, detected: DetectStats,
    sample: Sample, written: Written, scored: Scored | None = None,
    exported: Exports | None = None,
) -> dict:
    start = time.perf_counter()
    paths = run_paths(cfg.run_uri)
    stage_seconds = {
        "list_images": listing.seconds,
        "detect": detected.seconds,
        "validate_sample": sample.seconds,
        "write_parquet": written.seconds,
        **({"evaluate": scored.seconds} if scored else {}),
        **({"export": exported.seconds} if exported else {}),
    }
    manifest = build_manifest(
        run_id=cfg.run_id,
        run_uri=cfg.run_uri,
        parameters=cfg.model_dump(mode="json"),
        weights=spec.weights.as_dict(),
        classes=spec.as_dict(),
        fingerprint=spec.fingerprint(cfg),
        exports=exported.formats if exported else [],
        evaluation={**scored.evaluation, "plots": scored.plots} if scored else None,
        input_count=listing.images,
        input_skipped=listing.skipped,
        stats=detected,
        incremental=listing.incremental,
        files=written.files,
        samples=sample.samples,
        stage_seconds=stage_seconds,
    )
    failpoints.hit("before-manifest")  # crash tests: outputs written, no commit point yet
    manifest = write_manifest(cfg.run_uri, manifest)
    storage.remove(paths["staging"])
    uri = paths["manifest"]
    link = uri if "://" in uri else f"file://{uri}"
    create_link_artifact(key="run-manifest", link=link, link_text=f"manifest of run {cfg.run_id}",
                         description=f"{manifest['counts']['images']} images, "
                                     f"{manifest['counts']['detections']} detections")
    get_run_logger().info("published %s", uri)
    return {**manifest, "manifest_uri": uri, "publish_seconds": time.perf_counter() - start}
