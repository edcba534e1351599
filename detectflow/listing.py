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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import pyarrow as pa

from detectflow import storage
from detectflow.announce import LATEST
from detectflow.errors import InputError
from detectflow.lease import LEASE
from detectflow.publish import MANIFEST, STAGING
from detectflow.schema import LISTING_SCHEMA

log = logging.getLogger(__name__)


# Why an entry under the input was left out (the manifest's ``input.skipped``). A name starting
# with "." (file or folder) is hidden; a folder holding a run (its manifest, lease or staging
# folder) or an output's ``latest.json`` is a run's output, never input, whatever output this run
# writes to.
SKIP_REASONS = ("hidden", "broken_link", "unreadable", "run_output")
_RUN_FILES = (MANIFEST, LEASE, LATEST)


class Listed(NamedTuple):
    """One listed image. ``version`` says whether it changed since an earlier run without
    reading it: ``size:ETag`` on S3, ``size:mtime_ns`` for a local file (None when the store
    gives neither)."""

    uri: str
    size: int
    version: str | None = None


def _version(size: int, tag: object) -> str | None:
    return None if tag in (None, "") else f"{size}:{str(tag).strip(chr(34))}"


def _iter_s3(fs, path: str, page_size: int = 1000) -> Iterator[Listed]:
    """Stream keys page by page (S3 returns them in lexicographic order): memory stays flat
    however many keys the prefix holds."""
    bucket, _, prefix = path.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": page_size}
    listed = False
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", []):
            listed = True
            size = int(obj.get("Size") or 0)
            yield Listed(f"{bucket}/{obj['Key']}", size, _version(size, obj.get("ETag")))
        if not page.get("IsTruncated"):
            break
        request["ContinuationToken"] = page["NextContinuationToken"]
    if not listed and prefix:  # one object named as the input, as a local file can be
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=prefix)
        except FileNotFoundError:
            return
        size = int(head.get("ContentLength") or 0)
        yield Listed(path, size, _version(size, head.get("ETag")))


def _s3_run_folder(fs) -> Callable[[str], bool]:
    """Whether an S3 "folder" holds a run's marker, asked when the first image under it is
    listed: its own keys may sort before the marker (``a.jpg`` < ``manifest.json``). Listing
    (not HEAD) needs only the permission the listing itself needs."""
    def first_key(prefix: str) -> str | None:
        bucket, _, key = prefix.partition("/")
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        return f"{bucket}/{page['Contents'][0]['Key']}" if page.get("Contents") else None

    def marked(folder: str) -> bool:
        probes = [f"{folder}/{STAGING}/"] + [f"{folder}/{name}" for name in _RUN_FILES]
        found = storage.map_concurrently(first_key, probes, workers=len(probes))
        return any(key is not None and (i == 0 or key == probes[i])
                   for i, key in enumerate(found))

    return marked


def _iter_local(root: str, extensions: tuple[str, ...],
                skipped: Counter) -> Iterator[Listed]:
    """Walk a local tree one folder at a time, in the order of the sorted full paths (a folder's
    entries sorted with a ``/`` after each subfolder's name): memory holds one folder's names,
    never the whole tree's. Symlinked folders are followed once each."""
    if os.path.isfile(root):
        if root.lower().endswith(extensions):
            yield _local(root, os.stat(root))
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    yield from _walk(root, extensions, skipped, set(), top=True)


def _local(path: str, stat: os.stat_result) -> Listed:
    return Listed(path, stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}")


def _walk(folder: str, extensions: tuple[str, ...], skipped: Counter, seen: set[str],
          top: bool = False) -> Iterator[Listed]:
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
        # An unreadable subfolder (a volume's lost+found) or one removed meanwhile.
        log.warning("listing skipped %s: %s", folder, exc.strerror or type(exc).__name__)
        skipped["unreadable"] += 1
        return
    if not top and any(key in _RUN_FILES or key == STAGING + "/" for key, _ in entries):
        skipped["run_output"] += 1
        return
    for key, entry in entries:
        if key.endswith("/"):
            if entry.name.startswith("."):
                skipped["hidden"] += 1
            else:
                yield from _walk(entry.path, extensions, skipped, seen)
            continue
        image = entry.name.lower().endswith(extensions)
        if entry.name.startswith("."):
            skipped["hidden"] += image
        elif entry.is_symlink() and not os.path.exists(entry.path):
            skipped["broken_link"] += 1  # a folder or an image once: counted, whatever its name
        elif image and entry.is_file():
            try:
                stat = entry.stat()
            except OSError:  # removed meanwhile
                skipped["unreadable"] += 1
                continue
            yield _local(entry.path, stat)


def _fs_entry(path: str, info: Mapping[str, Any]) -> Listed:
    size = int(info.get("size") or 0)
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "mtime",
                                  "last_modified", "LastModified", "created") if info.get(k)), None)
    return Listed(path, size, _version(size, tag))


def _iter_fs(fs, root: str) -> Iterator[Listed]:
    """Any other fsspec filesystem (GCS, Azure, ...): its own recursive listing."""
    if fs.isfile(root):
        yield _fs_entry(root, fs.info(root))
        return
    if not fs.exists(root):
        raise FileNotFoundError(root)
    entries = fs.find(root, detail=True)
    for path in sorted(entries):
        if entries[path].get("type", "file") == "file":
            yield _fs_entry(path, entries[path])


def _run_folders_of(paths: Iterable[str]) -> set[str]:
    """The folders that hold a run's marker, from a whole listing in memory."""
    folders = set()
    for path in paths:
        parts = path.split("/")
        if parts[-1] in _RUN_FILES:
            folders.add("/".join(parts[:-1]))
        folders.update("/".join(parts[:i]) for i, part in enumerate(parts[:-1]) if part == STAGING)
    return folders


def _fs_tree(fs, root: str, extensions: tuple[str, ...],
             skipped: Counter) -> Iterator[Listed]:
    listed = list(_iter_fs(fs, root))  # ``find`` has it all in memory already
    run_folders = _run_folders_of(entry.uri for entry in listed)
    yield from _flat_tree(listed, root, extensions, skipped, run_folders.__contains__)


def _flat_tree(entries: Iterable[Listed], root: str, extensions: tuple[str, ...],
               skipped: Counter, run_folder: Callable[[str], bool]) -> Iterator[Listed]:
    """The local walk's rules over a sorted flat listing (object keys). The keys under a folder
    are contiguous in sorted order, so the state is the current key's folders (and whether each
    is a run's, asked once each), however many keys; a skipped folder is counted once."""
    base = root.rstrip("/") + "/"
    folders: list[tuple[str, bool]] = []  # the current key's folders below the root, top down
    counted = ""
    for entry in entries:
        path = entry.uri
        if not path.startswith(base):  # the input is this one object
            if path.lower().endswith(extensions):
                yield entry
            continue
        *parts, name = path[len(base):].split("/")
        image = name.lower().endswith(extensions)
        hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if hidden is None and not image:
            continue  # no image, nothing to count: no question asked
        skip = None
        for depth in range(len(parts) if hidden is None else hidden):
            folder = base + "/".join(parts[:depth + 1])
            if depth >= len(folders) or folders[depth][0] != folder:
                del folders[depth:]
                folders.append((folder, run_folder(folder)))
            if folders[depth][1]:
                skip = ("run_output", folder)
                break
        if skip is None and hidden is not None:
            skip = ("hidden", base + "/".join(parts[:hidden + 1]))
        elif skip is None and name.startswith("."):
            skip = ("hidden", path)
        if skip is None:
            yield entry
        elif skip[1] != counted:
            skipped[skip[0]] += 1
            counted = skip[1]


def iter_images(
    input_uri: str, extensions: tuple[str, ...], skipped: Counter | None = None,
) -> Iterator[Listed]:
    """(uri, size, version) of every image under ``input_uri`` (extension matching), in a stable order
    (sorted by path); what was left out is counted by reason in ``skipped`` (``SKIP_REASONS``).
    Storage errors become one :class:`InputError` line naming the URI.

    A local name that is not UTF-8 gets a ``file://`` URI (``storage.local_image_uri``). The
    input itself is never skipped: it may be hidden, or the output, or a run."""
    skipped = Counter() if skipped is None else skipped
    fs, root = storage.get_fs(input_uri)
    prefix = storage.uri_prefix(input_uri)
    if storage.is_local(input_uri):
        entries = (entry._replace(uri=storage.local_image_uri(entry.uri))
                   for entry in _iter_local(root, extensions, skipped))
    elif input_uri.startswith(("s3://", "s3a://")):
        entries = _flat_tree(_iter_s3(fs, root), root, extensions, skipped, _s3_run_folder(fs))
    else:
        entries = _fs_tree(fs, root, extensions, skipped)
    try:
        for entry in entries:
            yield entry._replace(uri=prefix + entry.uri)
    except Exception as exc:
        raise InputError(f"cannot list {input_uri}: {storage.explain(exc)}") from None


def no_images(input_uri: str, extensions: tuple[str, ...], skipped: Counter) -> InputError:
    said = summarise_skipped(skipped)
    return InputError(f"no images with extensions {','.join(extensions)} under {input_uri}"
                      + (f" (skipped: {said})" if said else ""))


def summarise_skipped(skipped: Mapping[str, int]) -> str:
    """``2 hidden, 1 broken link``: the nonzero counts, for a person."""
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items() if n)


def require_images(input_uri: str, extensions: tuple[str, ...]) -> None:
    """Fail in seconds, before any cluster starts, when there is nothing to process."""
    skipped: Counter = Counter()
    if next(iter_images(input_uri, extensions, skipped), None) is None:
        raise no_images(input_uri, extensions, skipped)


def index_uri(listing_uri: str) -> str:
    """Where the listing's index lives: next to the shard folder (Ray Data reads the folder)."""
    return listing_uri.rstrip("/") + ".json"


def read_index(listing_uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(index_uri(listing_uri)))
    except (FileNotFoundError, ValueError):
        return None


def reusable(index: dict[str, Any] | None, key: dict[str, Any]) -> bool:
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
) -> dict[str, Any]:
    """Write ``listing_uri/shard-NNNNN.parquet`` files and the index; returns image and shard
    counts, and what was skipped by reason (see ``iter_images``). An intact listing already
    written with the same settings is reused."""
    key = {"input_uri": input_uri, "extensions": sorted(extensions), "shard_size": shard_size,
           "limit": limit}
    index = read_index(listing_uri)
    if reusable(index, key) and isinstance(index.get("skipped"), dict):
        return {"images": index["images"], "shards": len(index["files"]), "reused": True,
                "skipped": index["skipped"]}
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

    skipped: Counter = Counter()
    for uri, size, version in iter_images(input_uri, extensions, skipped):
        if limit is not None and count >= limit:
            break
        batch.append({"image_uri": uri, "size": size, "image_version": version,
                      "index": count, "shard": shards})
        count += 1
        if len(batch) >= shard_size:
            flush()
    flush()
    if count == 0:
        raise no_images(input_uri, extensions, skipped)
    # Every reason, zeros too: consumers of the manifest find the same keys in every run.
    counts = {reason: skipped[reason] for reason in SKIP_REASONS}
    index = {"key": key, "images": count, "files": files, "skipped": counts}
    storage.atomic_write_bytes(index_uri(listing_uri), json.dumps(index).encode())
    return {"images": count, "shards": shards, "reused": False, "skipped": counts}
