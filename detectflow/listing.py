"""List input images in a stable order and write the listing as shards.

The listing is written to storage (Parquet shards of ``shard_size`` rows) instead of being passed
between tasks as a Python list: the detect stage streams it back with Ray Data, so a run over
millions of keys moves only a folder name between Prefect tasks. A shard is also the unit of
output: shard ``k`` of the listing becomes ``detections/part-k.parquet``, and the unit of resuming.

The listing of a run id is fixed once written: ``<listing>.json``, written last, records each
shard's rows and sha256, and a re-run with the same settings reuses the shards it vouches for,
so staged detections keep pointing at the same images even if the input changed since.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from detectflow import storage
from detectflow.errors import InputError
from detectflow.publish import SAMPLES
from detectflow.schema import LISTING_SCHEMA

log = logging.getLogger(__name__)


def _iter_s3(fs, path: str, page_size: int = 1000) -> Iterator[tuple[str, int]]:
    """Stream keys page by page (S3 returns them in lexicographic order): memory stays flat
    however many keys the prefix holds."""
    bucket, _, prefix = path.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": page_size}
    listed = False
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", []):
            listed = True
            yield f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0)
        if not page.get("IsTruncated"):
            break
        request["ContinuationToken"] = page["NextContinuationToken"]
    if not listed and prefix:  # one object named as the input, as a local file can be
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=prefix)
        except FileNotFoundError:
            return
        yield path, int(head.get("ContentLength") or 0)


def _iter_local(root: str) -> Iterator[tuple[str, int]]:
    """Walk a local tree one folder at a time, in the order of the sorted full paths (a folder's
    entries sorted with a ``/`` after each subfolder's name): memory holds one folder's names,
    never the whole tree's. Symlinked folders are followed once each."""
    if os.path.isfile(root):
        yield root, os.path.getsize(root)
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    yield from _walk(root, set(), top=True)


def _walk(folder: str, seen: set[str], top: bool = False) -> Iterator[tuple[str, int]]:
    real = os.path.realpath(folder)
    if real in seen:  # a symlink back up the tree
        return
    seen.add(real)
    try:
        with os.scandir(folder) as scan:
            entries = sorted((e.name + "/" if e.is_dir() else e.name, e) for e in scan)
    except OSError as exc:
        if top:
            raise
        # An unreadable subfolder (a volume's lost+found) or one removed meanwhile: skipped, as
        # fsspec's walk did, but said.
        log.warning("listing skipped %s: %s", folder, exc.strerror or type(exc).__name__)
        return
    for key, entry in entries:
        if key.endswith("/"):
            yield from _walk(entry.path, seen)
        elif entry.is_file():
            yield entry.path, entry.stat().st_size


def _iter_fs(fs, root: str) -> Iterator[tuple[str, int]]:
    """Any other fsspec filesystem (GCS, Azure, ...): its own recursive listing."""
    if fs.isfile(root):
        yield root, int(fs.info(root).get("size") or 0)
        return
    if not fs.exists(root):
        raise FileNotFoundError(root)
    entries = fs.find(root, detail=True)
    for path in sorted(entries):
        if entries[path].get("type", "file") == "file":
            yield path, int(entries[path].get("size") or 0)


def iter_images(
    input_uri: str, extensions: tuple[str, ...], output_uri: str | None = None,
    skipped: list[str] | None = None,
) -> Iterator[tuple[str, int]]:
    """(uri, size) of every file under ``input_uri`` whose extension matches, in a stable order
    (sorted by path). Storage errors become one :class:`InputError` line naming the URI.

    With ``output_uri`` inside (or equal to) the input, the sample pictures that runs drew there
    are left out (appended to ``skipped``): the next run would otherwise detect objects in
    pictures with the last run's boxes drawn on them, and publish those as input images."""
    fs, root = storage.get_fs(input_uri)
    prefix = storage.uri_prefix(input_uri)
    if storage.is_local(input_uri):
        entries = _iter_local(root)
    elif input_uri.startswith(("s3://", "s3a://")):
        entries = _iter_s3(fs, root)
    else:
        entries = _iter_fs(fs, root)
    drawn_by_a_run = _samples_of_runs(input_uri, root, output_uri)
    try:
        for path, size in entries:
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            if drawn_by_a_run(path):
                if skipped is not None:
                    skipped.append(prefix + path)
                continue
            yield prefix + path, size
    except Exception as exc:
        raise InputError(f"cannot list {input_uri}: {storage.explain(exc)}") from None


def _samples_of_runs(input_uri: str, root: str, output_uri: str | None) -> Callable[[str], bool]:
    """Whether a listed path (under ``root``, the input's path) is a sample picture of a run
    under ``output_uri``: ``<output>/<run id>/samples/<name>.png``, the only images a run
    writes."""
    def never(path: str) -> bool:
        return False

    if not output_uri or storage.is_local(input_uri) != storage.is_local(output_uri):
        return never
    root = root.rstrip("/")
    out = storage.get_fs(output_uri)[1].rstrip("/")
    if out != root and not out.startswith(root + "/"):
        return never

    def drawn(path: str) -> bool:
        parts = path[len(out) + 1:].split("/") if path.startswith(out + "/") else []
        return len(parts) == 3 and parts[1] == SAMPLES and parts[2].endswith(".png")

    return drawn


def require_images(
    input_uri: str, extensions: tuple[str, ...], output_uri: str | None = None
) -> None:
    """Fail in seconds, before any cluster starts, when there is nothing to process."""
    if next(iter_images(input_uri, extensions, output_uri), None) is None:
        raise InputError(f"no images with extensions {','.join(extensions)} under {input_uri}")


def index_uri(listing_uri: str) -> str:
    """Where the listing's index lives: next to the shard folder (Ray Data reads the folder)."""
    return listing_uri.rstrip("/") + ".json"


def read_index(listing_uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(index_uri(listing_uri)))
    except (FileNotFoundError, ValueError):
        return None


def _reusable(index: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    """The index matches these settings and every shard it lists is intact."""
    if not isinstance(index, dict) or index.get("key") != key:
        return False
    try:
        return all(storage.sha256_file(f["uri"]) == f["sha256"] for f in index["files"])
    except (FileNotFoundError, KeyError, TypeError):
        return False


def write_listing(
    input_uri: str,
    listing_uri: str,
    extensions: tuple[str, ...],
    shard_size: int,
    limit: int | None = None,
    output_uri: str | None = None,
) -> dict[str, Any]:
    """Write ``listing_uri/shard-NNNNN.parquet`` files and the index; returns image and shard
    counts (and how many sample pictures of runs under ``output_uri`` were left out, see
    ``iter_images``). An intact listing already written with the same settings is reused."""
    key = {"input_uri": input_uri, "extensions": sorted(extensions), "shard_size": shard_size,
           "limit": limit}
    index = read_index(listing_uri)
    if _reusable(index, key):
        return {"images": index["images"], "shards": len(index["files"]), "reused": True,
                "skipped_samples": index.get("skipped_samples", 0)}
    storage.remove(index_uri(listing_uri))
    storage.remove(listing_uri)
    count = shards = 0
    batch: list[dict] = []
    files: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal shards, batch
        if batch:
            uri = storage.join(listing_uri, f"shard-{shards:05d}.parquet")
            info = storage.write_parquet(uri, pa.Table.from_pylist(batch, schema=LISTING_SCHEMA))
            files.append({"shard": shards, "uri": uri, "rows": len(batch), "sha256": info["sha256"]})
            shards += 1
            batch = []

    skipped: list[str] = []
    for uri, size in iter_images(input_uri, extensions, output_uri, skipped):
        if limit is not None and count >= limit:
            break
        batch.append({"image_uri": uri, "size": size, "index": count, "shard": shards})
        count += 1
        if len(batch) >= shard_size:
            flush()
    flush()
    if count == 0:
        raise InputError(f"no images with extensions {','.join(extensions)} under {input_uri}")
    index = {"key": key, "images": count, "files": files, "skipped_samples": len(skipped)}
    storage.atomic_write_bytes(index_uri(listing_uri), json.dumps(index).encode())
    return {"images": count, "shards": shards, "reused": False, "skipped_samples": len(skipped)}
