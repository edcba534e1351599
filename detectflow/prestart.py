"""Inference actors that start in workers Ray prestarted while the run was still listing images.

An inference actor's start is mostly imports in a new process: Ray's worker, ``ray.data`` (with
pandas), torch and torchvision (on the H200's host ~5 s of the ~9 s before the GPU's first
batch; benchmarks/RESULTS.md). Ray Data creates its actors only once the detect stage executes,
so all of that used to wait for the stages before it. Now:

1. The Detector actors carry a runtime env whose worker setup hook (Ray's
   ``worker_process_setup_hook``, given as its environment variable so that it also works on an
   actor rather than only a job) runs :func:`preload` in a new worker before it takes any work:
   the imports, then the run's model built on the CPU with its weights loaded.
2. As soon as Ray is up (the flow, right after connecting), the run asks the local raylet to
   prestart as many workers as the pool has actors, with exactly that runtime env (the
   raylet's ``PrestartWorkers`` RPC, which Ray 2.60 calls only from C++). The raylet gives an
   idle worker that has run nothing to the next actor whose runtime env hashes the same, so
   the actors land in workers that did their imports while ``list_images`` ran
   (tests/test_prestart.py checks the process ids).

The prestart only moves CPU work earlier, so it pays only where the start-up leaves cores idle:
measured on 2 cores with 2 CPU actors (benchmarks/RESULTS.md), the detect stage took 2.16 s less
and the stages before it 2.20 s more, wall time unchanged. By default (``auto``) a run on one
node that has ``SPARE_CPUS`` more CPUs than actors (a GPU host) does both; others neither, so
they run as before. ``DETECTFLOW_PRESTART=1`` always, ``0`` never.

Both halves fail soft: without the prestart an actor starts a worker of its own and the hook
imports the same modules there; if Ray's internals moved, the run starts its actors cold. Not
done: multi-node clusters (actors may land on any node; only one machine's raylet is asked),
and CUDA (a prestarted worker has no GPU assigned yet; the actor creates its CUDA context after
Ray has set ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

# Ray's own name for the setup hook's variable (ray._private.ray_constants); a module path as
# its value is imported and called by ``default_worker.py`` before the worker's main loop.
HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
HOOK = "detectflow.prestart.preload"
# What an inference actor imports before its first batch: Ray Data's actor class, torch, and
# torchvision without TorchDynamo (torchvision_import) through the predictor's model code.
ACTOR_MODULES = ("ray.data", "torch", "detectflow.predictor", "detectflow.models")
# A prestarted worker stays this long even when idle (Ray would otherwise stop idle workers
# beyond one per CPU after a second); one that is never used dies with the job.
KEEP_ALIVE_S = 600
# Set by preload() in the worker: when it ran and for how long, for tests and benchmarks.
PRELOADED_ENV = "DETECTFLOW_PRELOADED"
# The run's model in the actors' runtime env (model, weights, score threshold, as JSON): the
# hook builds it on the CPU and loads its weights, and the actor only moves it to its device.
MODEL_ENV = "DETECTFLOW_PRELOAD_MODEL"
# CPUs a run's own start-up keeps busy meanwhile: Prefect's flow engine and the first tasks, Ray.
SPARE_CPUS = 2
# Ray Data's three helper actors start early on nodes with at least this many CPUs.
HELPERS_MIN_CPUS = 4


def mode() -> str:
    """``DETECTFLOW_PRESTART``: ``on`` (1), ``off`` (0) or ``auto`` (anything else, the default)."""
    value = os.environ.get("DETECTFLOW_PRESTART", "auto").lower()
    return "off" if value in ("0", "false", "no") else "on" if value in ("1", "true", "yes") \
        else "auto"


def enabled() -> bool:
    return mode() != "off"


def _wanted(cpus: float, needed: float) -> bool:
    """On, or ``auto`` on a node of at least ``needed`` CPUs."""
    setting = mode()
    return setting == "on" or (setting == "auto" and cpus >= needed)


def worth_prestarting(cpus: float, actors: int) -> bool:
    """Whether ``actors`` workers' imports would run on cores the start-up leaves idle."""
    return _wanted(cpus, actors + SPARE_CPUS)


def helpers_early(cpus: float, nodes: int = 1) -> bool:
    """Whether the warmed worker starts Ray Data's helper actors (``start_ray_data_helpers``)
    on a one-node cluster of ``cpus`` CPUs: three new processes, like the prestart only worth
    it with cores to spare. (Ray Data puts them on its driver's node; on a larger cluster the
    warmed worker may be elsewhere.)"""
    return nodes == 1 and _wanted(cpus, HELPERS_MIN_CPUS)


def start_ray_data_helpers() -> None:
    """Create Ray Data's helper actors now, as it does (get or create, by name) when a dataset
    first executes: its stats actor, autoscaling coordinator and actor location tracker.

    Each is a detached actor in a new worker that imports ``ray.data`` (~2.5 s on the H200's
    host), and the detect stage's first batch waited for them: traced on this VM with the
    inference actors prestarted, they were the last to be ready. The warmed Ray worker calls
    this once it has imported ``ray.data`` (``raycluster``); Ray Data then finds them running.
    On a long-lived cluster they exist after its first run, and this finds them too.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.data._internal.execution.node_trackers.actor_location import (
        get_or_create_actor_location_tracker,
    )
    from ray.data._internal.stats import get_or_create_stats_actor

    for create in (get_or_create_stats_actor, get_or_create_autoscaling_coordinator,
                   get_or_create_actor_location_tracker):
        create()


def applies(plan: Any) -> bool:
    """Whether a run with this ``pipeline.ResourcePlan`` prestarts its actors' workers (and so
    gives its actors the hook): one node, cores to spare, and a hook a new worker can import.
    The flow, which prestarts, and the detect task, which creates the actors, decide alike from
    the same plan."""
    return (enabled() and plan.nodes == 1
            and worth_prestarting(plan.cluster_cpus, plan.num_actors) and hook_importable())


@functools.cache
def hook_importable(package: str = "detectflow") -> bool:
    """Whether a new Ray worker here finds ``package`` before it has run anything.

    Ray puts the driver's own search path (its directory: a checkout run without installing)
    on a worker's ``sys.path`` only when the worker takes its first task, after the setup hook;
    a hook that cannot be imported makes Ray stop the worker, so no actor could start (seen: a
    run from a checkout with the package uninstalled). An installed package, ``PYTHONPATH`` and
    Ray's ``py_modules`` are there from the start. Checked as such a worker starts: a fresh
    interpreter with this process's environment, outside the current directory (~50 ms, once
    per process).
    """
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) is None)"
    try:
        return subprocess.run([sys.executable, "-c", probe], cwd=os.path.abspath(os.sep),
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_preloaded: dict[str, Any] = {}  # the model preload() built: {"key": ..., "model": ...}


def preload() -> None:
    """Ray's worker setup hook: import what an inference actor needs and, when its runtime env
    names the run's model (``MODEL_ENV``), build it on the CPU with its weights loaded, as
    ``models.load_model`` does before moving it to the actor's device. Never raises, since a
    hook that fails makes Ray stop the worker; the actor then does (and reports) it itself."""
    start = time.time()
    try:
        import importlib

        from detectflow.gcpause import collection_paused
        from detectflow.torchvision_import import import_torchvision

        with collection_paused():
            for name in ACTOR_MODULES:
                importlib.import_module(name)
            import_torchvision()
            if spec := os.environ.get(MODEL_ENV):
                from detectflow import models

                wanted = json.loads(spec)
                resolved = models.resolve_weights(wanted["model"], wanted["weights"],
                                                  checksum=False)
                _preloaded.update(key=spec, model=models.load_model(
                    wanted["model"], resolved, wanted["score_threshold"], "cpu"))
    except Exception:  # noqa: BLE001
        log.debug("preloading the inference actor's modules or model failed", exc_info=True)
    os.environ[PRELOADED_ENV] = f"{start:.3f}:{time.time() - start:.3f}"


def model_spec(model: str, weights: str | None, score_threshold: float) -> str:
    """The run's model as ``MODEL_ENV`` holds it (one string: part of the runtime env's hash)."""
    return json.dumps({"model": model, "weights": weights, "score_threshold": score_threshold},
                      separators=(",", ":"), sort_keys=True)


def take_preloaded(model: str, weights: str | None, score_threshold: float) -> Any | None:
    """The model preload() built in this worker if it is this one (on the CPU, in eval mode),
    once; else None."""
    if _preloaded.get("key") != model_spec(model, weights, score_threshold):
        return None
    net = _preloaded["model"]
    _preloaded.clear()
    return net


def actor_runtime_env(parent: dict[str, Any], model: str | None = None) -> dict[str, Any] | None:
    """The runtime env the inference actors add to ``parent`` (their creator's), with the run's
    ``model`` (``model_spec``) for the hook to load, or None: when turned off, or when
    ``parent`` already names a setup hook (the user's, which stays)."""
    if not enabled() or HOOK_ENV in (parent.get("env_vars") or {}):
        return None
    return {"env_vars": {HOOK_ENV: HOOK, **({MODEL_ENV: model} if model else {})}}


def merged(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The runtime env Ray gives a task or actor created with ``child`` by a process whose own
    is ``parent``, merged as Ray's core worker merges them: env vars merged, the child's other
    fields replacing the parent's."""
    env = {**parent, **child}
    if "env_vars" in parent or "env_vars" in child:
        env["env_vars"] = {**(parent.get("env_vars") or {}), **(child.get("env_vars") or {})}
    return env


def merged_runtime_env(parent: dict[str, Any], child: dict[str, Any]) -> str:
    """``merged`` written as Ray's core worker writes it (compact JSON, keys sorted): the raylet
    matches idle workers to an actor by a hash of exactly this string."""
    return json.dumps(merged(parent, child), separators=(",", ":"), sort_keys=True)


def prestart_workers(count: int, serialized_runtime_env: str,
                     keep_alive_s: int = KEEP_ALIVE_S) -> None:
    """Ask the local raylet to start ``count`` workers of this job with that runtime env now."""
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import (
        common_pb2,
        node_manager_pb2,
        node_manager_pb2_grpc,
        runtime_environment_pb2,
    )

    worker = ray._private.worker.global_worker
    node = worker.node
    channel = init_grpc_channel(f"{node.node_ip_address}:{node.node_manager_port}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.Language.PYTHON,
                job_id=worker.current_job_id.binary(),
                runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(
                    serialized_runtime_env=serialized_runtime_env),
                keep_alive_duration_secs=keep_alive_s,
                num_workers=count,
            ),
            timeout=10,
        )
    finally:
        channel.close()


def current_runtime_env() -> dict[str, Any]:
    """This Ray driver's or worker's own runtime env, as a plain dict."""
    import ray

    return json.loads(ray.get_runtime_context().get_runtime_env_string() or "{}")


def prestart_detectors(count: int, parent: dict[str, Any], model: str | None = None) -> int:
    """Prestart ``count`` workers for inference actors of ``model`` (``model_spec``) created by
    a process whose runtime env is ``parent`` (the detect task's); how many were asked for.
    Never raises: this only saves time."""
    import ray

    child = actor_runtime_env(parent, model)
    if child is None or count < 1 or not ray.is_initialized():  # (its calls would start one)
        return 0
    try:
        prestart_workers(count, merged_runtime_env(parent, child))
    except Exception as exc:  # noqa: BLE001 - Ray's internals moved: the actors start cold
        log.info("could not prestart the inference actors' workers (%s); they start cold",
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0
    log.debug("prestarted %d worker(s) for the inference actors", count)
    return count
