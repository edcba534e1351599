"""Memory and object-store measurements taken while a pipeline runs.

The sampler must not slow what it measures on two cores. RSS comes from ``statm`` (the kernel's
counters, cheap) at every sample; PSS needs ``smaps_rollup``, a walk of each process's page
tables, which at every sample took CPU from the pipeline it measured (benchmarks/RESULTS.md,
"Method"). So PSS is taken while RSS grows, every 10 s once it is flat, and at the end.

Peak memory is sampled in a thread over a process tree (the driver, or a child process, with
every descendant: Ray's raylet, its workers and actors, Prefect's server). Two sums are kept:
RSS (what ``ps`` shows; counts shared pages, e.g. the object store, once per process that maps
them) and PSS (shared pages split between the processes that map them, so nothing counts twice).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(*roots: int) -> list[int]:
    """``roots`` and every process below them (Linux /proc; psutil is not installed here)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (ppid := _ppid(int(name))) is not None:
            children.setdefault(ppid, []).append(int(name))
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(out)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def object_store() -> tuple[int, int]:
    """(bytes in the local Ray object store now, bytes spilled so far); (0, 0) without Ray."""
    import ray

    if not ray.is_initialized():
        return 0, 0
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address),
                                  timeout_seconds=10).store_stats
    return stats.object_store_bytes_used, stats.spilled_bytes_total


@dataclass
class Peaks:
    rss: int = 0
    pss: int = 0
    store: int = 0
    spilled: int = 0  # spilled during the measured interval


class MemorySampler:
    """Context manager: samples tree RSS (and the object store, when ``ray``) every ``period``
    seconds; tree PSS when RSS has grown 5% since PSS was last taken, else every ``pss_period``
    seconds, and once more at the end."""

    def __init__(self, pid: int | None = None, period: float = 2.0, ray: bool = False,
                 pss_period: float = 10.0, also: tuple[int, ...] = ()) -> None:
        self.roots = (pid or os.getpid(), *also)  # ``also``: services the run uses
        self.period = period
        self.pss_period = pss_period
        self.ray = ray
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._spilled0 = 0
        self._pss_rss, self._pss_at = 0, float("-inf")  # RSS and time when PSS was last taken

    def _sample(self, final: bool = False) -> None:
        pids = descendants(*self.roots)  # one /proc scan serves both sums
        rss = sum(_rss(pid) for pid in pids)
        self.peaks.rss = max(self.peaks.rss, rss)
        now = time.monotonic()
        since = now - self._pss_at
        if final or since >= self.pss_period or rss > 1.05 * self._pss_rss:
            self.peaks.pss = max(self.peaks.pss, sum(_pss(pid) for pid in pids))
            self._pss_rss, self._pss_at = rss, now
        if self.ray:
            try:
                used, spilled = object_store()
            except Exception:  # the cluster may be shutting down at the very end
                return
            self.peaks.store = max(self.peaks.store, used)
            self.peaks.spilled = max(self.peaks.spilled, spilled - self._spilled0)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> MemorySampler:
        if self.ray:
            self._spilled0 = object_store()[1]
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(final=True)


class Clock:
    """Wall time of a run, and when its results arrived (for a start-up excluded rate)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []
        self.end: float | None = None

    def arrived(self, done: int) -> None:
        self.arrivals.append((time.perf_counter(), done))

    def stop(self) -> None:
        self.end = time.perf_counter()

    @property
    def wall(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def steady_rate(self, total: int, skip: float = 0.25) -> float | None:
        """Images/s once ``skip`` of the images are done (start-up excluded).

        Not from the very first result: with several actors, work finished just before that
        moment is counted inside the window, which overstated short multi-actor runs by ~15%.
        """
        start = next(((t, d) for t, d in self.arrivals if d >= skip * total), None)
        if start is None or self.end is None or total <= start[1]:
            return None
        span = self.end - start[0]
        return (total - start[1]) / span if span > 0 else None
