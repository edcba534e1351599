"""Which listed images an incremental run must detect, shard by shard.

An image is skipped when the detections table (``<output>/table/``, see :mod:`detectflow.table`)
already holds its row for this model fingerprint, computed from the same image version (size and
ETag, or size and mtime), without an error. Everything else is detected: new images, changed
ones, and those that failed before.

Neither the listing nor the table is ever held whole. The listing shards are in key order
(``image_uri`` ascending across shards), so each shard owns a key range: from its first key to the
next shard's first key (the first range opens at the lowest key, the last is open-ended), and
every table key falls in exactly one range. The table's files have no such order: a merge writes
rows in any order, and z-ordering a string column orders it by its first bytes only (which the
URIs under one prefix share), so every file's ``image_uri`` statistics span the whole key range
and a range filter per shard would read the whole partition once per shard. Instead the
fingerprint's partition (chosen by its partition value) is read once, cut into runs that are
sorted in memory and spilled to a local Arrow file, and the runs are merged back in key order
alongside the listing. Memory stays that of a run being sorted, the rows being merged and a shard,
whatever the sizes of the listing and the table.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import DeltaTable

from detectflow import listing, storage
from detectflow import table as tables

log = logging.getLogger(__name__)

KEY = "image_uri"
VERSION = "image_version"  # the listing's image version, and the one a table row came from
RUN = "run_id"
TABLE_COLUMNS = [KEY, VERSION, "error", RUN]
# What is spilled of a table row: its key, the version it was computed from when it counts as
# done (no error), else null, and the run that wrote it.
DONE = "done"
_SPILL = pa.schema([(KEY, pa.string()), (DONE, pa.string()), (RUN, pa.string())])
# Rows sorted in memory at once: the peak of the decision. Fewer, longer runs mean fewer cursors
# to advance when they are merged back.
RUN_ROWS = 1 << 17
# Rows per spilled batch, the unit a run is read back in.
SPILL_BATCH_ROWS = 1 << 10
# Rows the runs being merged hold together (each at least a batch): the larger, the fewer the
# passes over all runs.
MERGE_ROWS = 1 << 16
# Table rows in one range checked against the shard at once (a range of keys no longer listed
# can hold any number of them).
CHECK_ROWS = 1 << 16
# Table files are read a buffer at a time: whole column chunks of large row groups, read through
# delta-rs's filesystem as Python bytes, leave the process's peak RSS far higher.
READ_BUFFER = 1 << 20
READ_ROWS = 1 << 13
# Listing shards read ahead of the decision (object storage answers in tens of milliseconds).
READ_WORKERS = 4
READ_AHEAD = 8
# Joins an image's key to its version; neither an S3 key nor a path can contain it.
_SEP = "\x00"


@dataclass(frozen=True)
class ShardDecision:
    """One listing shard's decision (``shard``: its position in the listing)."""

    shard: int
    infer: pa.Table  # the listing rows to detect (new, changed, or failed before), listing columns
    skipped: int  # rows already in the table for this fingerprint and version, without error
    vanished: int  # table keys (this fingerprint) in this shard's key range no longer listed
    runs: dict[str, int] | None = None  # run id -> images skipped because that run detected them


def decide(listing_uris: Sequence[str], table: str | DeltaTable | None, fingerprint: str, *,
           storage_options: dict | None = None,
           version: int | None = None) -> Iterator[ShardDecision]:
    """Decide each listing shard in order against the table's rows for ``fingerprint``.

    ``table`` is the table's location (read at ``version``, default the latest), or the table
    already opened (its log is read once per run: a nightly table's log grows), or None when
    there is none yet."""
    if not listing_uris:
        return
    shards = storage.map_concurrently(_read_shard, listing_uris, workers=READ_WORKERS,
                                      held=READ_AHEAD)
    if isinstance(table, str):
        table = (DeltaTable(table, version=version, storage_options=storage_options)
                 if DeltaTable.is_deltatable(table, storage_options=storage_options) else None)
    if table is None:
        # First run: nothing to skip, and no table to read.
        for k, shard in enumerate(shards):
            yield ShardDecision(k, shard, 0, 0, {})
        return
    dataset = table.to_pyarrow_dataset(file_pruning_predicate=[("fingerprint", "=", fingerprint)])
    with tempfile.TemporaryDirectory(prefix="detectflow-skips-") as spill:
        path = os.path.join(spill, "runs.arrow")
        runs = _spill_runs(dataset, path)
        with pa.OSFile(path) as source:
            reader = pa.ipc.open_file(source)
            table_rows = _Cursor(_merged(reader, runs))
            yield from _join(_ranges(shards), table_rows)


def _read_shard(uri: str) -> pa.Table:
    fs, path = storage.arrow_fs(uri)
    # ParquetFile: a third of read_table's cost on a small file (no dataset machinery).
    with pq.ParquetFile(path, filesystem=fs) as shard:
        return shard.read()


def _ranges(shards: Iterator[pa.Table]) -> Iterator[tuple[int, pa.Table, str | None]]:
    """Each shard with the end of its key range (the next non-empty shard's first key, None for
    the last), checking the key order the ranges rely on."""
    waiting: list[tuple[int, pa.Table]] = []
    last: str | None = None
    for k, shard in enumerate(shards):
        waiting.append((k, shard))
        if not shard.num_rows:
            continue  # an empty shard's range is empty: it ends where the next one starts
        keys = shard[KEY]
        first = keys[0].as_py()
        if (last is not None and first <= last) or (
                len(keys) > 1 and not pc.all(pc.greater(keys[1:], keys[:-1])).as_py()):
            raise ValueError(f"listing shard {k} is not in key order ({KEY} ascending across "
                             "shards, without repeats)")
        last = keys[-1].as_py()
        for item in waiting[:-1]:
            yield (*item, first)
        waiting = waiting[-1:]
    for item in waiting:
        yield (*item, None)


def _spill_runs(dataset: ds.Dataset, path: str) -> list[_Run]:
    """Read the partition once, in runs of ``RUN_ROWS`` sorted by key, written one after the
    other to an Arrow file at ``path``."""
    runs: list[_Run] = []
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, _SPILL, options=options) as writer:
        held: list[pa.RecordBatch] = []
        rows = written = 0
        for batch in itertools.chain(_partition_batches(dataset), [None]):
            if batch is not None:
                held.append(batch)
                rows += batch.num_rows
            if rows and (batch is None or rows >= RUN_ROWS):
                run = pa.Table.from_batches(held, _SPILL)
                keys = run[KEY]
                if not pc.all(pc.greater_equal(keys[1:], keys[:-1])).as_py():
                    run = run.sort_by(KEY)
                # Small batches: the merge reads each run a little at a time.
                batches = 0
                for part in run.to_batches(max_chunksize=SPILL_BATCH_ROWS):
                    writer.write_batch(part)
                    batches += 1
                runs.append(_Run(range(written, written + batches), run[KEY][0].as_py()))
                written += batches
                held, rows = [], 0
    return runs


def _partition_batches(dataset: ds.Dataset) -> Iterator[pa.RecordBatch]:
    """The partition's keys and done versions, batch by batch. Each file is read as a stream of
    batches: the dataset scanner would decode whole row groups, and delta-rs writes them
    large."""
    for fragment in dataset.get_fragments():
        with fragment.filesystem.open_input_file(fragment.path) as source:
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER)
            for batch in parquet.iter_batches(batch_size=min(RUN_ROWS, READ_ROWS),
                                              columns=TABLE_COLUMNS):
                key, version, error, run = (batch.column(name).cast(pa.string())
                                            for name in TABLE_COLUMNS)
                done = pc.if_else(pc.is_null(error), version, pa.scalar(None, pa.string()))
                yield pa.record_batch([key, done, run], schema=_SPILL)


class _Run:
    """A sorted run in the spill file, read a few batches at a time."""

    def __init__(self, batches: range, first: str):
        self.batches = batches
        self.first = first
        self.next = 0
        self.rows = _SPILL.empty_table()

    @property
    def exhausted(self) -> bool:
        return not self.rows.num_rows and self.next == len(self.batches)

    @property
    def last(self) -> str:
        return self.rows.column(0)[-1].as_py()

    def fill(self, reader: pa.ipc.RecordBatchFileReader, rows: int) -> None:
        """Read batches until ``rows`` rows are held, or the run ends."""
        loaded = []
        held = self.rows.num_rows
        while held < rows and self.next < len(self.batches):
            loaded.append(reader.get_batch(self.batches[self.next]))
            held += loaded[-1].num_rows
            self.next += 1
        if loaded:
            self.rows = pa.concat_tables([self.rows, pa.Table.from_batches(loaded, _SPILL)])

    def take_upto(self, frontier: str) -> pa.Table:
        """Remove and return the held rows whose key is at most ``frontier``."""
        n = _count_below(self.rows.column(0), frontier, inclusive=True)
        taken, self.rows = self.rows.slice(0, n), self.rows.slice(n)
        return taken


def _merged(reader: pa.ipc.RecordBatchFileReader, runs: list[_Run]) -> Iterator[pa.Table]:
    """The runs merged into blocks in key order.

    Before each step every run being merged holds its share of ``MERGE_ROWS`` rows; the step
    takes from each the rows up to the smallest of their last keys, so each gives about its
    share: a step costs one pass over the runs for about ``MERGE_ROWS`` rows. A run is read
    once the merge reaches its first key: runs that do not overlap (a table written in key
    order) are read one after the other.
    """
    share = max(SPILL_BATCH_ROWS, MERGE_ROWS // max(1, len(runs)))
    pending = deque(sorted(runs, key=lambda run: run.first))
    active: list[_Run] = []
    while active or pending:
        if not active:
            active.append(pending.popleft())
        for run in active:
            run.fill(reader, share)
        frontier = min(run.last for run in active)
        while pending and pending[0].first <= frontier:
            run = pending.popleft()
            run.fill(reader, share)
            active.append(run)
            frontier = min(frontier, run.last)
        parts = [part for run in active if (part := run.take_upto(frontier)).num_rows]
        active = [run for run in active if not run.exhausted]
        block = pa.concat_tables(parts)
        yield block.sort_by(KEY) if len(parts) > 1 else block


class _Cursor:
    """Table rows in key order, handed out by key range."""

    def __init__(self, blocks: Iterator[pa.Table]):
        self.blocks = blocks
        self.block: pa.Table | None = None

    def below(self, end: str | None) -> Iterator[pa.Table]:
        """The next rows whose key is below ``end`` (all that are left when None)."""
        while True:
            if self.block is None or not self.block.num_rows:
                self.block = next(self.blocks, None)
                if self.block is None:
                    return
            n = (self.block.num_rows if end is None
                 else _count_below(self.block.column(KEY), end, inclusive=False))
            if n:
                yield self.block.slice(0, n)
            if n < self.block.num_rows:
                self.block = self.block.slice(n)
                return
            self.block = None


def _join(ranges: Iterator[tuple[int, pa.Table, str | None]],
          table_rows: _Cursor) -> Iterator[ShardDecision]:
    for k, shard, end in ranges:
        listed = shard[KEY].cast(pa.string()).combine_chunks()
        if VERSION in shard.column_names:
            versions = shard[VERSION].cast(pa.string())
            wanted = pc.binary_join_element_wise(listed, versions, _SEP)
        else:  # a listing without versions proves no image unchanged
            wanted = pa.nulls(shard.num_rows, pa.string())
        done: list[pa.Array] = []
        runs: list[pa.Array] = []
        vanished = 0
        held: list[pa.Table] = []
        rows = 0
        for part in table_rows.below(end):
            held.append(part)
            rows += part.num_rows
            if rows >= CHECK_ROWS:
                vanished += _check(pa.concat_tables(held), listed, done, runs)
                held, rows = [], 0
        if held:
            vanished += _check(pa.concat_tables(held), listed, done, runs)
        skipped, infer, relied = 0, shard, {}
        if done:
            # skip_nulls: a listing row without a version matches nothing.
            found = pc.index_in(wanted, value_set=pa.concat_arrays(done), skip_nulls=True)
            skip = pc.is_valid(found)
            skipped = pc.sum(skip).as_py() or 0
            if skipped:
                infer = shard.filter(pc.invert(skip))
                by = pc.value_counts(pc.take(pa.concat_arrays(runs), found.drop_null()))
                relied = {item["values"]: item["counts"] for item in by.to_pylist()}
        yield ShardDecision(k, infer, skipped, vanished, relied)


def _check(rows: pa.Table, listed: pa.Array, done: list[pa.Array], runs: list[pa.Array]) -> int:
    """Count the rows no longer listed; add every row's key and done version (null when not
    done), and the run that wrote it."""
    is_listed = pc.is_in(rows[KEY], value_set=listed)
    done.append(pc.binary_join_element_wise(rows[KEY], rows[DONE], _SEP).combine_chunks())
    runs.append(rows[RUN].combine_chunks())
    return rows.num_rows - (pc.sum(is_listed).as_py() or 0)


def _count_below(keys: pa.Array | pa.ChunkedArray, bound: str, *, inclusive: bool) -> int:
    """How many of the sorted ``keys`` are below ``bound`` (or equal to it, when inclusive)."""
    if not len(keys):
        return 0
    last = keys[-1].as_py()
    if last < bound or (inclusive and last == bound):
        return len(keys)
    search = bisect.bisect_right if inclusive else bisect.bisect_left
    return search(keys, bound, key=lambda scalar: scalar.as_py())


def plan(listing_uri: str, todo_uri: str, output_uri: str, fingerprint: str) -> dict:
    """Write the listing shards an incremental run must detect to ``todo_uri`` (a listing, with
    its index, that holds only those rows: shard ``k`` keeps its number and its rows their
    ``index``), and return the manifest's ``incremental`` section.

    Like the listing, the plan of a run id is fixed once written: a re-run of the run id reuses
    it, so staged detections keep meaning the same images even if the table moved meanwhile.
    """
    source = listing.read_index(listing_uri)
    key = {"listing": [f["sha256"] for f in source["files"]], "fingerprint": fingerprint}
    index = listing.read_index(todo_uri)
    if listing.reusable(index, key) and "incremental" in index:
        return index["incremental"]
    storage.remove(listing.index_uri(todo_uri))
    storage.remove(todo_uri)
    table = tables.table_uri(output_uri)
    options = tables.delta_options(table)
    dt = tables.open_table(table, options)
    version = None if dt is None else dt.version()
    uris = [f["uri"] for f in source["files"]]
    files: list[dict] = []
    summary = {"listed": source["images"], "skipped": 0, "inferred": 0, "vanished": 0,
               "table": table, "table_version": version, "runs": {}}
    runs: dict[str, int] = {}

    def keep(k: int, rows: pa.Table) -> None:
        summary["inferred"] += rows.num_rows
        if rows.num_rows:
            uri = storage.join(todo_uri, f"shard-{k:05d}.parquet")
            info = storage.write_parquet(uri, rows)
            files.append({"shard": k, "uri": uri, "rows": rows.num_rows, "sha256": info["sha256"]})

    decided = 0
    try:
        for d in decide(uris, dt, fingerprint):
            keep(d.shard, d.infer)
            summary["skipped"] += d.skipped
            summary["vanished"] += d.vanished
            for run, n in (d.runs or {}).items():
                runs[run] = runs.get(run, 0) + n
            decided += 1
    except ValueError as exc:
        # Only a local name that is not UTF-8 (listed as a file:// URI) breaks the key order:
        # the rest of the listing is detected, never skipped on a guess.
        log.warning("incremental: %s; detecting the %d remaining shard(s) in full", exc,
                    len(uris) - decided)
        for k in range(decided, len(uris)):
            keep(k, _read_shard(uris[k]))
    summary["runs"] = dict(sorted(runs.items()))
    index = {"key": key, "images": summary["inferred"], "files": files, "skipped": {},
             "incremental": summary}
    storage.atomic_write_bytes(listing.index_uri(todo_uri), json.dumps(index).encode())
    return summary
