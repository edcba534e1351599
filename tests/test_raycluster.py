"""The local Ray a run starts: its warmed worker takes the first task, and its shutdown leaves
nothing running."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A Ray of the script's own, never one that RAY_ADDRESS names.
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

# In a fresh interpreter: the session's Ray (conftest) must not be the one stopped.
SCRIPT = """
import json, os, ray
from detectflow import raycluster
raycluster.connect(None, {})
ray.get(raycluster.warm_workers(1))  # a worker of the job too, not only Ray's own processes
node = ray._private.worker._global_node
pids = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
raycluster.shutdown()

def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

print(json.dumps({"pids": pids, "running": [p for ps in pids.values() for p in ps if running(p)],
                  "initialized": ray.is_initialized()}))
"""


def test_shutdown_stops_every_process_of_a_local_ray():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The monitor is the process stopped early; the others are stopped by Ray's own shutdown.
    assert {"monitor", "raylet", "gcs_server"} <= set(out["pids"]), out["pids"]
    assert out["running"] == []
    assert out["initialized"] is False


WARM_SCRIPT = """
import json, os, ray
from detectflow import raycluster
raycluster.connect(None, {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
warmed = raycluster.await_warm_workers(timeout=120)

@ray.remote(num_cpus=0)
def pid():
    return os.getpid()

print(json.dumps({"warmed": warmed, "first_task": ray.get(pid.remote())}))
raycluster.shutdown()
"""


def test_first_task_after_the_warm_up_runs_on_the_warmed_worker():
    """Submitted while the warm-up still imports, it would start a cold worker instead."""
    proc = subprocess.run([sys.executable, "-c", WARM_SCRIPT], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warmed"]) == 1
    assert out["first_task"] == out["warmed"][0]
