"""Inference actors start in workers prestarted while the run lists its images
(``detectflow.prestart``): a real local Ray, the real CLI, process ids read from the OS."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fresh import run_fresh
from ray_nodes import LocalCluster

from benchmarks.measure import descendants
from detectflow import prestart

ROOT = Path(__file__).resolve().parent.parent
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def test_the_merged_runtime_env_is_the_one_ray_gives_a_child():
    """The raylet matches an idle worker to an actor by a hash of this exact string."""
    out = run_fresh("""
        import json, ray
        from detectflow import prestart
        ray.init(num_cpus=1, include_dashboard=False,
                 runtime_env={"env_vars": {"B": "2", "A": "1"}})
        parent = prestart.current_runtime_env()
        child = {"env_vars": {"C": "3", "A": "x"}}

        @ray.remote(num_cpus=0)
        def own():
            return ray.get_runtime_context().get_runtime_env_string()

        @ray.remote(num_cpus=0)
        class Own:
            def get(self):
                return ray.get_runtime_context().get_runtime_env_string()

        print(json.dumps({
            "parent": parent, "expected": prestart.merged_runtime_env(parent, child),
            "task": ray.get(own.options(runtime_env=child).remote()),
            "actor": ray.get(Own.options(runtime_env=child).remote().get.remote())}))
        ray.shutdown()
        """, timeout=180)
    assert out["parent"] == {"env_vars": {"A": "1", "B": "2"}}
    assert out["task"] == out["expected"] == out["actor"]
    assert out["expected"] == '{"env_vars":{"A":"x","B":"2","C":"3"}}'


def test_actors_keep_a_users_own_setup_hook_and_can_be_turned_off(monkeypatch):
    assert prestart.actor_runtime_env({}) == {"env_vars": {prestart.HOOK_ENV: prestart.HOOK}}
    users = {"env_vars": {prestart.HOOK_ENV: "their.hook"}}
    assert prestart.actor_runtime_env(users) is None
    monkeypatch.setenv("DETECTFLOW_PRESTART", "0")
    assert prestart.actor_runtime_env({}) is None
    assert prestart.prestart_detectors(2, {}) == 0


def test_prestart_runs_by_default_only_with_cores_to_spare(monkeypatch):
    """On 2 cores with 2 actors it only moved CPU time (benchmarks/RESULTS.md)."""
    monkeypatch.delenv("DETECTFLOW_PRESTART", raising=False)
    assert prestart.mode() == "auto"
    assert not prestart.worth_prestarting(cpus=2, actors=2)  # this VM, CPU actors
    assert prestart.worth_prestarting(cpus=16, actors=1)  # a GPU host
    assert not prestart.worth_prestarting(cpus=8, actors=8)
    monkeypatch.setenv("DETECTFLOW_PRESTART", "1")
    assert prestart.worth_prestarting(cpus=2, actors=2)
    monkeypatch.setenv("DETECTFLOW_PRESTART", "0")
    assert not prestart.worth_prestarting(cpus=16, actors=1) and not prestart.enabled()


def test_the_flow_and_the_detect_task_decide_alike_from_the_plan(monkeypatch):
    from detectflow.config import RunConfig
    from detectflow.pipeline import plan_resources

    monkeypatch.delenv("DETECTFLOW_PRESTART", raising=False)
    cfg = RunConfig(model=SMALL)
    assert not prestart.applies(plan_resources(cfg, {"CPU": 2}))  # this VM: as before
    assert prestart.applies(plan_resources(cfg, {"CPU": 16, "GPU": 1}))
    assert not prestart.applies(plan_resources(cfg, {"CPU": 32, "GPU": 2}, nodes=2))
    assert prestart.helpers_early(16) and not prestart.helpers_early(2)
    assert not prestart.helpers_early(32, nodes=2)
    monkeypatch.setenv("DETECTFLOW_PRESTART", "0")
    assert not prestart.applies(plan_resources(cfg, {"CPU": 16, "GPU": 1}))
    assert not prestart.helpers_early(16)


def test_no_hook_where_a_new_worker_could_not_import_it(tmp_path, monkeypatch):
    """A package found only through the driver's own directory (a checkout run without
    installing) is not there yet when a new worker runs its setup hook; on PYTHONPATH it is."""
    (tmp_path / "only_here_pkg").mkdir()
    (tmp_path / "only_here_pkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("only_here_pkg")  # this process finds it, as the driver would
    assert prestart.hook_importable("detectflow")  # installed for the tests
    assert not prestart.hook_importable.__wrapped__("only_here_pkg")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert prestart.hook_importable.__wrapped__("only_here_pkg")


def test_the_warmed_worker_starts_ray_datas_helper_actors():
    """Ray Data's three per-cluster actors exist before any dataset ran."""
    out = run_fresh("""
        import json, time, ray
        from detectflow import raycluster
        raycluster.connect(None, {})
        raycluster.await_warm_workers(timeout=120)
        wanted = {"datasets_stats_actor": "_dataset_stats_actor",
                  "AutoscalingCoordinator": "AutoscalingCoordinator",
                  "ActorLocationTracker": "ActorLocationTracker"}
        found, deadline = set(), time.monotonic() + 90
        while len(found) < len(wanted) and time.monotonic() < deadline:
            for name, namespace in wanted.items():
                try:
                    ray.get_actor(name, namespace=namespace)
                    found.add(name)
                except ValueError:
                    pass
            time.sleep(0.2)
        print(json.dumps({"found": sorted(found)}))
        raycluster.shutdown()
        """, timeout=240, DETECTFLOW_PRESTART="1")
    assert out["found"] == ["ActorLocationTracker", "AutoscalingCoordinator",
                            "datasets_stats_actor"]


def test_the_setup_hook_preloads_the_actor_modules_and_never_raises():
    out = run_fresh("""
        import json, os, sys
        from detectflow import prestart
        before = {m: m in sys.modules for m in prestart.ACTOR_MODULES}
        prestart.preload()
        print(json.dumps({"before": before, "after": {m: m in sys.modules
                                                      for m in prestart.ACTOR_MODULES},
                          "torchvision": "torchvision" in sys.modules,
                          "dynamo": "torch._dynamo" in sys.modules,
                          "marker": os.environ.get(prestart.PRELOADED_ENV)}))
        """, timeout=180)
    assert not any(out["before"].values())
    assert all(out["after"].values()) and out["torchvision"]
    assert not out["dynamo"]  # torchvision came in the actors' way, without TorchDynamo
    started, took = map(float, out["marker"].split(":"))
    assert started > 0 and took > 0


def test_a_gpu_actor_lands_in_a_prestarted_worker_and_gets_its_device():
    """A prestarted worker has no GPU yet: Ray assigns one (``CUDA_VISIBLE_DEVICES``) when the
    actor starts there, before its ``__init__`` creates a CUDA context. (A GPU resource
    declared on this CPU machine: Ray schedules and assigns it the same way.)"""
    out = run_fresh("""
        import json, os, time, ray
        from benchmarks.measure import descendants
        from detectflow import prestart
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False,
                 runtime_env={"env_vars": {"A": "1"}})
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid

        def idle():  # idle workers started with the actors' runtime env (the hook's variable)
            found = []
            for pid in descendants(raylet):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read()
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        environ = f.read().split(b"\\0")
                except OSError:
                    continue
                if title.startswith(b"ray::IDLE") and any(
                        e.startswith(prestart.HOOK_ENV.encode() + b"=") for e in environ):
                    found.append(pid)
            return found

        parent = prestart.current_runtime_env()
        child = prestart.actor_runtime_env(parent)
        prestart.prestart_workers(1, prestart.merged_runtime_env(parent, child))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not idle():
            time.sleep(0.1)
        prestarted = idle()

        @ray.remote(num_gpus=1, num_cpus=1)
        class OnGpu:
            def where(self):
                import sys
                return (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "torch" in sys.modules)

        pid, devices, torch_loaded = ray.get(OnGpu.options(runtime_env=child).remote()
                                             .where.remote(), timeout=120)
        print(json.dumps({"prestarted": prestarted, "pid": pid, "devices": devices,
                          "torch": torch_loaded}))
        ray.shutdown()
        """, timeout=240, DETECTFLOW_PRESTART="1")
    assert len(out["prestarted"]) == 1 and out["pid"] == out["prestarted"][0], out
    assert out["devices"] == "0" and out["torch"], out


def test_an_actor_takes_the_model_the_hook_loaded_and_detects_the_same(small_weights,
                                                                         sample_dir):
    """The hook builds the run's model on the CPU with its weights; the actor only moves it to
    its device. Same boxes as an actor that loads it itself; another model is not taken."""
    out = run_fresh(f"""
        import json, os
        import pyarrow as pa
        from detectflow import prestart
        from detectflow.predictor import Detector, decode_batch
        weights = {str(small_weights)!r}
        os.environ[prestart.MODEL_ENV] = prestart.model_spec({SMALL!r}, weights, 0.5)
        prestart.preload()
        uris = sorted(str(p) for p in __import__("pathlib").Path({str(sample_dir)!r}).glob("*.jpg"))
        listing = pa.table({{"index": list(range(len(uris))), "image_uri": uris,
                            "shard": [0] * len(uris)}})
        decoded = decode_batch(listing, max_side=4096)
        other = Detector({SMALL!r}, weights, 0.3, run_id="t")  # another threshold: not taken
        warm = Detector({SMALL!r}, weights, 0.5, run_id="t")
        cold = Detector({SMALL!r}, weights, 0.5, run_id="t")  # taken once only
        rows = [d(decoded).select(["boxes", "scores", "labels"]).to_pylist()
                for d in (warm, cold)]
        print(json.dumps({{"preloaded": [d.model_preloaded for d in (other, warm, cold)],
                          "same": rows[0] == rows[1],
                          "boxes": sum(len(r["boxes"]) for r in rows[0])}}))
        """, timeout=240)
    assert out["preloaded"] == [False, True, False]
    assert out["same"] and out["boxes"] > 0


def test_prestart_outside_ray_is_a_no_op():
    out = run_fresh("""
        import json
        from detectflow import prestart
        print(json.dumps({"asked": prestart.prestart_detectors(2, {})}))
        """, timeout=120)
    assert out["asked"] == 0


def _run_cli_watching(tmp_path: Path, weights: Path, prestarted: bool,
                      cluster: LocalCluster | None = None, api_url: str | None = None) -> dict:
    """``detectflow run`` in a child process (on ``cluster`` if given; with ``api_url``, the
    flow function itself against that API, as a deployment runs it) while its Ray processes are
    sampled every 50 ms: those up when the detect task began, and the inference actors'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"),
               DETECTFLOW_PRESTART="1" if prestarted else "0")
    if cluster:
        env["RAY_AUTH_MODE"] = "token"
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True)
    inputs = str(ROOT / "data" / "sample_images")
    command = [sys.executable, "-m", "detectflow", "run", "--input", inputs, "--output", str(out),
               "--model", SMALL, "--weights", str(weights), "--run-id", "r",
               *(["--ray-address", cluster.address] if cluster else [])]
    if api_url:
        env["PREFECT_API_URL"] = api_url
        command = [sys.executable, "-c", (
            "from flows.detect_objects import detect_objects\n"
            f"state = detect_objects(input_uri={inputs!r}, output_uri={str(out)!r}, "
            f"model={SMALL!r}, weights={str(weights)!r}, run_id='r', return_state=True)\n"
            "assert state.is_completed(), state")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    actors: dict[int, bool] = {}  # inference actor's pid -> its worker has the hook and model
    before_detect: set[int] = set()  # processes up when the detect task began

    def title(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").split(" ")[0]

    def sample():
        while proc.poll() is None:
            pids = descendants(proc.pid, *(p.pid for p in (cluster.procs if cluster else [])))
            for pid in pids:
                try:
                    name = title(pid)
                    if name == "ray::detect" and not before_detect:
                        before_detect.update(pids)
                    if name.startswith("ray::MapWorker(MapBatches(Detector))") \
                            and pid not in actors:
                        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                        actors[pid] = all(any(e.startswith(name.encode() + b"=")
                                              for e in environ)
                                          for name in (prestart.HOOK_ENV, prestart.MODEL_ENV))
                except OSError:  # ended meanwhile
                    continue
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    watcher.join(10)
    assert proc.returncode == 0, output[-3000:]
    assert before_detect and actors, output[-3000:]
    return {"actors": [{"pid": pid, "hook": hook, "before_detect": pid in before_detect}
                       for pid, hook in actors.items()],
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")),
            "detections": sorted(
                (r["image_uri"], r["labels"], [round(x, 3) for x in r["scores"]])
                for r in pq.read_table(out / "r" / "detections").select(
                    ["image_uri", "labels", "scores"]).to_pylist())}


@pytest.mark.timeout(900)
def test_inference_actors_start_in_workers_prestarted_before_the_detect_stage(
        tmp_path, small_weights):
    on = _run_cli_watching(tmp_path / "on", small_weights, prestarted=True)
    # Both actors (one per core here) in workers that were up before the detect task began,
    # which is when Ray Data creates them: the prestarted ones, with the preloading hook.
    assert len(on["actors"]) == 2
    assert all(a["before_detect"] and a["hook"] for a in on["actors"]), on
    off = _run_cli_watching(tmp_path / "off", small_weights, prestarted=False)
    assert off["actors"] and not any(a["before_detect"] or a["hook"] for a in off["actors"]), off
    assert on["files"] == off["files"] and on["files"]
    assert on["detections"] == off["detections"]  # the hook's model finds the same boxes


@pytest.mark.timeout(900)
def test_on_a_one_node_cluster_too_with_our_code_shipped(tmp_path, small_weights):
    """A deployment's run joins a long-lived ``ray start`` node; the job's runtime env then
    carries our packages (``py_modules``), and the prestarted workers' must match it."""
    cluster = LocalCluster(nodes=1, cpus_per_node=2).start(dict(os.environ))
    try:
        on = _run_cli_watching(tmp_path / "on", small_weights, prestarted=True, cluster=cluster)
    finally:
        cluster.stop()
    assert len(on["actors"]) == 2
    assert all(a["before_detect"] and a["hook"] for a in on["actors"]), on
    assert on["files"]


@pytest.mark.timeout(900)
def test_the_flow_prestarts_them_itself_as_a_deployment_runs_it(tmp_path, small_weights,
                                                                  prefect_api):
    """No ``detectflow run`` around it: the flow's own call right after connecting to Ray."""
    on = _run_cli_watching(tmp_path / "on", small_weights, prestarted=True, api_url=prefect_api)
    assert len(on["actors"]) == 2
    assert all(a["before_detect"] and a["hook"] for a in on["actors"]), on
    assert on["files"]
