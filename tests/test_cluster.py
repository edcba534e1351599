"""The same flow on an existing multi-node Ray cluster, reached only by its address.

The cluster is real: ``ray start --head`` and a second ``ray start --address`` on this machine,
1 CPU each (CI has 2 cores). The flow runs as a user runs it (``detectflow run --ray-address``,
a fresh process) from and to S3 on loopback, reporting to the test's Prefect API. Ray's state
API then tells where the work ran; the cluster must still be up afterwards.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import S3_SECRET
from parity import assert_same_detections, direct_prediction
from prefect.client.orchestration import get_client
from ray_nodes import LocalCluster, cmdline
from settle import completed_task_runs, session_processes, settled

from detectflow import models
from detectflow.config import RunConfig, parse_config
from detectflow.errors import ConfigError, InputError, OutputError
from detectflow.orchestration import code_runtime_env, existing_cluster_address
from detectflow.pipeline import plan_resources
from detectflow.preflight import require_shared_storage

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "motorcycle.jpg", "rocket.jpg"]
# Your own detector (a package.module:factory) on the cluster: its package travels with ours.
MODEL = "examples.shapes.model:tiny_fasterrcnn"
WEIGHTS = "s3://detectflow-in/weights/shapes.pth"  # a copy of SHAPES_FILE
SHAPES_FILE = ROOT / "examples" / "shapes" / "shapes_detector.pth"
STAGES = {"list_images", "detect", "validate_sample", "write_parquet", "publish_manifest"}


# --- the pure parts -------------------------------------------------------------------------


def test_plan_adapts_to_the_cluster_it_finds():
    two_small_nodes = plan_resources(RunConfig(), {"CPU": 2}, nodes=2)
    assert (two_small_nodes.device, two_small_nodes.num_actors, two_small_nodes.decode_tasks,
            two_small_nodes.nodes) == ("cpu", 1, 1, 2)
    assert two_small_nodes.describe() == (
        "2 node(s), 2 CPU / 0 GPU; 1 cpu actor(s) x (gpus=0, cpus=1), batch 4; "
        "decode up to 1 task(s) x 1 CPU; object store <= 256 MiB; batch norms folded; "
        "channels-last; freed memory kept")
    gpus = plan_resources(RunConfig(batch_size=16), {"CPU": 64, "GPU": 8}, nodes=4)
    assert (gpus.device, gpus.num_actors, gpus.max_actors, gpus.batch_size) == ("cuda", 8, 8, 16)
    assert gpus.decode_tasks == 56  # the CPUs the 8 actors (1 CPU each) leave
    assert gpus.actor_pool().min_size == gpus.actor_pool().max_size == 8
    half = plan_resources(RunConfig(gpus_per_actor=0.5), {"CPU": 16, "GPU": 2})
    assert (half.num_actors, half.gpus_per_actor) == (4, 0.5)


def test_batch_size_and_gpu_decode_follow_the_device():
    """No batch size given: 16 per GPU actor, 4 per CPU actor (benchmarks/RESULTS.md); JPEGs
    are decoded on the GPU only when asked for and there are GPU actors to do it."""
    gpu = plan_resources(RunConfig(), {"CPU": 16, "GPU": 1})
    cpu = plan_resources(RunConfig(), {"CPU": 2})
    assert (gpu.batch_size, cpu.batch_size) == (16, 4)
    assert plan_resources(RunConfig(batch_size=2), {"CPU": 16, "GPU": 1}).batch_size == 2
    assert not gpu.gpu_decode
    asked = RunConfig(gpu_decode=True)
    assert plan_resources(asked, {"CPU": 16, "GPU": 1}).gpu_decode
    assert "plain JPEGs decoded on the GPU" in plan_resources(asked, {"CPU": 16, "GPU": 1}).describe()
    assert not plan_resources(asked, {"CPU": 2}).gpu_decode  # CPU actors: decode tasks do it


def test_model_tuning_follows_the_device_unless_chosen():
    """Folded batch norms and channels-last are the CPU actors' default (measured faster there
    with the same boxes), not yet the GPU actors'; a choice made in the config wins."""
    gpu = plan_resources(RunConfig(), {"CPU": 16, "GPU": 1})
    cpu = plan_resources(RunConfig(), {"CPU": 2})
    assert (gpu.channels_last, gpu.fold_batchnorm) == (False, False)
    assert (cpu.channels_last, cpu.fold_batchnorm) == (True, True)
    assert "folded" not in gpu.describe() and "channels-last" not in gpu.describe()
    chosen = RunConfig(channels_last=True, fold_batchnorm=False)
    assert plan_resources(chosen, {"CPU": 16, "GPU": 1}).channels_last
    assert not plan_resources(chosen, {"CPU": 2}).fold_batchnorm


def test_gpu_actors_run_batches_on_several_streams():
    """GPU actors run ``gpu_streams`` batches at once (threaded actors, one CUDA stream per
    thread: 1.26x on an H200, benchmarks/RESULTS.md); CPU actors one, as a core has one."""
    gpu = plan_resources(RunConfig(), {"CPU": 16, "GPU": 1})
    assert gpu.streams == 2 and "2 batches at once per actor" in gpu.describe()
    pool = gpu.actor_pool()
    assert (pool.max_concurrent_calls_per_actor, pool.enable_true_multi_threading) == (2, True)
    elastic = plan_resources(RunConfig(gpu_streams=3, max_actors=4), {"CPU": 16, "GPU": 2})
    assert elastic.actor_pool().max_concurrent_calls_per_actor == 3
    single = plan_resources(RunConfig(gpu_streams=1), {"CPU": 16, "GPU": 1}).actor_pool()
    cpu = plan_resources(RunConfig(gpu_streams=3), {"CPU": 2})
    assert cpu.streams == 1 and "at once" not in cpu.describe()
    for plain in (single, cpu.actor_pool()):
        assert plain.max_concurrent_calls_per_actor is None
        assert not plain.enable_true_multi_threading


def test_plan_takes_a_fixed_or_min_max_pool_when_given():
    fixed = plan_resources(RunConfig(num_actors=3), {"CPU": 8, "GPU": 8})
    assert (fixed.num_actors, fixed.max_actors) == (3, 3)
    elastic = plan_resources(RunConfig(num_actors=2, max_actors=6), {"CPU": 8, "GPU": 2})
    assert (elastic.num_actors, elastic.max_actors) == (2, 6)
    assert "2-6 cuda actor(s)" in elastic.describe()
    pool = elastic.actor_pool()
    assert (pool.min_size, pool.max_size) == (2, 6)
    assert plan_resources(RunConfig(max_actors=4), {"CPU": 8}).num_actors == 1
    with pytest.raises(ConfigError, match="num_actors=5 is larger than max_actors=2"):
        plan_resources(RunConfig(num_actors=5, max_actors=2), {"CPU": 8})
    with pytest.raises(ConfigError, match="exceed the cluster's 2 CPUs"):
        plan_resources(RunConfig(cpus_per_actor=2), {"CPU": 2}, nodes=2)


def test_local_paths_are_refused_only_on_a_multi_node_cluster(tmp_path):
    local = RunConfig(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                      weights=str(tmp_path / "w.pth"))
    require_shared_storage(local, nodes=1)  # one node: its disk is shared
    with pytest.raises(InputError) as err:
        require_shared_storage(local, nodes=2)
    assert str(err.value).startswith(
        f"input {tmp_path / 'in'} is a local path but the Ray cluster has 2 nodes; "
        "use shared storage or s3://")
    s3_in = local.model_copy(update={"input_uri": "s3://b/in"})
    with pytest.raises(OutputError, match="output .* is a local path"):
        require_shared_storage(s3_in, nodes=3)
    s3_io = s3_in.model_copy(update={"output_uri": "s3://b/out"})
    with pytest.raises(ConfigError, match="weights .* is a local path"):
        require_shared_storage(s3_io, nodes=2)
    require_shared_storage(s3_io.model_copy(update={"weights": "s3://b/w.pth"}), nodes=2)
    shared = parse_config(**local.model_dump() | {"shared_paths": f"{tmp_path},/mnt/other"})
    require_shared_storage(shared, nodes=2)  # e.g. an NFS mount, given as --shared-paths


def test_code_ships_to_existing_clusters_unless_turned_off(monkeypatch):
    import detectflow
    import flows
    import tasks

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert existing_cluster_address(None) is None
    assert existing_cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert existing_cluster_address(None) == "ray://head:10001"
    assert code_runtime_env()["py_modules"] == [
        os.path.dirname(m.__file__) for m in (detectflow, tasks, flows)]
    assert code_runtime_env(ship=False) == {}  # the ship_code field off


def test_cluster_configs_match_the_pinned_stack_and_ask_for_gpus():
    import prefect
    import ray
    import torch
    import yaml

    kuberay = yaml.safe_load((ROOT / "deployments" / "kuberay-raycluster.yaml").read_text())
    assert kuberay["kind"] == "RayCluster" and kuberay["spec"]["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in kuberay["spec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    launcher = yaml.safe_load((ROOT / "deployments" / "ray-cluster.yaml").read_text())
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    setup = " ".join(launcher["setup_commands"])
    assert f"torch=={torch.__version__.split('+')[0]}" in setup
    assert f"prefect=={prefect.__version__}" in setup


# --- a real two-node cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    # The nodes inherit this environment (the loopback S3's credentials among it), as a real
    # node would have its credentials from its own environment or role.
    nodes = LocalCluster(nodes=2, cpus_per_node=1).start(dict(os.environ))
    yield nodes
    nodes.stop()
    assert not nodes.our_pids()


def _cli_env(tmp_path: Path, prefect_api: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(
        PREFECT_API_URL=prefect_api,  # every task run, wherever it runs, reports here
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        TORCH_HOME=str(tmp_path / "torch-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RAY_AUTH_MODE="token",  # the cluster (Ray 2.60 default) wants its token
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
    )
    return env


def _detectflow_run(env: dict[str, str], *args: str, timeout: int = 420):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "detectflow", "run", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, time.perf_counter() - start


def _s3_args(s3: str, run_id: str) -> list[str]:
    return ["--input", "s3://detectflow-in/photos", "--output", "s3://detectflow-out/cluster",
            "--model", MODEL, "--weights", WEIGHTS, "--score-threshold", "0.3",
            "--s3-endpoint-url", s3, "--run-id", run_id]


@pytest.fixture(scope="module")
def fs(s3):
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    fs.put_file(str(SHAPES_FILE), WEIGHTS.removeprefix("s3://"))
    return fs


@pytest.fixture(scope="module")
def cluster_run(cluster, fs, s3, prefect_api, tmp_path_factory):
    env = _cli_env(tmp_path_factory.mktemp("cluster-cli"), prefect_api)
    proc, seconds = _detectflow_run(env, *_s3_args(s3, "on-cluster"),
                                    "--ray-address", cluster.address)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"proc": proc, "seconds": seconds, "log": proc.stdout + proc.stderr,
            "manifest": json.loads(fs.cat_file("detectflow-out/cluster/on-cluster/manifest.json"))}


def _rows(fs, run_id: str) -> list[dict]:
    manifest = json.loads(fs.cat_file(f"detectflow-out/cluster/{run_id}/manifest.json"))
    rows = []
    for entry in manifest["output"]["files"]:
        with fs.open(f"detectflow-out/cluster/{run_id}/{entry['path']}", "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


@pytest.mark.slow
def test_plan_is_logged_once_and_recorded_for_the_cluster_it_found(cluster_run):
    # Both nodes share one session folder on this machine, so each node's log monitor forwards
    # the same worker line: identical copies are one log record.
    lines = sorted({line for line in cluster_run["log"].splitlines() if "resource plan: " in line})
    assert len(lines) == 1, cluster_run["log"][-3000:]
    print("\n" + lines[0])
    assert "resource plan: 2 node(s), 2 CPU / 0 GPU; 1 cpu actor(s)" in lines[0]
    resources = cluster_run["manifest"]["resources"]
    assert (resources["nodes"], resources["cluster_cpus"], resources["num_actors"],
            resources["batch_size"]) == (2, 2.0, 1, 4)


@pytest.fixture(scope="module")
def ray_state(cluster, cluster_run):
    """What Ray's state API (the head's API server) recorded of the run."""
    from ray.util.state import list_actors, list_tasks

    kwargs = dict(address=cluster.dashboard_url, limit=10_000, detail=True,
                  raise_on_missing_output=False)
    return {"tasks": list_tasks(**kwargs), "actors": list_actors(**kwargs),
            "nodes": {n["node_id"] for n in cluster.alive_nodes()}}


@pytest.mark.slow
def test_work_ran_on_both_nodes(ray_state):
    ran: dict[str, set[str]] = {}
    for t in ray_state["tasks"]:
        if t.state == "FINISHED" and t.node_id:
            ran.setdefault(t.node_id, set()).add(t.name)
    for a in ray_state["actors"]:
        if a.node_id:
            ran.setdefault(a.node_id, set()).add(a.class_name)
    print("\n" + "\n".join(f"node {n[:8]}: {sorted(names)}" for n, names in ran.items()))
    assert set(ran) == ray_state["nodes"] and len(ray_state["nodes"]) == 2
    data_work = {n for n, names in ran.items()
                 if any("decode_batch" in x or "Detector" in x for x in names)}
    assert data_work == ray_state["nodes"]  # decoding and inference, not just bookkeeping


@pytest.mark.slow
def test_code_and_settings_reach_the_workers_through_runtime_env(ray_state, s3, prefect_api):
    (detector,) = [a for a in ray_state["actors"] if "Detector" in a.class_name]
    runtime_env = json.loads(detector.serialized_runtime_env)
    # detectflow, tasks, flows and the factory's package (examples), uploaded by the driver
    # (gcs://_ray_pkg_<hash>.zip): the workers import the model from there.
    assert len(runtime_env["py_modules"]) == 4
    assert all(uri.startswith("gcs://_ray_pkg_") for uri in runtime_env["py_modules"])
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == s3
    assert runtime_env["env_vars"]["PREFECT_API_URL"] == prefect_api.rstrip("/")
    assert S3_SECRET not in detector.serialized_runtime_env


@pytest.mark.slow
def test_every_image_appears_once_in_the_output(cluster_run, fs):
    rows = _rows(fs, "on-cluster")
    assert sorted(r["image_uri"] for r in rows) == [f"s3://detectflow-in/photos/{n}"
                                                     for n in NAMES]
    assert all(r["error"] is None for r in rows)
    assert cluster_run["manifest"]["counts"]["images"] == 5


@pytest.mark.slow
def test_task_runs_land_in_the_one_prefect_api(cluster_run, prefect_api):
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("run_id") == "on-cluster"]
        assert len(runs) == 1 and runs[0].state.is_completed()
        task_runs = completed_task_runs(client, runs[0].id, len(STAGES))
    assert STAGES <= {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert all(t.state.is_completed() for t in task_runs)


@pytest.mark.slow
def test_the_cluster_is_still_up_after_the_run(cluster, cluster_run):
    assert len(cluster.alive_nodes()) == 2
    assert all(proc.poll() is None for proc in cluster.procs)
    # A run stops the autoscaler monitor of a Ray it started, never a cluster's it joined.
    assert any(b"autoscaler/_private/monitor.py" in cmdline(pid) for pid in cluster.our_pids())


@pytest.mark.slow
def test_local_input_is_refused_on_the_multi_node_cluster(cluster, fs, s3, prefect_api, tmp_path,
                                                          sample_dir):
    proc, _ = _detectflow_run(
        _cli_env(tmp_path, prefect_api), "--input", str(sample_dir), "--output",
        "s3://detectflow-out/cluster", "--model", MODEL, "--weights", WEIGHTS,
        "--s3-endpoint-url", s3, "--run-id", "local-input", "--ray-address", cluster.address,
        timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"detectflow: run local-input failed: InputError: input {sample_dir} is a local path "
        "but the Ray cluster has 2 nodes; use shared storage or s3:// (or list a folder mounted "
        "on every node in shared_paths)")
    assert len(cluster.alive_nodes()) == 2  # refusing did not touch the cluster


@pytest.mark.slow
def test_same_detections_as_a_direct_model_call(cluster_run, fs, sample_dir):
    """Detections made across two nodes equal a plain per-image call of the same model on the
    same bytes (tests/test_flow.py checks the same of a one-node local Ray)."""
    direct = models.load_model(MODEL, models.resolve_weights(MODEL, str(SHAPES_FILE)),
                               score_threshold=0.3)
    rows = _rows(fs, "on-cluster")
    names = [r["image_uri"].rsplit("/", 1)[1] for r in rows]
    assert names == NAMES
    compared = 0
    for name, row in zip(names, rows):
        ref = direct_prediction(direct, sample_dir / name, score_threshold=0.3)
        assert_same_detections(row, ref)
        compared += len(ref["boxes"])
    assert compared > 0


@pytest.mark.slow
def test_a_stopped_run_leaves_no_actor_and_the_cluster_up(cluster, cluster_run, fs, s3,
                                                          prefect_api, tmp_path, sample_dir):
    from ray.util.state import list_actors

    originals = sorted(sample_dir.glob("*.jpg"))
    for i in range(40):
        fs.put_file(str(originals[i % len(originals)]), f"detectflow-in/many/photo-{i:02d}.jpg")
    args = _s3_args(s3, "stopped") + ["--input", "s3://detectflow-in/many", "--shard-size", "8",
                                      "--ray-address", cluster.address]
    proc = subprocess.Popen([sys.executable, "-m", "detectflow", "run", *args],
                            env=_cli_env(tmp_path, prefect_api), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not fs.glob("detectflow-out/cluster/stopped/_staging/detections/shard-*.parquet"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.3)
        fs.invalidate_cache()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "detectflow: interrupted; re-run with --run-id stopped to resume")
    assert seconds < 10, seconds
    assert not settled(lambda: session_processes(proc.pid), lambda found: not found, timeout=10)

    def actors():
        return list_actors(address=cluster.dashboard_url, limit=10_000, detail=True,
                           raise_on_missing_output=False)

    # Ray Data's own detached actors (its stats, autoscaling coordinator) are shared by every
    # job on the cluster and outlive each: not the run's.
    left = settled(lambda: [a for a in actors() if a.state != "DEAD" and not a.is_detached],
                   lambda found: not found, timeout=20)
    assert not left, [(a.class_name, a.state) for a in left]
    assert any("Detector" in a.class_name for a in actors())  # the run's pool existed, and died
    assert len(cluster.alive_nodes()) == 2
