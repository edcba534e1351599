"""Prefect ⇄ Ray glue: one Prefect API for every task run, Ray connected where the flow says.

Measured pitfall (prefect 3.9.1, prefect-ray 0.6.0, ray 2.60.0): with no ``PREFECT_API_URL`` each
Ray worker that runs a task starts its *own* temporary Prefect server, so the flow's API never sees
its task runs. We hand the flow's own API URL to every Ray worker through ``runtime_env``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from typing import Any

import ray
from prefect.task_runners import TaskRunner
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from detectflow import raycluster, workarounds
from detectflow.errors import is_retryable
from detectflow.raycluster import alive_nodes, code_runtime_env, existing_cluster_address

__all__ = ["alive_nodes", "code_runtime_env", "existing_cluster_address"]


WAIT_STEP = 0.25  # seconds; how soon a stopped run notices


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never a user's mistake."""
    exc = getattr(state, "data", None)
    return is_retryable(exc) if isinstance(exc, BaseException) else True


def prefect_api_url() -> str | None:
    """The API this process's flow run reports to (the ephemeral server's URL included)."""
    from prefect.client.orchestration import get_client

    try:
        return str(get_client(sync_client=True).api_url).rstrip("/")
    except Exception:  # no API configured and ephemeral mode disabled
        return None


def worker_env(s3_endpoint_url: str | None = None) -> dict[str, str]:
    """``raycluster.worker_env`` for this process's flow run (its API URL)."""
    return raycluster.worker_env(prefect_api_url(), s3_endpoint_url)


def completed(future: Any) -> Any:
    """Wait for a task future; raise its own error if it failed, else return it.

    Passing the (finished) future on to the next task keeps the dependency edge in Prefect's UI.
    The wait is in short steps: a signal's handler runs only between them (``interrupt``), and a
    run stopped meanwhile cancels the task, with the Ray Data job it drives.
    """
    ref = getattr(future, "wrapped_future", None)
    if isinstance(ref, ray.ObjectRef):
        # A Python future's lock, not ``ray.wait``: a signal handler that raises inside Ray's own
        # wait surfaces as a SystemError, not as the handler's exception (Prefect's cancellation).
        done = ref.future()
        try:
            while not concurrent.futures.wait([done], timeout=WAIT_STEP).done:
                pass
        except BaseException:
            with contextlib.suppress(Exception):
                # force: the worker is stopped, and with it the actors its Ray Data job owns
                ray.cancel(ref, force=True, recursive=True)
            raise
    future.wait()
    future.result()
    return future


class LazyRayTaskRunner(RayTaskRunner):
    """RayTaskRunner that leaves connecting to the flow body.

    prefect-ray connects at flow start, before parameters are known; connecting in the body lets
    the ``ray_address`` *parameter* (a field of the UI form) choose the cluster.
    """

    def __enter__(self):  # noqa: D105 - skip RayTaskRunner's eager ray.init
        TaskRunner.__enter__(self)
        if workarounds.applies("task_log_flush"):
            from detectflow.workarounds import task_logs

            task_logs.install(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:  # noqa: D105 - never shut down Ray here
        TaskRunner.__exit__(self, *exc_info)


@contextlib.contextmanager
def ray_cluster(cfg: Any, env: dict[str, str]) -> Iterator[dict[str, float]]:
    """Connect to ``cfg.ray_address`` (``RAY_ADDRESS`` when empty, else a new local Ray).

    Yields the cluster's resources. An existing connection (``detectflow run`` connects before
    the flow starts; a test may too) is reused and left open; ``ray.shutdown()`` at the end stops
    a local Ray we started, and only disconnects from an existing cluster, which keeps running.
    """
    connected_here = raycluster.connect(cfg.ray_address, env, ship_code=cfg.ship_code,
                                        dashboard=cfg.ray_dashboard, model=cfg.model) is not None
    try:
        raycluster.await_warm_workers()  # so that the first task runs on the warmed worker
        yield ray.cluster_resources()
    finally:
        if connected_here:
            raycluster.shutdown()


@contextlib.contextmanager
def task_options(env: dict[str, str], num_cpus: float = 0) -> Iterator[None]:
    """Ray options for our Prefect tasks: they orchestrate (Ray Data does the heavy work), so
    they hold no CPU that decoding or inference could use, and they report to the flow's API.

    ``env`` goes in a per-task ``runtime_env`` only when the job's own lacks it: Ray keeps a
    separate worker pool per runtime_env, so a redundant one (measured) would skip the workers
    that ``raycluster.warm_workers`` already warmed and start cold ones.
    """
    task_env = task_runtime_env(env)
    extra = {"runtime_env": task_env} if task_env else {}
    with remote_options(num_cpus=num_cpus, **extra):
        yield


def task_runtime_env(env: dict[str, str]) -> dict[str, Any] | None:
    """The ``runtime_env`` our Prefect tasks add to the job's: ``env`` unless the job has it."""
    job_env = raycluster.job_env()
    return None if all(job_env.get(k) == v for k, v in env.items()) else {"env_vars": env}
