"""Connecting to Ray, and warming its workers while the rest of the run starts.

Imports only Ray, so ``detectflow run`` can start Ray in its main thread while Prefect and torch
are still being imported in another (Ray's own processes die with the thread that started them,
so ``ray.init`` must stay in the thread that lives longest).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import ray

from detectflow import workarounds
from detectflow.errors import ConfigError
from detectflow.gcpause import collection_paused
from detectflow.interrupt import keep_handlers
from detectflow.models import factory_folder

log = logging.getLogger(__name__)

# What a worker imports before it can run one of our Prefect tasks: the flow module pulls in
# Prefect, every task and the pipeline (torch loads only in the inference actors).
WARM_MODULES = ("flows.detect_objects",)
# What only the detect task needs (its Ray Data driver): the warmed worker imports it in a thread
# once it is ready, while the first tasks run, instead of at the detect stage's start.
LATER_MODULES = ("ray.data",)
# One warmed worker: a second one measured slower on 2 cores (benchmarks/RESULTS.md, lever log).
WARM_WORKERS = 1
_warming: list[ray.ObjectRef] = []  # warm-up tasks not yet waited for (await_warm_workers)
_started_with: dict[str, dict[str, str]] = {}  # session name -> env of a Ray ``connect`` started


def existing_cluster_address(address: str | None) -> str | None:
    """The cluster to join: the flow's ``ray_address``, else Ray's own ``RAY_ADDRESS``."""
    return address or os.environ.get("RAY_ADDRESS") or None


def code_runtime_env(ship: bool = True, model: str = "") -> dict[str, Any]:
    """Ship our own packages, and the package of a ``package.module:factory`` model, to a
    cluster's workers (``py_modules``).

    Nodes of an existing cluster have the dependencies (the same image or environment) but not
    necessarily this checkout; Ray uploads the packages once, per content hash, and puts
    them on every worker's ``sys.path`` (the ``ship_code`` field turns it off). A local Ray's
    workers start in the driver's working directory with its ``sys.path``, so need none.
    """
    if not ship:
        return {}
    # Folders, not imported modules: ``detectflow run`` imports our code in another thread
    # meanwhile, and two threads importing one package can see it half-initialised.
    folders = [os.path.dirname(importlib.util.find_spec(name).origin)
               for name in ("detectflow", "tasks", "flows")]
    if model and (own := factory_folder(model)):
        folders.append(own)
    return {"py_modules": folders, "excludes": ["__pycache__", "*.pyc"]}


LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def loopback_no_proxy(environ: Mapping[str, str]) -> dict[str, str]:
    """``no_proxy``/``NO_PROXY`` with the loopback names added, where a proxy is set.

    Prefect's event client (the ``websockets`` library) sends even ``ws://127.0.0.1`` through
    ``https_proxy`` unless ``no_proxy`` names it, so behind a proxy the events of a run never
    reached a loopback API, and every task waited on the failed connections. Loopback never
    needs a proxy. Empty when nothing needs adding.
    """
    if not any(environ.get(name) for name in PROXY_VARS):
        return {}
    names = [n.strip() for n in (environ.get("no_proxy") or environ.get("NO_PROXY") or "")
             .split(",") if n.strip()]
    if "*" in names or all(host in names for host in LOOPBACK):
        return {}
    value = ",".join(names + [host for host in LOOPBACK if host not in names])
    return {"no_proxy": value, "NO_PROXY": value}


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
        if urllib.parse.urlsplit(api_url).hostname in LOOPBACK:
            env |= loopback_no_proxy(os.environ)
    if s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = s3_endpoint_url
    return env


def alive_nodes() -> int:
    """Nodes of the connected cluster that are up now (``ray.nodes()`` keeps dead ones too)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def connect(address: str | None, env: dict[str, str], *, ship_code: bool = True,
            dashboard: bool = False, model: str = ""):
    """Connect to ``address`` (``RAY_ADDRESS`` when empty, else a new local Ray) unless this
    process is connected already. Ray's context when it connected here (and so must disconnect),
    else None.

    Every worker, and the Ray Data tasks and actors started from them, gets ``env``: on a
    cluster as the job's ``runtime_env``, on a new local Ray as the environment its processes
    start with (``job_env`` tells which). One worker starts importing our code at once.
    """
    if ray.is_initialized():
        return None
    if existing := existing_cluster_address(address):
        runtime_env = {"env_vars": env} | code_runtime_env(ship_code, model)
        log.info("connecting to Ray at %s", existing)
        try:
            with keep_handlers():
                context = ray.init(address=existing, runtime_env=runtime_env,
                                   namespace="detectflow")
        except ConnectionError as exc:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {existing} ({str(exc).splitlines()[0]})"
                "; check the address, and for a cluster with token authentication set "
                "RAY_AUTH_MODE=token with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            ) from None
    else:
        context = start_local(env, include_dashboard=dashboard)
    warm_workers(WARM_WORKERS)
    return context


def start_local(env: dict[str, str], **init_options: Any):
    """Start a new local Ray of our own (never a `ray start` cluster found on this machine)
    whose every worker has ``env``; Ray's context. ``init_options`` go to ``ray.init``: without
    the dashboard unless asked for (seconds of CPU at start-up on a small machine).

    The environment, not a runtime_env: Ray starts one worker per CPU with its own
    environment, and those serve only jobs without env_vars of their own; otherwise they sit
    idle while cold ones start for the job (benchmarks/RESULTS.md, lever log). Its workers die
    with it, so tasks send their logs before returning where that shortcut applies
    (workarounds.task_logs).
    """
    local_env = env | {workarounds.FLUSH_LOGS: "1"}
    options = {"namespace": "detectflow", "include_dashboard": False} | init_options
    with keep_handlers(), _environment(local_env):
        context = ray.init(address="local", **options)
    _started_with[ray.get_runtime_context().get_session_name()] = local_env
    return context


def job_env() -> dict[str, str]:
    """The environment variables every worker of the connected job has been given."""
    context = ray.get_runtime_context()
    if (env := _started_with.get(context.get_session_name())) is not None:
        return dict(env)
    return dict(context.runtime_env.get("env_vars") or {})


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while Ray's processes are started (they inherit
    it), and this process's own environment as it was afterwards."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shutdown() -> None:
    """``ray.shutdown()``; for a local Ray, its autoscaler monitor first where that shortcut
    applies (``workarounds.ray_shutdown``). A cluster we merely joined keeps all its processes."""
    if workarounds.applies("ray_shutdown"):
        from detectflow.workarounds.ray_shutdown import stop_monitor

        stop_monitor()
    _warming.clear()
    _started_with.clear()
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
    cold worker that imports everything again, later than the warm one is ready: a cold worker
    would do the same imports from the start.
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
