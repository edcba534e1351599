"""No cyclic garbage collection while a process imports its heavy modules.

Importing Prefect's server, ``ray.data`` or torch allocates hundreds of thousands of objects,
nearly all of them for good, yet CPython's collector keeps running full passes over the growing
heap, a fifth of such an import's CPU (benchmarks/RESULTS.md, lever log). Every process of a run's start-up does such imports at once on a small machine
(benchmarks/RESULTS.md). On leaving the pause, one collection of the youngest generation (where
everything allocated during the pause still is) frees the cycles the imports left: torch.fx
keeps an import's frames in a cycle, which held an actor's whole loaded state dict. Then ``gc.freeze()`` moves what survived to the permanent generation, so
later collections do not walk it again (the pattern CPython documents for ``gc.freeze``), and
the collector is back on as before.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = True
_freeze = True  # whether the current pause ends with gc.freeze()


@contextlib.contextmanager
def collection_paused(freeze: bool = True) -> Iterator[None]:
    """Collector off for the block; nested and concurrent blocks (threads) share one pause, which
    ends with the last of them. ``freeze=False`` for a block that runs beside other work (a
    background import): freezing then would also make permanent whatever that work holds at the
    moment, and its cycles would never be collected."""
    global _depth, _was_enabled, _freeze
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            _freeze = True
            gc.disable()
        _freeze = _freeze and freeze
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.collect(0)
                if _freeze:
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
