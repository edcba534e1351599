"""Read the Prefect API until what a test checks has arrived: the server records task-run states
from events, and workers ship logs in batches, so both can land after the flow has returned."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def settled(read: Callable[[], T], ready: Callable[[T], bool], timeout: float = 60.0) -> T:
    """``read()`` until ``ready`` holds for its result or ``timeout`` passes; the last result
    (the test's own assertion then says what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        result = read()
        if ready(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def completed_task_runs(client, flow_run_id, count: int) -> list:
    """The flow run's task runs, read until ``count`` of them are recorded, each Completed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    return settled(lambda: client.read_task_runs(flow_run_filter=flow_run_filter),
                   lambda runs: len(runs) >= count
                   and all(t.state and t.state.is_completed() for t in runs))


def flow_run_logs(client, flow_run_id) -> list:
    """The flow run's logs as the API holds them now."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run = LogFilterFlowRunId(any_=[flow_run_id])
    return client.read_logs(log_filter=LogFilter(flow_run_id=flow_run))


def session_processes(sid: int) -> list[str]:
    """Processes of session ``sid`` (a command started in a session of its own, and everything
    it started), as 'pid name'; zombies aside."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != b"Z":
                    found.append(f"{entry.name} {(entry / 'comm').read_text().strip()}")
            except (OSError, IndexError, ValueError):
                pass
    return found
