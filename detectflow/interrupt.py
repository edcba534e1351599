"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (``kill``, a Prefect worker cancelling it).

The signal becomes an :class:`Interrupted` exception in the main thread, which unwinds the run
through its ``finally`` blocks: the Ray Data job's driver task is cancelled with the flow's
tasks, and the run's Ray connection is shut down (a local Ray stops with every worker and actor;
a cluster ends the run's job, whose actors go with it, and keeps running). The main thread waits
in short steps (``orchestration.completed``), so the exception is raised within a fraction of a
second. Should the unwinding still hang, a deadline stops the process and what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds the unwinding may take before the process is stopped without it; the user expects
# the command to be gone within about ten.
DEADLINE = 8.0


class Interrupted(BaseException):
    """SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt: no ``except Exception`` keeps a
    run going after its user asked it to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_received: list[int] = []
_on_deadline: list[Callable[[], None]] = []
# Signals that reached another handler (Prefect's, in a flow) while ours was active.
_noted: list[int] = []


def _handler(signum: int, frame: object) -> None:
    _arm(signum, _received)
    raise Interrupted(signum)


def _arm(signum: int, seen: list[int]) -> None:
    """Note a stop and start its deadline; asked twice, stop now."""
    if seen:
        _stop_now(signum)
    seen.append(signum)
    threading.Thread(target=_deadline, args=(signum,), daemon=True,
                     name="detectflow-deadline").start()


def _deadline(signum: int) -> None:
    threading.Event().wait(DEADLINE)
    _stop_now(signum)


def _stop_now(signum: int) -> None:
    for hook in _on_deadline:
        with contextlib.suppress(Exception):
            hook()
    kill_descendants()
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals(on_deadline: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while this is active;
    ``on_deadline`` runs (e.g. prints the last line) if the process must be stopped without
    unwinding. Elsewhere than the main thread, signals cannot be handled: nothing changes."""
    if not _is_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    if on_deadline:
        _on_deadline.append(on_deadline)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if on_deadline:
            _on_deadline.remove(on_deadline)


def interrupted() -> int | None:
    """The first signal received while :func:`stop_on_signals` was active, if any."""
    return (_received or _noted or [None])[0]


@contextlib.contextmanager
def noted_in_flow() -> Iterator[None]:
    """In ``detectflow run``, keep a stop a stop when it lands inside a library that renames
    exceptions.

    In a flow run, Prefect's engine handles SIGTERM: its handler raises ``TerminationSignal``,
    and the engine hands the signal on to ours once that exception has left the flow. Raised
    inside pydantic's serializer (as prefect-ray submits a task), it leaves as a
    ``PydanticSerializationError``, and the run would end Failed. Noted here, the stop leaves
    as itself again; so does a Ctrl-C, which our handler took. A worker's or ``serve``'s run is
    left alone: Prefect acknowledges a UI cancel only while its own handler is in place."""
    ours = _is_main_thread() and signal.getsignal(signal.SIGINT) is _handler
    flows_own = signal.getsignal(signal.SIGTERM) if ours else None
    if not callable(flows_own):
        yield
        return

    def noting(signum: int, frame: object) -> None:
        _arm(signum, _noted)
        flows_own(signum, frame)

    signal.signal(signal.SIGTERM, noting)
    try:
        yield
    except Exception as exc:
        if _noted:
            from prefect.exceptions import TerminationSignal

            raise TerminationSignal(signal.SIGTERM) from exc
        if _received:
            raise Interrupted(_received[0]) from exc
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is noting:
            signal.signal(signal.SIGTERM, flows_own)


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def keep_handlers(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Restore the handlers of ``signals`` after the block: ``ray.init`` replaces SIGTERM's with
    a ``sys.exit``, which would take the signal from its owner (Prefect's cancellation bridge in
    a flow run, :func:`stop_on_signals` in ``detectflow run``)."""
    if not _is_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def descendants(pid: int) -> list[int]:
    """Every process ``pid`` started, at any depth (Linux: ``/proc``; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for child in pids:
        try:
            with open(f"/proc/{child}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(child)
    stack, found = [pid], []
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_descendants() -> None:
    """SIGKILL every process this one started (a local Ray's processes, Prefect's temporary
    server); a process that is gone meanwhile is skipped."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
