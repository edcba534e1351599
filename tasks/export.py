"""Stage 5, with ``exports``: the published rows in labelling and training formats, written under
``<run>/exports/<format>/`` before the manifest, which then lists their files."""

import time

from prefect import get_run_logger, task

from detectflow import storage
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.exports import export as write_export
from detectflow.orchestration import retry_unless_user_error
from detectflow.stages import Exports, Written


@task(name="export", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("export")
def export(cfg: RunConfig, written: Written, spec: ModelSpec) -> Exports:
    start = time.perf_counter()
    logger = get_run_logger()
    parquet = [storage.join(cfg.run_uri, f["path"]) for f in written.files]
    version = spec.fingerprint(cfg)
    done = []
    for fmt in cfg.exports:
        folder = f"exports/{fmt}"
        out = write_export(parquet, storage.join(cfg.run_uri, folder), fmt,
                           categories=spec.categories, input_uri=cfg.input_uri,
                           model_version=version)
        done.append({"format": fmt, "images": out.images, "boxes": out.boxes,
                     "skipped_errors": out.skipped_errors, "renamed": out.renamed,
                     "unnamed_boxes": out.unnamed_boxes,
                     "files": [{**f, "path": f"{folder}/{f['path']}"} for f in out.files]})
        logger.info("exported %d images (%d boxes) as %s to %s/", out.images, out.boxes, fmt,
                    folder)
    return Exports(done, time.perf_counter() - start)
