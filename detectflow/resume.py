"""Staged shards that survive a crash, so re-running a run id computes only what is missing.

Each staged shard ``shard-NNNNN.parquet`` is written atomically, then its sidecar
``shard-NNNNN.json``: rows, sha256, the sha256 of the listing shard it came from and a fingerprint
of the settings that shape detections. A re-run reuses a shard only when all of these still match,
so a half-written, corrupted or stale shard (other listing, model, weights or threshold) is
computed again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from detectflow import storage


def staged_uri(staging_uri: str, shard: int, suffix: str = "parquet") -> str:
    return storage.join(staging_uri, f"shard-{shard:05d}.{suffix}")


def write_staged(
    staging_uri: str, shard: int, table: pa.Table, listing_sha256: str, key: str
) -> dict[str, Any]:
    """Write the shard, then its sidecar (the sidecar is what makes the shard reusable)."""
    uri = staged_uri(staging_uri, shard)
    entry = {"shard": shard, "uri": uri, "rows": table.num_rows,
             **storage.write_parquet(uri, table)}
    sidecar = {**entry, "listing_sha256": listing_sha256, "fingerprint": key}
    storage.atomic_write_bytes(staged_uri(staging_uri, shard, "json"), json.dumps(sidecar).encode())
    return entry


_SIDECAR = re.compile(r"shard-(\d{5,})\.json")


def staged_shards(staging_uri: str) -> set[int]:
    """The shards that have a sidecar in ``staging_uri``, from one listing of the folder. Only
    those can be reused; asking for every shard's sidecar instead costs a fresh run of 10^7
    images 10^4 requests for objects that do not exist before its first image."""
    fs, path = storage.get_fs(staging_uri)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for name in names
            if (m := _SIDECAR.fullmatch(name.rstrip("/").rsplit("/", 1)[-1]))}


def load_staged(
    staging_uri: str, shard: int, rows: int, listing_sha256: str, key: str
) -> tuple[dict[str, Any], pa.Table] | None:
    """The staged shard and its table if it is complete and current, else None."""
    uri = staged_uri(staging_uri, shard)
    try:
        sidecar = json.loads(storage.read_bytes(staged_uri(staging_uri, shard, "json")))
        data = storage.read_bytes(uri)
    except (FileNotFoundError, ValueError):
        return None
    if (not isinstance(sidecar, dict) or sidecar.get("fingerprint") != key or sidecar.get("listing_sha256") != listing_sha256
            or sidecar.get("rows") != rows or storage.sha256_bytes(data) != sidecar.get("sha256")):
        return None
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != rows:
        return None
    return {"shard": shard, "uri": uri, "rows": rows, "bytes": len(data),
            "sha256": sidecar["sha256"]}, table


def reusable_shards(
    staging_uri: str, shards: list[dict[str, Any]], key: str
) -> Iterator[tuple[dict[str, Any], pa.Table] | None]:
    """Per listing shard (``shard``, ``rows``, ``sha256`` of its listing), in order: what an
    earlier attempt staged for it that still verifies (``load_staged``), else None. Only shards
    with a sidecar are read, a few at a time (``storage.map_concurrently``); a fresh run reads
    none."""
    present = staged_shards(staging_uri)

    def load(f: dict[str, Any]):
        if f["shard"] not in present:
            return None
        return load_staged(staging_uri, f["shard"], f["rows"], f["sha256"], key)

    return storage.map_concurrently(load, shards, storage.IO_WORKERS if present else 1)
