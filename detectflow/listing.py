"""List input images in a stable order and write the listing as shards.

The listing is written to storage (Parquet shards of ``shard_size`` rows) instead of being passed
between tasks as a Python list: the detect stage streams it back with Ray Data, so a run over
millions of keys moves only a folder name between Prefect tasks. A shard is also the unit of
output: shard ``k`` of the listing becomes ``detections/part-k.parquet``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from detectflow import storage
from detectflow.errors import InputError
from detectflow.schema import LISTING_SCHEMA


def _iter_s3(fs, path: str, page_size: int = 1000) -> Iterator[tuple[str, int]]:
    """Stream keys page by page (S3 returns them in lexicographic order): memory stays flat
    however many keys the prefix holds."""
    bucket, _, prefix = path.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": page_size}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", []):
            yield f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0)
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _iter_fs(fs, root: str) -> Iterator[tuple[str, int]]:
    if fs.isfile(root):
        yield root, int(fs.info(root).get("size") or 0)
        return
    if not fs.exists(root):
        raise FileNotFoundError(root)
    entries = fs.find(root, detail=True)
    for path in sorted(entries):
        if entries[path].get("type", "file") == "file":
            yield path, int(entries[path].get("size") or 0)


def iter_images(input_uri: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(uri, size) of every file under ``input_uri`` whose extension matches, in a stable order
    (sorted by path). Storage errors become one :class:`InputError` line naming the URI."""
    fs, root = storage.get_fs(input_uri)
    prefix = storage.uri_prefix(input_uri)
    entries = _iter_fs(fs, root) if storage.is_local(input_uri) else _iter_s3(fs, root)
    try:
        for path, size in entries:
            name = path.rsplit("/", 1)[-1]
            if not name.startswith(".") and name.lower().endswith(extensions):
                yield prefix + path, size
    except Exception as exc:
        raise InputError(f"cannot list {input_uri}: {storage.explain(exc)}") from None


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
            name = f"shard-{shards:05d}.parquet"
            storage.write_parquet(storage.join(listing_uri, name),
                                  pa.Table.from_pylist(batch, schema=LISTING_SCHEMA))
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
