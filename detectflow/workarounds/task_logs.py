"""prefect-ray's remote task function, then this worker's Prefect logs sent to the API.

Prefect sends logs in 2-second batches from a background thread and flushes them at interpreter
exit, which the workers of a run's own local Ray never reach: its shutdown kills them, and the
last stages' logs were lost. Only there (``FLUSH_LOGS`` in the workers' env) each task flushes
before it returns; a cluster's raylet ends a job's workers gracefully, and their exit flushes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prefect_ray import RayTaskRunner

from detectflow.workarounds import FLUSH_LOGS


def install(runner: RayTaskRunner) -> None:
    """prefect-ray submits ``runner._run_prefect_task`` to Ray for every task."""
    runner._run_prefect_task = run_prefect_task  # type: ignore[method-assign]


def run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
    """Replaces ``RayTaskRunner._run_prefect_task`` (a private staticmethod) on our runner."""
    try:
        return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
    finally:
        if os.environ.get(FLUSH_LOGS) == "1":
            flush_to_api()


def flush_to_api(timeout: float = 5.0) -> None:
    """Send this process's queued Prefect logs and events now; at most ``timeout`` per queue,
    and never an error: an API that is down must not fail the task whose logs these are."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - logging must never fail a task
            print(f"detectflow: could not flush {service.__name__}: {exc}", file=sys.stderr)
