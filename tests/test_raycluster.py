"""The local Ray a run starts: its warmed worker takes the first task, and its shutdown leaves
nothing running. Each check starts a Ray of its own in a fresh interpreter: the session's Ray
(conftest) must not be the one stopped."""

from fresh import run_fresh


def test_shutdown_stops_every_process_of_a_local_ray():
    out = run_fresh("""
        import json, os, ray
        from detectflow import raycluster
        raycluster.connect(None, {})
        ray.get(raycluster.warm_workers(1))  # a worker of the job too, not only Ray's own
        node = ray._private.worker._global_node
        pids = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
        raycluster.shutdown()

        def running(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        print(json.dumps({"pids": pids, "initialized": ray.is_initialized(),
                          "running": [p for ps in pids.values() for p in ps if running(p)]}))
        """, timeout=180)
    # The monitor is the process stopped early; the others are stopped by Ray's own shutdown.
    assert {"monitor", "raylet", "gcs_server"} <= set(out["pids"]), out["pids"]
    assert out["running"] == []
    assert out["initialized"] is False


def test_first_task_after_the_warm_up_runs_on_the_warmed_worker():
    """Submitted while the warm-up still imports, it would start a cold worker instead."""
    out = run_fresh("""
        import json, os, ray
        from detectflow import raycluster
        raycluster.connect(None, {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
        warmed = raycluster.await_warm_workers(timeout=120)

        @ray.remote(num_cpus=0)
        def pid():
            return os.getpid()

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
        print(json.dumps({"warmed": warmed, "first_task": first,
                          "later": ray.get(after_background_import.remote())}))
        raycluster.shutdown()
        """, timeout=180)
    assert len(out["warmed"]) == 1
    assert out["first_task"] == out["warmed"][0]
    later_pid, imported, collecting, frozen = out["later"]
    assert later_pid == out["warmed"][0]
    # ray.data, which only the detect task needs, was imported by the warmed worker meanwhile,
    # like the rest with collection paused (gcpause), which is back on afterwards.
    assert imported is True
    assert collecting is True
    assert frozen > 10_000
