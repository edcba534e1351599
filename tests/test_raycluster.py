"""The local Ray a run starts: its warmed worker takes the first task, and its shutdown leaves
nothing running. One Ray of its own, started and stopped in a fresh interpreter, serves both
checks: the session's Ray (conftest) must not be the one stopped."""

import pytest
from fresh import run_fresh


@pytest.fixture(scope="module")
def local_ray():
    """A run's local Ray, from its start (the warm-up) to its shutdown, in a fresh interpreter."""
    return run_fresh("""
        import json, os, sys, ray
        from detectflow import orchestration, raycluster
        env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
        before = os.environ.get("PREFECT_API_URL")
        raycluster.connect(None, env)
        warmed = raycluster.await_warm_workers(timeout=120)

        @ray.remote(num_cpus=0)
        def pid():
            return (os.getpid(), os.environ.get("PREFECT_API_URL"),
                    ray.get_runtime_context().runtime_env)

        @ray.remote(num_cpus=0)
        def after_background_import():
            import gc, sys, threading, time
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                    t.name == "detectflow-import" for t in threading.enumerate()):
                time.sleep(0.05)
            return (os.getpid(), "ray.data" in sys.modules, gc.isenabled(),
                    gc.get_freeze_count())

        first = ray.get(pid.remote())
        node = ray._private.worker._global_node
        raylet = node.all_processes["raylet"][0].process.pid
        workers = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    name = f.read().split(b"\\0")[0].decode()
            except (OSError, ValueError):
                continue
            if ppid == raylet and name.startswith("ray::") and not name.endswith("Agent"):
                workers.append(int(entry))
        found = {"warmed": warmed, "first_task": first, "workers": workers,
                 "cpus": ray.cluster_resources()["CPU"],
                 "task_env": orchestration.task_runtime_env(env),
                 "driver_env": [before, os.environ.get("PREFECT_API_URL")],
                 "later": ray.get(after_background_import.remote())}

        # Every process of this Ray, the workers of the job among them, then its shutdown.
        pids = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
        pids["job workers"] = workers
        raycluster.shutdown()

        def running(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        # A worker exits by itself once its raylet is gone, so on a busy machine a moment later.
        sys.path.insert(0, "tests")  # only now: a job's workers get its driver's sys.path
        from settle import settled
        left = settled(lambda: [p for ps in pids.values() for p in ps if running(p)],
                       lambda left: not left, timeout=10)
        print(json.dumps(found | {
            "pids": pids, "initialized": ray.is_initialized(), "running": left}))
        """, timeout=180)


def test_shutdown_stops_every_process_of_a_local_ray(local_ray):
    out = local_ray
    # The monitor is the process stopped early; the others are stopped by Ray's own shutdown.
    assert {"monitor", "raylet", "gcs_server"} <= set(out["pids"]), out["pids"]
    assert out["pids"]["job workers"]  # a worker of the job too, not only Ray's own
    assert out["running"] == []
    assert out["initialized"] is False


def test_first_task_after_the_warm_up_runs_on_the_warmed_worker(local_ray):
    """Submitted while the warm-up still imports, it would start a cold worker instead. The
    job's environment is the workers' own, so the workers Ray starts with a node (one per CPU)
    serve it: no runtime_env of its own, and no worker beyond those."""
    out = local_ray
    assert len(out["warmed"]) == 1
    first_pid, api_url, runtime_env = out["first_task"]
    assert first_pid == out["warmed"][0]
    assert api_url == "http://127.0.0.1:9/api" and runtime_env == {}
    assert out["task_env"] is None  # our tasks add no runtime_env either
    assert out["driver_env"][0] == out["driver_env"][1]  # this process's environment as it was
    assert first_pid in out["workers"] and len(out["workers"]) <= out["cpus"], out
    later_pid, imported, collecting, frozen = out["later"]
    assert later_pid == out["warmed"][0]
    # ray.data, which only the detect task needs, was imported by the warmed worker meanwhile,
    # like the rest with collection paused (gcpause), which is back on afterwards.
    assert imported is True
    assert collecting is True
    assert frozen > 10_000


def test_loopback_bypasses_a_proxy_for_the_workers_of_a_local_api(monkeypatch):
    from detectflow.raycluster import worker_env

    assert "no_proxy" not in worker_env("http://127.0.0.1:4200/api")  # no proxy: nothing added
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "corp.example")
    local = worker_env("http://127.0.0.1:4200/api")
    assert local["no_proxy"] == local["NO_PROXY"] == "corp.example,127.0.0.1,localhost,::1"
    assert "no_proxy" not in worker_env("https://prefect.corp.example/api")  # the user's own
