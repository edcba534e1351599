"""Connecting to Ray, and warming its workers while the rest of the run starts.

Imports only Ray, so ``detectflow run`` can start Ray in its main thread while Prefect and torch
are still being imported in another (Ray's own processes die with the thread that started them,
so ``ray.init`` must stay in the thread that lives longest).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from typing import Any

import ray

from detectflow import prestart, raystart
from detectflow.errors import ConfigError
from detectflow.gcpause import collection_paused

log = logging.getLogger(__name__)

# What a worker imports before it can run one of our Prefect tasks: the flow module pulls in
# Prefect, every task and the pipeline (torch loads only in the inference actors).
WARM_MODULES = ("flows.detect_objects",)
# What only the detect task needs (its Ray Data driver, ~1 CPU-s): the warmed worker imports it
# in a thread once it is ready, while the first tasks run, instead of at the detect stage's start
# (measured: the detect stage 0.26 s shorter on the means of seven alternating runs).
LATER_MODULES = ("ray.data",)
_warming: list[ray.ObjectRef] = []  # warm-up tasks not yet waited for (await_warm_workers)


def existing_cluster_address(address: str | None) -> str | None:
    """The cluster to join: the flow's ``ray_address``, else Ray's own ``RAY_ADDRESS``."""
    return address or os.environ.get("RAY_ADDRESS") or None


def code_runtime_env() -> dict[str, Any]:
    """Ship our own packages to a cluster's workers (``py_modules``).

    Nodes of an existing cluster have the dependencies (the same image or environment) but not
    necessarily this checkout; Ray uploads the three packages once, per content hash, and puts
    them on every worker's ``sys.path``. ``DETECTFLOW_SHIP_CODE=0`` turns it off for clusters
    whose image already contains detectflow.
    """
    if not _flag("DETECTFLOW_SHIP_CODE", "1"):
        return {}
    # Folders, not imported modules: ``detectflow run`` imports our code in another thread
    # meanwhile, and two threads importing one package can see it half-initialised.
    folders = [os.path.dirname(importlib.util.find_spec(name).origin)
               for name in ("detectflow", "tasks", "flows")]
    return {"py_modules": folders, "excludes": ["__pycache__", "*.pyc"]}


def _flag(name: str, default: str = "") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes")


def worker_env(api_url: str | None, s3_endpoint_url: str | None = None) -> dict[str, str]:
    """Environment every Ray worker (and the Ray Data tasks and actors they start) needs: the
    flow's Prefect API URL, so task runs land there, and the S3 endpoint when one was chosen.
    ``detectflow run`` gives it to the job and the flow to its tasks: one definition keeps the
    two equal, which lets the tasks run on the job's (warmed) workers.

    Never credentials: ``runtime_env`` is shown in Ray's dashboard. Workers find credentials
    the standard AWS way (environment inherited from the node, profile, instance role).
    """
    env = {}
    if api_url:
        env["PREFECT_API_URL"] = api_url.rstrip("/")
    if s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = s3_endpoint_url
    if prestart_mode := os.environ.get("DETECTFLOW_PRESTART"):
        # The flow prestarts, the detect task (on any worker) gives the actors their runtime
        # env: both must read the same setting (detectflow.prestart).
        env["DETECTFLOW_PRESTART"] = prestart_mode
    return env


def alive_nodes() -> int:
    """Nodes of the connected cluster that are up now (``ray.nodes()`` keeps dead ones too)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


# Set in the workers of a local Ray this process starts. Its shutdown kills them before
# Prefect's 2-second log batches leave (measured: validate_sample's, write_parquet's and most of
# detect's logs lost), while a cluster's raylet ends a finished job's workers gracefully and their
# exit flushes the logs (measured: none lost). See ``orchestration.LazyRayTaskRunner``.
FLUSH_LOGS = "DETECTFLOW_FLUSH_TASK_LOGS"


def connect(address: str | None, env: dict[str, str]):
    """Connect to ``address`` (``RAY_ADDRESS`` when empty, else a new local Ray) unless this
    process is connected already. Ray's context when it connected here (and so must disconnect),
    else None.

    ``env`` becomes the job's ``runtime_env`` (every worker, and the Ray Data tasks and actors
    started from them, inherit it). ``DETECTFLOW_WARM_WORKERS`` (default 1) workers start
    importing our code at once.
    """
    if ray.is_initialized():
        return None
    runtime_env: dict[str, Any] = {"env_vars": env}
    if existing := existing_cluster_address(address):
        runtime_env |= code_runtime_env()
        log.info("connecting to Ray at %s", existing)
        try:
            context = ray.init(address=existing, runtime_env=runtime_env,
                               namespace="detectflow")
        except ConnectionError as exc:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {existing} ({str(exc).splitlines()[0]})"
                "; check the address, and for a cluster with token authentication set "
                "RAY_AUTH_MODE=token with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            ) from None
    else:
        # "local": a new Ray of our own, never a `ray start` cluster found on this machine.
        # Without its dashboard (~4 s of CPU at start-up on 2 cores, measured) unless asked for.
        # Nor with Ray's prestarted default workers, nor two one-second waits (``raystart``).
        # Its workers die with it, so each task sends its logs before returning (FLUSH_LOGS).
        runtime_env["env_vars"] = env | {FLUSH_LOGS: "1"}
        with raystart.prompt_node_lookup():
            context = ray.init(address="local", runtime_env=runtime_env, namespace="detectflow",
                               include_dashboard=_flag("DETECTFLOW_RAY_DASHBOARD"),
                               _system_config=dict(raystart.SYSTEM_CONFIG))  # Ray adds to it
    warm_workers(int(os.environ.get("DETECTFLOW_WARM_WORKERS", "1")))
    return context


def shutdown() -> None:
    """``ray.shutdown()``, less the second it spends on Ray's autoscaler monitor.

    Ray stops a local cluster's processes one at a time, raylet and GCS first, giving each a
    SIGTERM and one second. The monitor's SIGTERM handler then reports its "failure" to the GCS
    that is already gone, so it always takes the whole second before Ray kills it (measured
    1.01 s of a 1.35 s shutdown, Ray 2.60). The monitor only scales a cluster, and a local one
    never scales: it is killed first, the rest stop as Ray stops them. Only for a Ray that this
    process started; a cluster we merely joined keeps all its processes.
    """
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node else []
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # Ray's internals moved: its own shutdown still stops everything
        log.debug("could not stop Ray's autoscaler monitor early", exc_info=True)
    _warming.clear()
    ray.shutdown()


@ray.remote(num_cpus=0, max_retries=0)
def _import_our_code() -> int:
    _import(WARM_MODULES)
    threading.Thread(target=_import_later, daemon=True, name="detectflow-import").start()
    return os.getpid()


def _import(modules: tuple[str, ...], freeze: bool = True) -> None:
    with collection_paused(freeze=freeze):
        for name in modules:
            importlib.import_module(name)


def _import_later() -> None:
    try:
        _import(LATER_MODULES, freeze=False)  # the worker runs a task meanwhile
        if prestart.helpers_early(ray.cluster_resources().get("CPU", 0), alive_nodes()):
            prestart.start_ray_data_helpers()
    except Exception:  # the task that needs it imports it again and reports the error
        log.debug("a background import failed", exc_info=True)


def warm_workers(count: int) -> list[ray.ObjectRef]:
    """Fire-and-forget: ``count`` workers import our code now, while the driver is still busy.

    Ray keeps a finished worker idle in its pool and hands it the next task (or actor) of the same
    job and runtime_env, so the first Prefect task and the first decode task skip those imports.
    Holds no CPU; a failure here only means a cold worker later.
    """
    _warming[:] = [_import_our_code.remote() for _ in range(max(0, count))]
    return list(_warming)


def await_warm_workers(timeout: float = 10.0) -> list[int]:
    """Wait (at most ``timeout`` s) until the workers ``warm_workers`` started are ready; the
    process ids of those that are.

    A worker still importing is busy, so a task submitted meanwhile makes Ray start another,
    cold worker that imports everything again: measured on 2 cores, the first task then began
    1.8-1.9 s after the flow instead of 1.0-1.1 s. Waiting for the warm one is never slower
    than that: a cold worker would do the same imports from the start.
    """
    refs, _warming[:] = list(_warming), []
    if not refs or not ray.is_initialized():
        return []
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    pids = []
    for ref in ready:
        try:
            pids.append(ray.get(ref))
        except Exception:  # a failed warm-up only means a cold worker later
            log.debug("a worker warm-up failed", exc_info=True)
    return pids
