"""Start-up shortcuts that touch private names of Ray, Prefect or torch, fenced in one place.

Each one saves seconds of a run's start (benchmarks/RESULTS.md, "Lever log") and was verified on
exactly the versions in ``VERIFIED``. Anywhere else it steps aside: the run takes the plain public
path and says so in one WARNING line. The core library (listing, imaging, predictor, pipeline,
publish, sample, schema, storage, models, config) never imports this package; the CLI and the
orchestration layer decide whether a shortcut applies (tests/test_workarounds.py).

``DETECTFLOW_TEST_WORKAROUNDS=off`` turns every one off, for the test that compares detections
with and without them.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from importlib import metadata

log = logging.getLogger("detectflow.workarounds")

# name: (what it does, the distributions and versions it was verified on)
VERIFIED: dict[str, tuple[str, dict[str, str]]] = {
    "torchvision_import": (
        "inference actors, the weights' check and `detectflow run` (for default weights) "
        "import torchvision without loading TorchDynamo",
        {"torch": "2.14.1", "torchvision": "0.29.1", "ray": "2.60.0"}),
    "api_server": (
        "detectflow run starts Prefect's temporary API server before its own imports",
        {"prefect": "3.9.1"}),
    "ray_shutdown": (
        "a local Ray's autoscaler monitor is stopped first, without its one-second wait",
        {"ray": "2.60.0"}),
    "task_log_flush": (
        "tasks on a run's own local Ray send their logs before Ray's shutdown kills the workers",
        {"prefect": "3.9.1", "prefect-ray": "0.6.0"}),
}
OFF_ENV = "DETECTFLOW_TEST_WORKAROUNDS"
# Set by raycluster.connect in the workers of a local Ray that the run starts itself.
FLUSH_LOGS = "DETECTFLOW_FLUSH_TASK_LOGS"
_warned: set[str] = set()


@cache
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist).split("+", 1)[0]  # a local build tag (+cu128) is the same
    except metadata.PackageNotFoundError:
        return None


def mismatches(name: str) -> list[str]:
    """``dist found X, verified on Y`` for each version that differs from the verified one."""
    found = {dist: _version(dist) for dist in VERIFIED[name][1]}
    return [f"{dist} {found[dist]} (verified on {want})"
            for dist, want in VERIFIED[name][1].items() if found[dist] != want]


def applies(name: str) -> bool:
    """Whether the shortcut ``name`` runs here; one WARNING per process when it steps aside."""
    if os.environ.get(OFF_ENV, "").lower() in ("0", "off", "false", "no"):
        return False
    if not (found := mismatches(name)):
        return True
    if name not in _warned:
        _warned.add(name)
        log.warning("detectflow: not using the start-up shortcut %r (%s) on %s; taking the "
                    "plain path", name, VERIFIED[name][0], ", ".join(found))
    return False


def actor_runtime_env() -> dict[str, dict[str, str]]:
    """What the inference actors add to the job's ``runtime_env``: Ray's setup hook, run in
    their workers before the actor starts, imports torchvision the fast way; the actor's own
    plain import then finds it loaded. Ray's public ``worker_process_setup_hook`` is job-wide
    only, so the hook goes in the variable Ray turns it into (private); nothing where this
    shortcut does not apply."""
    if not applies("torchvision_import"):
        return {}
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR:
                         "detectflow.workarounds.torchvision_import.preload"}}
