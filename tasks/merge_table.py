"""Stage 7: merge the published run into ``<output>/table/`` (Delta Lake), once per run id.

It runs after the manifest (the run's own commit point) and the health checks, in the flow
process, so a re-run of a published run id completes a merge that a crash interrupted."""

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from detectflow import failpoints, storage
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.orchestration import retry_unless_user_error
from detectflow.schema import TABLE_SCHEMA
from detectflow.stages import Tabled
from detectflow.table import merge_run, table_uri


@task(name="merge_table", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("merge_table")
def merge_table(cfg: RunConfig, manifest: dict) -> Tabled:
    failpoints.hit("before-merge")  # crash tests: the run is published, the table not yet
    table = table_uri(cfg.output_uri)
    files = [storage.join(cfg.run_uri, f["path"]) for f in manifest["output"]["files"]]
    rows = pa.RecordBatchReader.from_batches(
        TABLE_SCHEMA, _batches(files, manifest["model"]["fingerprint"]))
    merged = merge_run(table, rows, cfg.run_id)
    log = get_run_logger()
    if merged.merged:
        log.info("merged %d rows into %s (version %d)", merged.rows, table, merged.version)
    elif merged.version is not None:
        log.info("%s already holds run %s (version %d)", table, cfg.run_id, merged.version)
    return Tabled(table, merged.version, merged.merged, merged.rows)


def _batches(files: list[str], fingerprint: str):
    """The run's published rows with the fingerprint column, a file at a time."""
    for uri in files:
        fs, path = storage.arrow_fs(uri)
        with pq.ParquetFile(path, filesystem=fs) as parquet:
            for batch in parquet.iter_batches():
                table = pa.Table.from_batches([batch])
                if "image_version" not in table.column_names:  # published before versions
                    table = table.append_column("image_version",
                                                pa.nulls(table.num_rows, pa.string()))
                table = table.append_column(
                    "fingerprint", pa.array([fingerprint] * table.num_rows, pa.string()))
                yield from table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA).to_batches()
