"""List input images in a stable order and write the listing as shards.

The listing is written to storage (Parquet shards of ``shard_size`` rows) instead of being passed
between tasks as a Python list: the detect stage streams it back with Ray Data, so a run over
millions of keys moves only a folder name between Prefect tasks. A shard is also the unit of
output: shard ``k`` of the listing becomes ``detections/part-k.parquet``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from detectflow import storage
from detectflow.errors import InputError
from detectflow.schema import LISTING_SCHEMA


def iter_images(input_uri: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(uri, size) of every file under ``input_uri`` whose extension matches, sorted by path."""
    fs, root = storage.get_fs(input_uri)
    try:
        if fs.isfile(root):
            entries = {root: fs.info(root)}
        else:
            if not fs.exists(root):
                raise InputError(f"input not found: {input_uri}")
            entries = fs.find(root, detail=True)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"input not found: {input_uri}") from None
    except PermissionError:
        raise InputError(f"input not readable (permission denied): {input_uri}") from None
    prefix = "" if storage.is_local(input_uri) else input_uri.split("://", 1)[0] + "://"
    for path in sorted(entries):
        info = entries[path]
        if info.get("type", "file") != "file":
            continue
        name = path.rsplit("/", 1)[-1]
        if name.startswith(".") or not name.lower().endswith(extensions):
            continue
        yield prefix + path, int(info.get("size") or 0)


def require_images(input_uri: str, extensions: tuple[str, ...]) -> None:
    """Fail in seconds, before any cluster starts, when there is nothing to process."""
    if next(iter_images(input_uri, extensions), None) is None:
        raise InputError(f"no images with extensions {','.join(extensions)} under {input_uri}")


def write_listing(
    input_uri: str,
    listing_uri: str,
    extensions: tuple[str, ...],
    shard_size: int,
    limit: int | None = None,
) -> dict[str, int]:
    """Write ``listing_uri/shard-NNNNN.parquet`` files; returns image and shard counts."""
    storage.remove(listing_uri)
    count = shards = 0
    batch: list[dict] = []

    def flush() -> None:
        nonlocal shards, batch
        if batch:
            table = pa.Table.from_pylist(batch, schema=LISTING_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            name = f"shard-{shards:05d}.parquet"
            storage.atomic_write_bytes(storage.join(listing_uri, name), sink.getvalue().to_pybytes())
            shards += 1
            batch = []

    for uri, size in iter_images(input_uri, extensions):
        if limit is not None and count >= limit:
            break
        batch.append({"image_uri": uri, "size": size, "index": count, "shard": shards})
        count += 1
        if len(batch) >= shard_size:
            flush()
    flush()
    if count == 0:
        raise InputError(f"no images with extensions {','.join(extensions)} under {input_uri}")
    return {"images": count, "shards": shards}
