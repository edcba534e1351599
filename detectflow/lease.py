"""One run of a run id at a time: a lease on ``<run>/_lease.json``, held for the whole run.

- Local folders: a POSIX lock (``fcntl.lockf``) on the file. The kernel drops it the moment its
  holder dies, so re-running a killed run never waits; it works on NFS (v4 locks).
- S3: the object is created only if absent (``IfNoneMatch: *``) and renewed before it expires
  (``IfMatch`` its ETag). A lease whose holder stopped renewing (it died elsewhere), or whose
  holder was a dead process on this very machine, is taken over with ``IfMatch`` on the ETag that
  was judged stale, so of two runs taking it over only one succeeds.

Within one process the lease is re-entrant (``detectflow run`` takes it before Ray starts, and
the flow it then runs in that process enters it again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from detectflow import storage
from detectflow.errors import OutputError, RunTaken

log = logging.getLogger(__name__)

LEASE = "_lease.json"
TTL = 60.0  # seconds an S3 lease lasts unless renewed; renewed every TTL / 3
POLL = 1.0  # seconds between tries with ``wait``

_held: dict[str, list[Any]] = {}  # lease uri -> [lease, depth]
_held_lock = threading.Lock()


def lease_uri(run_uri: str) -> str:
    return storage.join(run_uri, LEASE)


def _holder() -> dict[str, Any]:
    now = time.time()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "expires": now + TTL}


def _describe(run_id: str, holder: dict[str, Any] | None) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
           if holder else "another run")
    return f"run id {run_id} is taken by {who}; wait for it with --wait, or use another run id"


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder was a process of this machine that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


class _LocalLease:
    def __init__(self, uri: str) -> None:
        self.path = uri.removeprefix("file://")
        self.fd: int | None = None
        self.created: list[str] = []

    def try_acquire(self) -> dict[str, Any] | None:
        """None when acquired, else what the file says of its holder."""
        import fcntl

        folder = os.path.dirname(os.path.abspath(self.path))
        while not os.path.isdir(folder):  # created here, removed on release if still empty
            self.created.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            # Its holder writes who it is right after taking the lock: read until it has.
            for _ in range(40):
                if holder := _read_json(os.pread(fd, 4096, 0)):
                    break
                time.sleep(0.025)
            os.close(fd)
            return holder or {}
        try:  # a holder that just released unlinked this file: lock the new one instead
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self.try_acquire()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still locked: a waiter then locks a new file
            os.close(self.fd)
            self.fd = None
            for folder in self.created:  # a run that stopped before writing anything
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


class _S3Lease:
    def __init__(self, uri: str) -> None:
        self.fs, path = storage.get_fs(uri)
        self.bucket, _, self.key = path.partition("/")
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _put(self, **condition: str) -> str:
        body = json.dumps(self.holder).encode()
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body,
                               **condition)["ETag"]

    def try_acquire(self) -> dict[str, Any] | None:
        self.holder = _holder()
        try:
            self.etag = self._put(IfNoneMatch="*")
        except Exception as exc:
            if not storage.precondition_failed(exc):
                raise
            try:  # the ETag first: should the lease change after it, the takeover fails
                etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
                holder = _read_json(self.fs.cat_file(f"{self.bucket}/{self.key}")) or {}
            except FileNotFoundError:  # released meanwhile: try again
                return self.try_acquire()
            if holder.get("expires", 0) > time.time() and not _dead_here(holder):
                return holder
            try:  # stale: take it over, unless another run just did
                self.etag = self._put(IfMatch=etag)
            except Exception as exc2:
                if not storage.precondition_failed(exc2):
                    raise
                return holder
            log.warning("took over the lease of run %s's holder (pid %s on %s), which stopped",
                        self.key, holder.get("pid"), holder.get("host"))
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name="detectflow-lease")
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(TTL / 3):
            self.holder["expires"] = time.time() + TTL
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as exc:
                if storage.precondition_failed(exc):
                    self.lost = True
                    log.error("lost the lease on %s/%s to another run", self.bucket, self.key)
                    return
                log.warning("could not renew the lease on %s/%s: %s", self.bucket, self.key,
                            storage.explain(exc))

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(10)
        if self.etag and not self.lost:
            with contextlib.suppress(Exception):
                head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
                if head.get("ETag") == self.etag:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        self.etag = None


def _read_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def run_lease(run_uri: str, run_id: str, wait: bool = False) -> Iterator[None]:
    """Hold the run id's lease for the block. Taken: :class:`RunTaken` naming its holder, or
    with ``wait`` try again until the holder is done."""
    uri = lease_uri(run_uri)
    with _held_lock:
        if uri in _held:
            _held[uri][1] += 1
            lease = None
        else:
            lease = _LocalLease(uri) if storage.is_local(uri) else _S3Lease(uri)
    if lease is not None:
        said = False
        while True:
            try:
                holder = lease.try_acquire()
            except OSError as exc:
                raise OutputError(f"cannot take the lease {uri}: "
                                  f"{storage.explain(exc)}") from None
            if holder is None:
                break
            if not wait:
                raise RunTaken(_describe(run_id, holder))
            if not said:
                log.warning("%s; waiting", _describe(run_id, holder).split(";")[0])
                said = True
            time.sleep(POLL)
        with _held_lock:
            _held[uri] = [lease, 1]
    try:
        yield
    finally:
        with _held_lock:
            entry = _held[uri]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[uri]
                entry[0].release()
