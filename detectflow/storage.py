"""Local and object storage through fsspec, with atomic writes and checksums.

Every read and write of the pipeline goes through these few functions so that a local folder and an
``s3://`` prefix behave the same, and so that "written" always means "complete": a reader never sees
half a file.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import fsspec
from fsspec import AbstractFileSystem

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# Set per process by configure(): an S3-compatible endpoint (MinIO, Ceph, R2, a test server).
_ENDPOINT: dict[str, str | None] = {"url": None}
ANONYMOUS = "anonymous@"
# Requests in flight at once where a run does one per shard (thousands in a large run): object
# storage's round trips dominate, and fsspec waits and pyarrow encodes without the GIL.
IO_WORKERS = 8
T = TypeVar("T")
# Fail in seconds, not minutes, when an endpoint is unreachable; still ride out a blip.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60,
              "retries": {"max_attempts": 3, "mode": "standard"}}


def configure(endpoint_url: str | None = None) -> None:
    """Choose the S3 endpoint for this process: the parameter, else ``AWS_ENDPOINT_URL_S3``,
    else ``AWS_ENDPOINT_URL`` (AWS's own variables), else AWS itself. Credentials always come from
    the standard AWS chain (environment, profile, instance role) and are never passed around."""
    _ENDPOINT["url"] = endpoint_url or None


def endpoint_url() -> str | None:
    return (_ENDPOINT["url"] or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def get_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it (protocol stripped).

    ``s3://anonymous@bucket/key`` (Ray's convention for public buckets) reads unsigned.
    """
    if uri.startswith(("s3://", "s3a://")):
        rest = uri.split("://", 1)[1]
        anon = rest.startswith(ANONYMOUS)
        fs = fsspec.filesystem("s3", anon=anon, endpoint_url=endpoint_url(),
                               config_kwargs=_S3_CONFIG, use_listings_cache=False)
        return fs, rest.removeprefix(ANONYMOUS).rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def uri_prefix(uri: str) -> str:
    """What turns a filesystem path back into a URI like ``uri`` ("" for local paths)."""
    if is_local(uri):
        return ""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://" + (ANONYMOUS if rest.startswith(ANONYMOUS) else "")


def explain(exc: BaseException) -> str:
    """A short reason for a storage failure, safe to show: it never echoes request details
    (which could carry credentials), only what the user must fix."""
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return "bucket does not exist" if "bucket" in text.lower() else "not found"
    if isinstance(exc, PermissionError):
        if any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                         "InvalidToken", "ExpiredToken", "Key Id you provided")):
            return "invalid credentials (check the AWS credentials in the environment or profile)"
        return "access denied"
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if "EndpointConnectionError" in name or "Could not connect" in text or isinstance(
        exc, ConnectionError | TimeoutError
    ):
        return f"cannot reach the storage endpoint {endpoint_url() or '(AWS default)'}"
    return name


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if parts else uri


def safe_name(name: str, max_len: int = 120) -> str:
    """A file name that cannot escape its folder (no separators, no ``..``)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "file"
    return cleaned[:max_len]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, chunk: int = 8 << 20) -> str:
    fs, path = get_fs(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    return fs.cat_file(path)


# A local file name need not be UTF-8 (Linux names are bytes), and Parquet strings must be. Such a
# path is written as a ``file://`` URI with each byte that is not part of valid UTF-8 as ``%XX``
# and ``%`` itself as ``%25``; every other local path stays as it is, so the scheme says which.
FILE_URI = "file://"
_ESCAPED = range(0xDC80, 0xDD00)  # what Python decodes an undecodable byte to (surrogateescape)


def local_image_uri(path: str) -> str:
    """The ``image_uri`` of a local file (the inverse of :func:`image_path`)."""
    if path.isascii():
        return path
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    if not any(ord(c) in _ESCAPED for c in text):
        return path
    return FILE_URI + "".join(
        f"%{ord(c) - 0xDC00:02X}" if ord(c) in _ESCAPED else "%25" if c == "%" else c
        for c in os.path.abspath(text))


def image_path(image_uri: str) -> str:
    """The file an ``image_uri`` names: for a local file its path (``os.fsencode`` of it gives
    the exact bytes of a name that is not UTF-8); any other URI comes back as it is."""
    if image_uri.startswith(FILE_URI):
        return os.fsdecode(unquote_to_bytes(image_uri[len(FILE_URI):]))
    return image_uri


def read_image(image_uri: str) -> bytes:
    """The bytes of the file an ``image_uri`` (a listing row's) names."""
    path = image_path(image_uri)
    if is_local(path):  # opened directly: fsspec would parse a name holding "::" as a chain
        with open(path, "rb") as handle:
            return handle.read()
    return read_bytes(path)


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def atomic_write_bytes(uri: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` so that readers see either nothing or the whole file.

    Locally: write a temporary sibling, fsync, rename over the target (POSIX-atomic). On S3 a single
    PUT is already atomic: the object appears only once the upload completed.
    """
    fs, path = get_fs(uri)
    if is_local(uri):
        _write_local(path, data, os.replace)
    else:
        fs.pipe_file(path, data)
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


def _write_local(path: str, data: bytes, place: Callable[[str, str], None]) -> None:
    """Write a temporary sibling, fsync it, then ``place`` it at ``path`` (``os.replace``
    overwrites, ``os.link`` fails if the name exists); the temporary file never stays."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        place(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        exc.filename = exc.filename or path  # a full disk's error names no file otherwise
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def precondition_failed(exc: BaseException) -> bool:
    """An S3 conditional write refused (412): s3fs raises it as FileExistsError."""
    return isinstance(exc, FileExistsError) or "PreconditionFailed" in f"{type(exc).__name__} {exc}"


def create_only_bytes(uri: str, data: bytes) -> bool:
    """Write ``data`` as ``atomic_write_bytes`` does, but only if nothing is at ``uri`` yet:
    False (and nothing written) when something is. Locally a hard link of the finished temporary
    file (fails if the name exists); on S3 a PUT with ``IfNoneMatch: *`` (a store that ignores
    the header overwrites, as before)."""
    fs, path = get_fs(uri)
    if not is_local(uri):
        try:
            fs.call_s3("put_object", Bucket=path.split("/", 1)[0], Key=path.split("/", 1)[1],
                       Body=data, IfNoneMatch="*")
        except Exception as exc:
            if precondition_failed(exc):
                return False
            raise
        return True
    try:
        _write_local(path, data, os.link)
    except FileExistsError:
        return False
    return True


def write_parquet(uri: str, table, **options: Any) -> dict[str, Any]:
    """Serialise ``table`` to Parquet in memory and write it atomically; returns bytes + sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return atomic_write_bytes(uri, sink.getvalue().to_pybytes())


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def arrow_fs(uri: str):
    """A pyarrow filesystem over the same fsspec filesystem (same credentials and endpoint)."""
    if is_local(uri):
        return None, uri.removeprefix("file://")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = get_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def map_concurrently(fn: Callable[[Any], T], items: Iterable[Any], workers: int = IO_WORKERS,
                     held: int = 64) -> Iterator[T]:
    """``fn`` over ``items``, ``workers`` calls at a time, results in the items' order; at most
    ``held`` results wait to be consumed. One worker (or one item) runs in the caller's thread."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items)),
                            thread_name_prefix="storage-io") as pool:
        for i in range(0, len(items), held):
            yield from pool.map(fn, items[i:i + held])
