"""Stage 1: list the input images (stable order) into listing shards in the run's staging area."""

import time

from prefect import get_run_logger, task

from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.listing import summarise_skipped, write_listing
from detectflow.orchestration import retry_unless_user_error
from detectflow.publish import run_paths
from detectflow.stages import Listing


@task(name="list_images", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
@output_errors("list_images")
def list_images(cfg: RunConfig) -> Listing:
    start = time.perf_counter()
    listing_uri = run_paths(cfg.run_uri)["listing"]
    counts = write_listing(cfg.input_uri, listing_uri, cfg.extensions, cfg.shard_size, cfg.limit)
    log = get_run_logger()
    log.info(
        "%s %d images in %d shard(s) from %s", "reused the listing of" if counts["reused"]
        else "listed", counts["images"], counts["shards"], cfg.input_uri,
    )
    if said := summarise_skipped(counts["skipped"]):
        log.info("skipped under %s: %s", cfg.input_uri, said)
    return Listing(listing_uri, seconds=time.perf_counter() - start, **counts)
