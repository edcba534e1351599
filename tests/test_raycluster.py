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


def test_a_local_ray_starts_without_its_one_second_waits():
    """``raystart``: the node lookup of ``ray.init`` is swapped only while it runs, the node
    table answers for the new node at once (and not for an unknown one, whose lookup then fails
    the way Ray's own does), and the raylet got the socket retries in 20 ms steps."""
    out = run_fresh("""
        import json, ray
        from ray._private import services
        from detectflow import raycluster, raystart
        original = services.get_node
        raycluster.connect(None, {})
        node = ray._private.worker._global_node
        found = raystart.wait_registered(node.gcs_address, node.node_id)
        unknown = raystart.wait_registered(node.gcs_address, "ab" * 28, timeout=0.3)
        config = ray._private.state.state.get_system_config()
        raystart.RAYLET_START_WAIT_S = 0.3  # a node that never registers: Ray's own error
        try:
            with raystart.prompt_node_lookup():
                services.get_node(node.gcs_address, "ab" * 28)
            missing = "returned"
        except RuntimeError as exc:
            missing = str(exc)
        print(json.dumps({"restored": services.get_node is original, "found": found,
                          "unknown": unknown, "missing": missing,
                          "config": {k: config.get(k) for k in raystart.SYSTEM_CONFIG}}))
        raycluster.shutdown()
        """, timeout=180)
    assert out["restored"] is True
    assert out["found"] is True
    assert out["unknown"] is False
    assert "has not registered" in out["missing"]
    assert out["config"] == {"prestart_worker_first_driver": False,
                             "raylet_client_connect_timeout_milliseconds": 20,
                             "raylet_client_num_connect_attempts": 500}
