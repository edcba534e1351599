"""Deployments as users run them: a real ``prefect server start`` on loopback (its own SQLite
database), ``prefect deploy`` of deployments/prefect.yaml, a process worker, ``make serve``'s entry
point, runs created through the REST API exactly as the UI's "Run" button does, and the UI itself
rendered in headless Chromium."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from ray_nodes import cmdline
from settle import settled

from detectflow.config import RunConfig, knob
from detectflow.interrupt import descendants

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
STAGES = {"list_images", "detect", "validate_sample", "write_parquet", "publish_manifest",
          "merge_table", "publish_latest"}
SCREENSHOTS = ROOT / "test-artifacts"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RetryingClient(httpx.Client):
    """Retries 429/502/503 like Prefect's own client does: the server answers 503 while its SQLite
    database is busy (seen in CI while a served process registered its deployments)."""

    def request(self, *args, **kwargs) -> httpx.Response:
        for attempt in range(8):
            response = super().request(*args, **kwargs)
            if response.status_code not in (429, 502, 503):
                return response
            time.sleep(min(0.5 * 2**attempt, 8))
        return response


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process and everything it started (it leads its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # children (a flow run's Ray) that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_processes_tests_start_take_sigint_as_from_a_shell():
    """Runners here are stopped with SIGINT, as Ctrl-C stops them, however the suite started."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory, prefect_db):
    home = tmp_path_factory.mktemp("prefect-server")
    shutil.copy(prefect_db, home / "prefect.db")  # migrated already: not what this tests
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api,  # the UI's own calls go to this port, not the default 4200
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # upcoming runs appear within seconds
        # A run created is picked up within a second, not ten (the defaults' polling).
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_API_URL=api,  # for the CLI, workers and flow runs started below
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_AUTH_MODE="token",  # runs on an existing cluster (Ray 2.60 default) show its token
    )
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Connections idle for 1 s are not reused: the server (uvicorn) closes them at 5 s, and a
    # request sent on one as it closes fails with "Server disconnected" (seen in CI).
    client = RetryingClient(base_url=api, timeout=30, trust_env=False,
                            limits=httpx.Limits(keepalive_expiry=1))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prefect server did not start in 180 s"
            time.sleep(0.5)
        yield {"api": api, "env": env, "client": client, "home": home, "port": port,
               "pid": proc.pid}
    finally:
        _stop(proc)
        client.close()
    # Processes still exiting are not leaks: give them a few seconds (a full run once saw one
    # still there after a fixed 2 s wait; alone, the file never did).
    left = settled(lambda: _processes_of(home), lambda pids: not pids, timeout=15)
    named = {pid: cmdline(pid).replace(b"\0", b" ").decode()[:200] for pid in left}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {named}"


def _processes_of(home: Path) -> list[int]:
    """Processes (server, workers, flow runs, their Ray) that carry this test's PREFECT_HOME."""
    marker = f"PREFECT_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def _cli(server, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(PREFECT + ["--no-prompt", *args], env=server["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def deployed(server):
    """What README tells a user to type: a process work pool, then ``prefect deploy --all``."""
    _cli(server, "work-pool", "create", "detectflow", "--type", "process")
    _cli(server, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    client = server["client"]
    return {name: client.get(f"/deployments/name/detect-objects/{name}").json()
            for name in ("nightly", "on-demand")}


def _create_run(server, deployment_id: str, parameters: dict) -> httpx.Response:
    """POST /deployments/{id}/create_flow_run: what the UI's Run → Custom run submits."""
    return server["client"].post(f"/deployments/{deployment_id}/create_flow_run",
                                 json={"parameters": parameters})


def _wait_terminal(server, flow_run_id: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = server["client"].get(f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in TERMINAL:
            return run
        if proc.poll() is not None:  # the worker / served process died: no point waiting
            time.sleep(5)
            return server["client"].get(f"/flow_runs/{flow_run_id}").json()
        time.sleep(0.5)
    raise AssertionError(f"flow run not finished after {timeout} s; state {run['state_type']}")


def _filter(server, what: str, body: dict) -> list[dict]:
    response = server["client"].post(f"/{what}/filter", json=body)
    response.raise_for_status()
    return response.json()


def _params(out: Path, run_id: str, small_weights: Path, **extra) -> dict:
    return {"output_uri": str(out), "model": SMALL, "weights": str(small_weights),
            "score_threshold": 0.3, "run_id": run_id, **extra}


def test_prefect_yaml_registers_the_nightly_schedule_and_a_work_pool(server, deployed):
    nightly, on_demand = deployed["nightly"], deployed["on-demand"]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"])
            for s in nightly["schedules"]] == [("0 2 * * *", "UTC", True)]
    assert on_demand["schedules"] == []
    assert nightly["work_pool_name"] == on_demand["work_pool_name"] == "detectflow"
    deadline = time.monotonic() + 120
    while True:  # the server's scheduler service creates the upcoming runs on its next loop
        scheduled = _filter(server, "flow_runs", {
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scheduled, "the scheduler created no upcoming runs"
    assert all(r["expected_start_time"].endswith("02:00:00Z") or "T02:00:00" in
               r["expected_start_time"] for r in scheduled)
    # The run form: typed fields with their constraints, so the UI renders and checks them.
    props = on_demand["parameter_openapi_schema"]["properties"]
    for field in ("input_uri", "output_uri", "model", "score_threshold", "batch_size",
                  "num_actors", "gpus_per_actor", "sample_size", "ray_address"):
        assert field in props, field
    batch = next(s for s in props["batch_size"]["anyOf"] if s["type"] == "integer")
    assert props["score_threshold"]["maximum"] == 1.0 and batch["minimum"] == 1  # or null: auto


@pytest.mark.parametrize("field,value", [("score_threshold", 2.0), ("batch_size", 0),
                                         ("model", "no_such_model"), ("run_id", "../escape")])
def test_bad_parameter_is_refused_before_the_run_starts(server, deployed, field, value):
    response = _create_run(server, deployed["on-demand"]["id"], {field: value})
    assert response.status_code == 409, response.text
    assert f"field '{field}'" in response.json()["detail"]


@pytest.fixture(scope="module")
def worker(server, deployed):
    """``make worker``: a process worker of the pool, for the worker's runs below; stopped
    before the deployments are served (``served``), so that only the served process picks
    up runs from there on."""
    log_path = server["home"] / "worker.log"
    proc = subprocess.Popen(PREFECT + ["worker", "start", "--pool", "detectflow"],
                            env=server["env"], cwd=ROOT, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"proc": proc, "log": log_path}
    finally:
        _stop(proc)


def _worker_run(server, worker, deployment: dict, parameters: dict) -> tuple[str, float]:
    """A run created as the UI (or the scheduler) creates it, picked up by the worker; its id
    and seconds from creation to Completed."""
    response = _create_run(server, deployment["id"], parameters)
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    started = time.monotonic()
    run = _wait_terminal(server, flow_run_id, worker["proc"], timeout=480)
    seconds = time.monotonic() - started
    assert run["state_type"] == "COMPLETED", worker["log"].read_text()[-4000:]
    return flow_run_id, seconds


def _on_cluster(ray_local) -> dict:
    """Parameters that send a run to an existing Ray cluster, as a deployment for one sets
    them: here the test worker's own Ray (the worker's cancelled run starts a local Ray)."""
    return {"ray_address": ray_local.get_runtime_context().gcs_address, "ship_code": False}


@pytest.fixture(scope="module")
def worker_run(server, deployed, worker, small_weights, ray_local, tmp_path_factory):
    """A run of the nightly deployment, created as its schedule creates one (the deployment's
    parameters, here with this test's output and model, on an existing Ray cluster)."""
    out = tmp_path_factory.mktemp("deployed-out")
    flow_run_id, seconds = _worker_run(server, worker, deployed["nightly"],
                                       _params(out, "from-deployment", small_weights,
                                               num_actors=1, **_on_cluster(ray_local)))
    print(f"\ntrigger → Completed through a process worker: {seconds:.1f} s")
    return {"id": flow_run_id, "out": out, "run_dir": out / "from-deployment"}


def test_triggered_run_completes_every_stage_and_publishes(server, worker_run, sample_dir):
    task_runs = settled(  # the server records task-run states from events, after the flow
        lambda: _filter(server, "task_runs", {"flow_runs": {"id": {"any_": [worker_run["id"]]}}}),
        lambda runs: len(runs) >= len(STAGES) and all(t["state_type"] == "COMPLETED"
                                                      for t in runs))
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs} == STAGES
    assert all(t["state_type"] == "COMPLETED" for t in task_runs)
    artifacts = {a["key"]: a for a in _filter(
        server, "artifacts", {"artifacts": {"flow_run_id": {"any_": [worker_run["id"]]}}})}
    assert {"detection-samples", "detections-per-category", "run-manifest",
            "detect-progress"} <= set(artifacts)
    assert artifacts["detect-progress"]["data"] == 100.0
    assert artifacts["detection-samples"]["data"].count("data:image/") == 4

    manifest = json.loads((worker_run["run_dir"] / "manifest.json").read_text())
    table = pq.read_table(worker_run["run_dir"] / manifest["output"]["files"][0]["path"])
    assert table.num_rows == manifest["counts"]["images"] == len(list(sample_dir.glob("*.jpg")))
    assert manifest["parameters"]["input_uri"] == str(sample_dir)  # the deployment's default

    latest = json.loads((worker_run["out"] / "latest.json").read_text())
    assert latest["run_id"] == "from-deployment"
    assert latest["manifest_uri"] == str(worker_run["run_dir"] / "manifest.json")


def test_every_config_field_is_an_option_a_form_field_and_in_the_manifest(deployed, worker_run):
    """RunConfig is the one declaration: each field is a `detectflow run` option, a field of the
    run form as the Prefect API stores it (described, with its default), and in the manifest."""
    help_text = subprocess.run([sys.executable, "-m", "detectflow", "run", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60,
                               env=os.environ | {"COLUMNS": "200"}).stdout
    props = deployed["on-demand"]["parameter_openapi_schema"]["properties"]
    manifest = json.loads((worker_run["run_dir"] / "manifest.json").read_text())
    for name, field in RunConfig.model_fields.items():
        flag = knob(field).flag or "--" + name.replace("_", "-")
        assert f"  {flag} " in help_text or f"  {flag}," in help_text, flag
        assert props[name]["description"] == field.description, name
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        assert props[name].get("default") == default, name
        assert name in manifest["parameters"], name
    assert set(props) == set(RunConfig.model_fields) == set(manifest["parameters"])
    # The deployments set only their input and output (and the nightly one its incremental
    # mode); the rest are the code's defaults.
    defaults = {"input_uri": "data/sample_images", "output_uri": "output"}
    assert deployed["on-demand"]["parameters"] == defaults
    assert deployed["nightly"]["parameters"] == defaults | {"incremental": True}


def test_published_event_is_recorded_for_automations(server, worker_run):
    deadline = time.monotonic() + 60
    while True:
        page = server["client"].post("/events/filter", json={
            "filter": {"event": {"name": ["detectflow.manifest.published"]},
                       "any_resource": {"id": [f"detectflow.dataset.{worker_run['out']}"]}},
            "limit": 10,
        }).json()
        if page["events"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(page["events"]) == 1, page
    event = page["events"][0]
    assert event["payload"]["manifest_uri"] == str(worker_run["run_dir"] / "manifest.json")
    assert event["payload"]["images"] == 5 and event["payload"]["failed"] == 0
    related = {r["prefect.resource.id"] for r in event["related"]}
    assert f"prefect.flow-run.{worker_run['id']}" in related


def _chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("DETECTFLOW_TEST_REQUIRE_BROWSER"):
        pytest.fail("chromium is required (DETECTFLOW_TEST_REQUIRE_BROWSER is set) but not installed")
    return path


def _browse(browser: str, url: str, profile: Path, *output: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,1400",
         "--virtual-time-budget=30000", *output, url],
        capture_output=True, timeout=180,
    )


def test_ui_shows_the_drawn_boxes_on_the_runs_artifact_page(server, worker_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    artifacts = _filter(server, "artifacts", {"artifacts": {
        "flow_run_id": {"any_": [worker_run["id"]]}, "key": {"any_": ["detection-samples"]}}})
    url = f"http://127.0.0.1:{server['port']}/artifacts/artifact/{artifacts[0]['id']}"
    dom = _browse(browser, url, tmp_path / "profile", "--dump-dom").stdout.decode()
    assert "Sample detections" in dom and "from-deployment" in dom, dom[-2000:]
    assert dom.count('<img src="data:image/') == 4  # the drawn-box pictures, rendered
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "ui-detection-samples.png"
    _browse(browser, url, tmp_path / "profile2", f"--screenshot={shot}")
    assert shot.stat().st_size > 50_000  # kept for people to look at: pictures, not a blank page


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, sample_dir) -> Path:
    folder = tmp_path_factory.mktemp("cancel-photos")
    originals = sorted(sample_dir.glob("*.jpg"))
    for i in range(60):
        shutil.copy(originals[i % len(originals)], folder / f"photo-{i:02d}.jpg")
    return folder


def _cancel_mid_detect(server, deployment_id: str, params: dict, staged: Path,
                       runner: subprocess.Popen, runner_log: Path) -> tuple[dict, float]:
    """Start a run, wait until detect has staged a shard, cancel it as the UI's Cancel button
    does (the run goes to Cancelling; its worker or served process stops it). The run as it ends,
    and the seconds from the cancel to its Cancelled state."""
    response = _create_run(server, deployment_id, params)
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    deadline = time.monotonic() + 300
    while not list(staged.glob("shard-*.parquet")):
        assert runner.poll() is None, runner_log.read_text()[-3000:]
        assert time.monotonic() < deadline, runner_log.read_text()[-3000:]
        time.sleep(0.2)
    cancelled = time.monotonic()
    server["client"].post(f"/flow_runs/{flow_run_id}/set_state",
                          json={"state": {"type": "CANCELLING", "name": "Cancelling"},
                                "force": True}).raise_for_status()
    while True:
        run = server["client"].get(f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in TERMINAL or time.monotonic() - cancelled > 60:
            return run, time.monotonic() - cancelled
        time.sleep(0.5)


def _assert_cancelled_and_stopped(server, run: dict, seconds: float, keep: set[int],
                                  log: Path) -> None:
    assert run["state_type"] == "CANCELLED", (run["state"], log.read_text()[-3000:])
    assert seconds < 30, f"Cancelled after {seconds:.1f} s"
    # The run's process and its local Ray are gone; the server and the runner stay.
    left = settled(lambda: set(_processes_of(server["home"])) - keep, lambda p: not p, timeout=15)
    assert not left, {pid: cmdline(pid)[:200] for pid in left}


@pytest.mark.slow
def test_cancelling_from_the_ui_stops_a_workers_run(server, deployed, worker, small_weights,
                                                     many_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("cancel-worker")
    run, seconds = _cancel_mid_detect(
        server, deployed["on-demand"]["id"],
        _params(out, "cancel-me", small_weights, input_uri=str(many_photos), shard_size=8,
                num_actors=1),
        out / "cancel-me" / "_staging" / "detections", worker["proc"], worker["log"])
    print(f"\nworker: Cancel → Cancelled in {seconds:.1f} s")
    _assert_cancelled_and_stopped(server, run, seconds, {worker["proc"].pid} | server_pid(server),
                                  worker["log"])
    assert worker["proc"].poll() is None  # and the worker goes on
    assert not (out / "cancel-me" / "manifest.json").exists()


def server_pid(server) -> set[int]:
    """The API server's process and any it started: they stay."""
    return {server["pid"], *descendants(server["pid"])}


# From here on `make serve` has replaced the deployments with served ones: after every test of a
# worker's runs, and of worker_run's output (the second night moves latest.json and emits a
# second event).
@pytest.fixture(scope="module")
def served(server, deployed, worker, worker_run, small_weights, ray_local):
    """``make serve``: the same deployments, executed by a long-running process (no worker runs
    from here on, so only the served process can pick a run up). Its first run is the nightly
    deployment's second night, created as the schedule creates one."""
    _stop(worker["proc"])
    log_path = server["home"] / "serve.log"
    serve = subprocess.Popen([sys.executable, "deployments/serve.py"], env=server["env"],
                             cwd=ROOT, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    client = server["client"]
    try:
        deadline = time.monotonic() + 120
        while "being served" not in log_path.read_text() and time.monotonic() < deadline:
            assert serve.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        while True:  # serving re-registers the deployments and their schedules
            nightly = client.get("/deployments/name/detect-objects/nightly").json()
            crons = [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]]
            if crons == [("0 2 * * *", True)] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        response = _create_run(server, nightly["id"],
                               _params(worker_run["out"], "second-night", small_weights,
                                       num_actors=1, **_on_cluster(ray_local)))
        assert response.status_code == 201, response.text
        run = _wait_terminal(server, response.json()["id"], serve, timeout=480)
        yield {"proc": serve, "log": log_path, "crons": crons, "second_night": run}
    finally:
        _stop(serve)


def test_the_next_night_detects_only_what_is_new(served, worker_run, sample_dir):
    """The nightly deployment runs incrementally: the second night (run by the served process)
    finds every photo in the table the first night filled, detects none, and still publishes."""
    assert served["second_night"]["state_type"] == "COMPLETED", \
        served["log"].read_text()[-4000:]
    first = json.loads((worker_run["run_dir"] / "manifest.json").read_text())
    assert first["parameters"]["incremental"] is True  # from prefect.yaml, not from the test
    assert first["incremental"]["inferred"] == len(list(sample_dir.glob("*.jpg")))
    second = json.loads((worker_run["out"] / "second-night" / "manifest.json").read_text())
    assert second["incremental"]["inferred"] == 0 and second["counts"]["images"] == 0
    assert second["incremental"]["skipped"] == first["incremental"]["inferred"]
    assert second["incremental"]["runs"] == {"from-deployment": first["counts"]["images"]}
    latest = json.loads((worker_run["out"] / "latest.json").read_text())
    assert latest["run_id"] == "second-night"


@pytest.mark.slow
def test_served_deployments_keep_the_schedule_and_stop_a_cancelled_run(server, served,
                                                                       small_weights,
                                                                       tmp_path_factory,
                                                                       many_photos, ray_local):
    """``make serve`` registers the nightly schedule, and a Cancel from the UI stops the served
    run while the process goes on serving. This run is on an existing cluster (the worker's
    run above stopped a local Ray of its own): its actors go, the cluster stays."""
    import ray._private.state  # the GCS's actor table: this Ray has no dashboard for the state API

    def detectors() -> dict[str, str]:
        return {id_: actor["State"] for id_, actor in ray._private.state.actors().items()
                if "Detector" in actor["ActorClassName"]}

    before = detectors()
    assert served["crons"] == [("0 2 * * *", True)]
    out = tmp_path_factory.mktemp("served-out")
    on_demand = server["client"].get("/deployments/name/detect-objects/on-demand").json()
    cancelled, seconds = _cancel_mid_detect(
        server, on_demand["id"],
        _params(out, "served-cancel", small_weights, input_uri=str(many_photos), shard_size=8,
                num_actors=1, **_on_cluster(ray_local)),
        out / "served-cancel" / "_staging" / "detections", served["proc"], served["log"])
    print(f"\nserve: Cancel → Cancelled in {seconds:.1f} s")
    _assert_cancelled_and_stopped(server, cancelled, seconds,
                                  {served["proc"].pid} | server_pid(server), served["log"])
    assert served["proc"].poll() is None
    assert not (out / "served-cancel" / "manifest.json").exists()
    left = settled(lambda: {i: s for i, s in detectors().items() if i not in before},
                   lambda new: new and all(s == "DEAD" for s in new.values()), timeout=20)
    assert left and set(left.values()) == {"DEAD"}, left  # the run's pool existed, and died
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2
