"""Stage 6: move the output root's ``latest.json`` to this run, after the manifest and the failure
check, so consumers that follow the pointer (or the event the flow emits) see complete runs only."""

from prefect import get_run_logger, task

from detectflow.announce import update_latest
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.orchestration import retry_unless_user_error


@task(name="publish_latest", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("publish_latest")
def publish_latest(cfg: RunConfig, manifest: dict) -> dict | None:
    moved = update_latest(cfg.output_uri, manifest)
    logger = get_run_logger()
    if moved:
        logger.info("latest.json under %s now names run %s", cfg.output_uri, cfg.run_id)
    else:
        logger.info("latest.json under %s already names this or a newer run", cfg.output_uri)
    return moved
