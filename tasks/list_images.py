"""Stage 1: list the input images (stable order) into listing shards in the run's staging area."""

import time

from prefect import get_run_logger, task

from detectflow import incremental
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.listing import summarise_skipped, write_listing
from detectflow.orchestration import retry_unless_user_error
from detectflow.publish import run_paths
from detectflow.stages import Listing


@task(name="list_images", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
@output_errors("list_images")
def list_images(cfg: RunConfig, spec: ModelSpec) -> Listing:
    start = time.perf_counter()
    paths = run_paths(cfg.run_uri)
    listing_uri = paths["listing"]
    counts = write_listing(cfg.input_uri, listing_uri, cfg.extensions, cfg.shard_size, cfg.limit)
    log = get_run_logger()
    log.info(
        "%s %d images in %d shard(s) from %s", "reused the listing of" if counts["reused"]
        else "listed", counts["images"], counts["shards"], cfg.input_uri,
    )
    if said := summarise_skipped(counts["skipped"]):
        log.info("skipped under %s: %s", cfg.input_uri, said)
    todo = decided = None
    if cfg.incremental:  # what earlier runs detected with this model is not detected again
        todo = paths["todo"]
        decided = incremental.plan(listing_uri, todo, cfg.output_uri, spec.fingerprint(cfg))
        log.info("incremental: %d new or changed images to detect; %d detected by %d earlier "
                 "run(s) are skipped; %d in the table are no longer listed", decided["inferred"],
                 decided["skipped"], len(decided["runs"]), decided["vanished"])
    return Listing(listing_uri, seconds=time.perf_counter() - start, todo_uri=todo,
                   incremental=decided, **counts)
