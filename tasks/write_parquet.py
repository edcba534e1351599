"""Stage 4: publish the validated shards as the run's Parquet dataset (atomic, deterministic)."""

import time

from prefect import get_run_logger, task

from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.orchestration import retry_unless_user_error
from detectflow.pipeline import DetectStats
from detectflow.publish import publish_shards, run_paths
from detectflow.stages import Written


@task(name="write_parquet", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("write_parquet")
def write_parquet(cfg: RunConfig, detected: DetectStats, spec: ModelSpec) -> Written:
    start = time.perf_counter()
    target = run_paths(cfg.run_uri)["detections"]
    metadata = {"detectflow.run_id": cfg.run_id, "detectflow.model": cfg.model,
                "detectflow.weights_sha256": spec.weights.sha256}
    files = publish_shards(detected.staged, target, metadata)
    rows = sum(f["rows"] for f in files)
    get_run_logger().info("wrote %d rows in %d Parquet file(s) to %s", rows, len(files), target)
    return Written(files, rows, time.perf_counter() - start)
