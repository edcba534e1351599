"""One Delta Lake table of every detection across runs (``<output>/table/``).

Each run's rows are merged on the key (``image_uri``, ``fingerprint``): an image's latest row for
a model fingerprint replaces the earlier one, rows of other fingerprints stay, so two models can
be compared. Every commit of a run carries its run id twice: as a Delta application transaction
(``txn``, which makes the merge idempotent: a re-run after a crash merges once) and in the commit
info (so ``DeltaTable.history()`` says which run wrote which version).

Delta has no fixed-size list type: ``boxes`` is stored as ``list<list<float>>`` and cast back to
:data:`~detectflow.schema.TABLE_SCHEMA` on read. delta-rs runs on a tokio runtime that panics in a
forked child: processes that use this module after their parent did must be spawned, not forked.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError

from detectflow import storage
from detectflow.errors import OutputError
from detectflow.schema import TABLE_SCHEMA

log = logging.getLogger(__name__)

TABLE = "table"
PARTITION = "fingerprint"
APP_PREFIX = "detectflow-run:"
RUN_ID_KEY = "detectflow.run_id"
PREDICATE = "t.image_uri = s.image_uri AND t.fingerprint = s.fingerprint"
# A commit conflict means another run committed first; each retry re-reads the table and re-runs
# the merge, so a handful of attempts covers as many runs publishing at the same moment.
MAX_ATTEMPTS = 8
BACKOFF_S = 0.2
# Fail in seconds, not minutes, when the endpoint is unreachable (as storage.py does for s3fs).
_S3_CLIENT = {"connect_timeout": "5s", "timeout": "60s", "max_retries": "3",
              "retry_timeout": "60s"}
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_run` did: the table version holding the run's rows (when known), whether
    this call committed them (False: the run id was already in the table, or there were no rows),
    how many rows it merged and how many commit attempts it took."""

    version: int | None
    merged: bool
    rows: int
    attempts: int


def table_uri(output_uri: str) -> str:
    return f"{output_uri.rstrip('/')}/{TABLE}"


def delta_options(uri: str) -> dict[str, str]:
    """``storage_options`` for delta-rs, which uses neither boto3 nor s3fs: the endpoint that
    :func:`storage.endpoint_url` chose, the region and client timeouts. Credentials are left to
    delta-rs, which reads the standard AWS variables itself, so they are never passed around."""
    if storage.is_local(uri):
        return {}
    options = dict(_S3_CLIENT)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = storage.endpoint_url()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        region = region or "us-east-1"  # S3-compatible stores sign with some region
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if region:
        options["AWS_REGION"] = region
    return options


def merged_version(table: str, run_id: str) -> int | None:
    """The ``txn`` version recorded for ``run_id`` (1 once its rows are in), None if it never
    merged or there is no table."""
    dt = open_table(table, delta_options(table))
    return None if dt is None else _txn(table, dt, _app_id(run_id))


def partition_files(table: str, fingerprint: str, version: int | None = None) -> list[str]:
    """The data files that hold ``fingerprint``'s rows at ``version`` (default: the latest), as
    URIs (local paths for a local table); boxes in them are plain ``list<list<float>>``."""
    def files() -> list[str]:
        dt = DeltaTable(location(table), version=version, storage_options=delta_options(table))
        uris = dt.file_uris(partition_filters=[(PARTITION, "=", fingerprint)])
        return [u.removeprefix("file://") if storage.is_local(table) else u for u in uris]

    return _guard(table, files)


def read_table(table: str, fingerprint: str | None = None, version: int | None = None) -> pa.Table:
    """The table (at ``version``: time travel), optionally one fingerprint's partition, with
    :data:`TABLE_SCHEMA`'s types."""
    def read() -> pa.Table:
        dt = DeltaTable(location(table), version=version, storage_options=delta_options(table))
        parts = None if fingerprint is None else [(PARTITION, "=", fingerprint)]
        return dt.to_pyarrow_table(partitions=parts)

    return _conform(_guard(table, read))


def merge_run(table: str, rows: pa.Table | pa.RecordBatchReader, run_id: str, *,
              maintain_every: int = 10) -> Merged:
    """Merge one run's rows (:data:`TABLE_SCHEMA` columns) into ``table``, once per run id.

    The first run creates the table. A commit conflict (another run committed since this one
    read the table) re-reads the table and merges again, after a short random pause so that two
    runs do not collide again in step. A ``RecordBatchReader`` is streamed to a local temporary
    Parquet file first: a retry needs the rows again, and a reader can be read only once.

    Every ``maintain_every`` table versions (0: never) the run that commits such a version
    compacts the table and writes a checkpoint: each merge adds files (and rewrites the files
    whose rows it replaced) and one log entry, so readers would otherwise open ever more small
    files and replay ever more JSON commits. Doing it every few versions keeps both bounded while
    the rewrite is paid once for many runs, and rarely enough that a compaction seldom collides
    with a concurrent merge (the loser retries; a failed compaction only waits for the next turn).
    """
    options = delta_options(table)
    app_id = _app_id(run_id)
    commit = CommitProperties(app_transactions=[Transaction(app_id=app_id, version=1)],
                              custom_metadata={RUN_ID_KEY: run_id})
    with _replayable(rows) as (source, fingerprints):
        if not fingerprints:  # no rows: a merge would commit nothing, not even the run id
            return Merged(None, False, 0, 0)
        predicate = PREDICATE
        if len(fingerprints) == 1:  # only that partition is read: no conflict with other models'
            predicate += f" AND t.{PARTITION} = '{_quote(next(iter(fingerprints)))}'"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            dt = open_table(table, options) or _create(table, options)
            # Checked again before each retry: the conflicting commit may be this run's own.
            if _txn(table, dt, app_id) is not None:
                return Merged(_run_version(dt, run_id), False, 0, attempt)
            try:
                metrics = (dt.merge(source(), predicate, source_alias="s", target_alias="t",
                                    commit_properties=commit)
                           .when_matched_update_all().when_not_matched_insert_all().execute())
            except CommitFailedError as exc:
                if attempt == MAX_ATTEMPTS:
                    raise OutputError(f"detections table {table}: run {run_id} could not commit "
                                      f"after {attempt} attempts: {_one_line(exc)}") from None
                log.info("detections table %s: commit conflict, retrying run %s", table, run_id)
                time.sleep(BACKOFF_S * attempt * (0.5 + random.random()))
                continue
            except (DeltaError, OSError) as exc:
                raise OutputError(f"detections table {table}: {_one_line(exc)}") from None
            version = dt.version()
            break
    if maintain_every > 0 and version % maintain_every == 0:
        _maintain(table, options)
    return Merged(version, True, int(metrics.get("num_source_rows", 0)), attempt)


def _maintain(table: str, options: dict[str, str]) -> None:
    """Compact, then checkpoint the latest version; a failure only postpones either (the rows
    are in)."""
    for step in ("compact", "checkpoint"):
        try:
            dt = DeltaTable(location(table), storage_options=options)
            dt.optimize.compact() if step == "compact" else dt.create_checkpoint()
        except (DeltaError, OSError) as exc:
            log.warning("detections table %s: %s postponed: %s", table, step, _one_line(exc))


def _txn(table: str, dt: DeltaTable, app_id: str) -> int | None:
    return _guard(table, lambda: dt.transaction_version(app_id))


def _app_id(run_id: str) -> str:
    return f"{APP_PREFIX}{run_id}"


def _quote(text: str) -> str:
    return text.replace("'", "''")


def location(table: str) -> str:
    """What delta-rs takes: a local path (absolute: its log stores the location) or a URI."""
    if table.startswith("file://"):
        return table
    return os.path.abspath(table) if storage.is_local(table) else table


def open_table(table: str, options: dict[str, str]) -> DeltaTable | None:
    def load() -> DeltaTable | None:
        if not DeltaTable.is_deltatable(location(table), storage_options=options):
            return None
        return DeltaTable(location(table), storage_options=options)

    return _guard(table, load)


def _create(table: str, options: dict[str, str]) -> DeltaTable:
    """Create the empty table. Two first runs may race: version 0 is written create-only, so one
    of them wins and the other finds the table there and merges into it."""
    if storage.is_local(table):
        os.makedirs(location(table).removeprefix("file://"), exist_ok=True)
    try:
        # No retry: delta-rs would commit the losing CREATE again as version 1 (a new table id).
        return DeltaTable.create(location(table), TABLE_SCHEMA, mode="ignore",
                                 partition_by=[PARTITION], storage_options=options,
                                 commit_properties=CommitProperties(max_commit_retries=0))
    except (DeltaError, OSError) as exc:
        dt = open_table(table, options)
        if dt is None:
            raise OutputError(f"detections table {table}: {_one_line(exc)}") from None
        return dt


def _run_version(dt: DeltaTable, run_id: str) -> int | None:
    """The version whose commit carries ``run_id`` (None once its log entry has expired)."""
    for commit in dt.history():
        if commit.get(RUN_ID_KEY) == run_id:
            return commit["version"]
    return None


@contextmanager
def _replayable(rows: pa.Table | pa.RecordBatchReader
                ) -> Iterator[tuple[Callable[[], pa.RecordBatchReader], set[str]]]:
    """A function that gives the rows again as a fresh reader each time, and their
    fingerprints. A table is already in memory; a reader is spooled to a temporary file."""
    if isinstance(rows, pa.Table):
        table = _conform(rows)
        yield (lambda: pa.RecordBatchReader.from_batches(table.schema, table.to_batches()),
               set(pc.unique(table[PARTITION]).to_pylist()))
        return
    fingerprints: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="detectflow-table-") as tmp:
        path = os.path.join(tmp, "rows.parquet")
        with pq.ParquetWriter(path, TABLE_SCHEMA) as writer:
            for batch in rows:
                part = _conform(pa.Table.from_batches([batch]))
                fingerprints.update(pc.unique(part[PARTITION]).to_pylist())
                writer.write_table(part)

        def reread() -> pa.RecordBatchReader:
            return pa.RecordBatchReader.from_batches(TABLE_SCHEMA,
                                                     pq.ParquetFile(path).iter_batches())

        yield reread, fingerprints


def _conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly :data:`TABLE_SCHEMA`'s columns, order and types."""
    missing = [name for name in TABLE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"detections table rows lack columns: {', '.join(missing)}")
    return table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA)


def _guard(table: str, fn: Callable[[], object]):
    try:
        return fn()
    except (DeltaError, OSError) as exc:
        raise OutputError(f"detections table {table}: {_one_line(exc)}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QUERY = re.compile(r"(https?://[^\s?]*)\?\S*")
_CODE = re.compile(r"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


def _one_line(exc: BaseException) -> str:
    """delta-rs's multi-line error as one readable line without secrets: the store's error code
    and message, or the endpoint it could not reach; credentials are redacted and URL query
    strings (where a presigned request carries its signature) dropped."""
    text = _QUERY.sub(r"\1", _ANSI.sub("", str(exc)))
    parts = [part.strip(" ↳") for part in text.splitlines() if part.strip(" ↳")]
    code, message = _CODE.search(text), _MESSAGE.search(text)
    if code:  # S3's XML error body: the code and message say it all
        text = f"{code[1]}: {message[1]}" if message else code[1]
    elif "error sending request" in text or "tcp connect error" in text:
        text = f"cannot reach the storage endpoint {storage.endpoint_url() or '(AWS default)'}"
        text += f" ({parts[-1]})" if parts else ""
    else:
        text = " ".join(parts)
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return (text[:300] + "…") if len(text) > 300 else text or type(exc).__name__
