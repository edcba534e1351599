"""Faults a long batch job meets, each provoked for real: a killed inference actor, an S3 outage,
the process dying before the commit point, an interrupted run resumed, two runs in one prefix.

Crashes are real SIGKILLs of a `detectflow run` process tree; a failpoint
(``DETECTFLOW_TEST_FAILPOINT``) only freezes the run at a known step so the kill lands there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from flaky_s3 import FlakyS3
from prefect.client.orchestration import get_client
from settle import completed_task_runs

from detectflow import resume, storage
from flows.detect_objects import detect_objects

ROOT = Path(__file__).resolve().parent.parent
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
PHOTOS = 12  # copies of the bundled photos: 6 shards of 2
# Results stream back per block of decoded images (16): more than two blocks leave time to kill
# an inference actor once the first results are staged and before the last ones are.
MANY = 40


def _copies(folder: Path, sample_dir: Path, n: int) -> Path:
    originals = sorted(sample_dir.glob("*.jpg"))
    for i in range(n):
        shutil.copy(originals[i % len(originals)], folder / f"photo-{i:02d}.jpg")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_dir) -> Path:
    return _copies(tmp_path_factory.mktemp("photos"), sample_dir, PHOTOS)


def _params(input_uri, output_uri, weights, run_id, **extra) -> dict:
    # One inference actor: what these tests check does not depend on the pool's size, and each
    # actor's start is a share of the suite's CPU (benchmarks/RESULTS.md, "Test suite").
    return dict(input_uri=str(input_uri), output_uri=str(output_uri), model=SMALL,
                weights=str(weights), score_threshold=0.3, run_id=run_id,
                **({"num_actors": 1} | extra))


def _published(run_dir: Path) -> tuple[dict, list[dict]]:
    """What a reader sees: the manifest, and the rows of the files it lists."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [r for f in manifest["output"]["files"]
            for r in pq.read_table(run_dir / f["path"]).to_pylist()]
    return manifest, rows


def _assert_every_image_once(rows: list[dict], folder: Path) -> None:
    uris = [r["image_uri"] for r in rows]
    assert sorted(uris) == sorted(str(p) for p in folder.glob("*.jpg"))
    assert len(uris) == len(set(uris))
    assert all(r["error"] is None for r in rows)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (storage.sha256_file(str(p)), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sidecars(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "_staging" / "detections").glob("shard-*.json"))


# --- a transient S3 outage, and a killed actor through the command ------------------------------


def _attempts_of_one_write(endpoint: str) -> int:
    """Measured, not assumed: requests one storage write sends before it gives up."""
    with FlakyS3(endpoint, "PUT", "/probe/", failures=1000) as proxy:
        storage.configure(proxy.url)
        try:
            with pytest.raises(OSError):
                storage.atomic_write_bytes("s3://detectflow-out/probe/x", b"x")
        finally:
            storage.configure(None)
    return len(proxy.refused)


@pytest.fixture(scope="module")
def faulty_run(s3, sample_dir, small_weights, tmp_path_factory, prefect_api):
    """`detectflow run` from and to S3, reporting to the test's Prefect API: S3 refuses the
    listing's writes as often as one write retries on its own (so only Prefect's task retry
    recovers), and one inference actor of the default pool is SIGKILLed once shards are staged
    (Ray Data restarts it and re-runs its lost batch while the other goes on)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    originals = sorted(sample_dir.glob("*.jpg"))
    for i in range(MANY):
        fs.put_file(str(originals[i % len(originals)]), f"detectflow-in/terminal/photo-{i:02d}.jpg")
    attempts = _attempts_of_one_write(s3)
    assert attempts > 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(tmp_path_factory.mktemp("terminal") / "prefect-home"),
               PREFECT_API_URL=prefect_api)
    staged = "detectflow-out/terminal/terminal/_staging/detections/shard-*.parquet"
    with FlakyS3(s3, "PUT", "/_staging/listing/", failures=attempts) as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-m", "detectflow", "run", "--input", "s3://detectflow-in/terminal",
             "--output", "s3://detectflow-out/terminal", "--model", SMALL, "--weights",
             str(small_weights), "--score-threshold", "0.3", "--shard-size", "4",
             "--batch-size", "2", "--s3-endpoint-url", proxy.url, "--run-id", "terminal"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        killed, staged_at_kill = None, 0
        deadline = time.monotonic() + 300
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            fs.invalidate_cache()
            if staged_at_kill := len(fs.glob(staged)):
                killed = _kill_detector_of_session(proc.pid)
            time.sleep(0.25)  # each look lists the bucket: S3 requests cost the run's CPU
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    with get_client(sync_client=True) as client:
        (flow_run,) = [r for r in client.read_flow_runs()
                       if r.parameters.get("run_id") == "terminal"]
        task_runs = completed_task_runs(client, flow_run.id, 7)
    run_dir = "detectflow-out/terminal/terminal"
    manifest = json.loads(fs.cat_file(f"{run_dir}/manifest.json"))
    rows = [r for f in manifest["output"]["files"]
            for r in pq.read_table(fs.open(f"{run_dir}/{f['path']}", "rb")).to_pylist()]
    return {"stdout": stdout, "stderr": stderr, "killed": killed, "attempts": attempts,
            "staged_at_kill": staged_at_kill, "manifest": manifest, "rows": rows,
            "refused": list(proxy.refused), "passed": list(proxy.passed), "task_runs": task_runs}


@pytest.mark.slow
def test_transient_s3_outage_is_ridden_out_by_prefects_task_retry(faulty_run):
    # Refused as often as one write retries on its own, then let through: only Prefect's task
    # retry of list_images can have recovered.
    assert len(faulty_run["refused"]) == faulty_run["attempts"] and faulty_run["passed"]
    runs = {t.name.rsplit("-", 1)[0]: t for t in faulty_run["task_runs"]}
    assert runs["list_images"].run_count == 2 and runs["list_images"].state.is_completed()
    assert all(t.state.is_completed() for t in faulty_run["task_runs"])
    manifest = faulty_run["manifest"]
    assert manifest["counts"]["images"] == manifest["output"]["rows"] == MANY


@pytest.mark.slow
def test_killed_inference_actor_the_run_completes_with_every_image_once(faulty_run):
    assert faulty_run["killed"], "the inference actor was never seen alive mid-run"
    assert faulty_run["staged_at_kill"] < MANY // 4  # killed mid-run, not after the last shard
    manifest, rows = faulty_run["manifest"], faulty_run["rows"]
    uris = [r["image_uri"] for r in rows]
    assert sorted(uris) == [f"s3://detectflow-in/terminal/photo-{i:02d}.jpg" for i in range(MANY)]
    assert all(r["error"] is None for r in rows)
    assert manifest["resources"]["num_actors"] == 2  # the default pool: one actor went on
    assert manifest["counts"]["images"] == MANY and manifest["resume"]["images_inferred"] == MANY


@pytest.mark.slow
def test_the_terminal_shows_no_traceback_for_an_outage_and_a_killed_actor(faulty_run):
    """Both README rows as a user meets them, through `detectflow run`: the run completes and
    the terminal shows Ray's and Prefect's one-line notes, never a Python traceback."""
    assert faulty_run["killed"], "the inference actor was never seen alive mid-run"
    output = faulty_run["stdout"] + faulty_run["stderr"]
    assert "Traceback" not in output, output[-4000:]


def _kill_detector_of_session(sid: int) -> int | None:
    """SIGKILL the inference actor's process among session ``sid``'s; its pid, if found."""
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"MapWorker(MapBatches(Detector))" in
                    (entry / "cmdline").read_bytes() and
                    int((entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[3]) == sid):
                os.kill(int(entry.name), signal.SIGKILL)
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


# --- crashes of the whole run (a `detectflow run` process tree, SIGKILLed) -----------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class CrashingRun:
    """`detectflow run` in its own session, frozen at a failpoint, then SIGKILLed with every
    process it started (its local Ray included)."""

    def __init__(self, tmp_path: Path, args: list[str], failpoint: str, api: str,
                 **env_vars: str) -> None:
        # Reporting to the test's Prefect API, as with a server: the run's own temporary server
        # and its death with the run are tests/test_api_server.py's.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
        env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
                   DETECTFLOW_TEST_FAILPOINT=failpoint, **env_vars)
        self.log = tmp_path / "run.log"
        self.failpoint = failpoint
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "detectflow", "run", *args],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_for_failpoint(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"failpoint {self.failpoint} reached" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"failpoint {self.failpoint} not reached:\n"
                    + self.log.read_text(errors="replace")[-3000:])

    def kill(self) -> None:
        victims = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the run had already exited: its log says why
            pass
        for pid in victims:  # those that left the session (Ray's reaper) too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, sample_dir, small_weights, ray_local, prefect_api):
    """A run SIGKILLed just before its manifest, then run again (in this process) to the end."""
    tmp_path = tmp_path_factory.mktemp("crash")
    out, run_dir = tmp_path / "out", tmp_path / "out" / "crash"
    run = CrashingRun(tmp_path, ["--input", str(sample_dir), "--output", str(out), "--model",
                                 SMALL, "--weights", str(small_weights), "--score-threshold",
                                 "0.3", "--shard-size", "2", "--run-id", "crash",
                                 "--num-actors", "1"],
                      "before-manifest", prefect_api)
    run.wait_for_failpoint()
    run.kill()
    killed = {"returncode": run.proc.returncode,
              "parts": sorted(p.name for p in (run_dir / "detections").iterdir()),
              "manifest": (run_dir / "manifest.json").exists()}
    state = detect_objects(**_params(sample_dir, out, small_weights, "crash", shard_size=2),
                           return_state=True)
    assert state.is_completed(), state.message
    return {"out": out, "run_dir": run_dir, "killed": killed}


@pytest.mark.slow
def test_crash_before_the_manifest_leaves_no_manifest_and_a_rerun_publishes_once(crashed,
                                                                                sample_dir):
    run_dir, killed = crashed["run_dir"], crashed["killed"]
    assert killed["returncode"] == -signal.SIGKILL
    parts = killed["parts"]
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not killed["manifest"]  # readers see no run at all

    manifest, rows = _published(run_dir)
    _assert_every_image_once(rows, sample_dir)
    assert [f["path"] for f in manifest["output"]["files"]] == [f"detections/{p}" for p in parts]
    assert sorted(p.name for p in (run_dir / "detections").iterdir()) == parts
    assert sorted(p.name for p in run_dir.iterdir()) == ["detections", "manifest.json", "samples"]
    # The crashed attempt had staged every shard: the re-run verified and reused them all.
    assert manifest["resume"] == {"shards": 3, "shards_reused": 3, "images_reused": 5,
                                  "images_inferred": 0}
    for entry in manifest["output"]["files"]:
        assert entry["sha256"] == storage.sha256_file(str(run_dir / entry["path"]))


@pytest.mark.slow
def test_two_run_ids_in_one_prefix_never_touch_each_others_files(crashed, sample_dir,
                                                                 small_weights):
    out, run_a = crashed["out"], crashed["run_dir"]
    a_before = _snapshot(run_a)
    state = detect_objects(**_params(sample_dir, out, small_weights, "second-run"),
                           return_state=True)
    assert state.is_completed(), state.message
    assert _snapshot(run_a) == a_before
    b_before = _snapshot(out / "second-run")
    again = detect_objects(**_params(sample_dir, out, small_weights, "crash"))
    assert again["run_id"] == "crash"
    assert _snapshot(run_a) == a_before and _snapshot(out / "second-run") == b_before
    # Each run's own folder, and the table both merged into.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["crash", "second-run", "table"]
    _, rows = _published(out / "second-run")
    assert {r["run_id"] for r in rows} == {"second-run"} and len(rows) == 5


@pytest.mark.slow
def test_resume_reuses_verified_shards_and_infers_only_the_rest(tmp_path, photos, small_weights,
                                                                 ray_local, prefect_api):
    out, run_dir = tmp_path / "out", tmp_path / "out" / "resume"
    run = CrashingRun(tmp_path, ["--input", str(photos), "--output", str(out), "--model", SMALL,
                                 "--weights", str(small_weights), "--score-threshold", "0.3",
                                 "--shard-size", "2", "--batch-size", "1", "--run-id", "resume",
                                 "--num-actors", "1"],
                      "after-shards:3", prefect_api)
    run.wait_for_failpoint()
    run.kill()
    staged = _sidecars(run_dir)
    assert len(staged) == 3 and not (run_dir / "manifest.json").exists()
    # Damage one staged shard: its sha256 no longer matches, so it must be computed again.
    damaged = staged[0].with_suffix(".parquet")
    damaged.write_bytes(damaged.read_bytes()[:-10])

    state = detect_objects(**_params(photos, out, small_weights, "resume", shard_size=2,
                                     batch_size=1), return_state=True)
    assert state.is_completed(), state.message
    manifest, rows = _published(run_dir)
    _assert_every_image_once(rows, photos)
    assert manifest["resume"] == {"shards": 6, "shards_reused": 2, "images_reused": 4,
                                  "images_inferred": 8}
    assert len(manifest["output"]["files"]) == 6 and manifest["counts"]["images"] == PHOTOS


def _staged_folder_with_sidecars(staging: str, shards=(0, 2, 11)) -> None:
    from detectflow.config import RunConfig, fingerprint
    from detectflow.schema import detection_row, rows_to_table

    key = fingerprint(RunConfig(model=SMALL, run_id="unit", output_uri="/tmp"))
    for shard in shards:
        table = rows_to_table([detection_row(image_uri=f"/x/{shard}.jpg", index=shard,
                                             shard=shard, width=4, height=4, model=SMALL,
                                             run_id="unit")])
        resume.write_staged(staging, shard, table, "listing-sha", key)
    # A crash between a shard and its sidecar leaves the shard alone; other files are not ours.
    storage.atomic_write_bytes(resume.staged_uri(staging, 5), b"half")
    storage.atomic_write_bytes(storage.join(staging, "notes.json"), b"{}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_shards_with_a_sidecar_are_read_back(tmp_path, where, request):
    """One listing of the staging folder says which shards an earlier attempt staged: a fresh
    run asks for no staged shard at all, a resumed one only for those."""
    if where == "s3":
        storage.configure(request.getfixturevalue("s3"))
        staging = "s3://detectflow-out/resume-listing/_staging/detections"
    else:
        staging = str(tmp_path / "_staging" / "detections")
    assert resume.staged_shards(staging) == set()  # nothing staged yet, not even the folder
    _staged_folder_with_sidecars(staging)
    assert resume.staged_shards(staging) == {0, 2, 11}


def test_staged_shard_is_reused_only_when_complete_and_current(tmp_path):
    from detectflow.config import RunConfig, fingerprint
    from detectflow.schema import detection_row, rows_to_table

    cfg = RunConfig(model=SMALL, run_id="unit", output_uri=str(tmp_path))
    key = fingerprint(cfg)
    table = rows_to_table([detection_row(image_uri=f"/x/{i}.jpg", index=i, shard=0, width=4,
                                         height=4, model=SMALL, run_id="unit") for i in range(3)])
    staging = str(tmp_path / "staged")
    entry = resume.write_staged(staging, 0, table, "listing-sha", key)
    found = resume.load_staged(staging, 0, 3, "listing-sha", key)
    assert found is not None and found[0] == entry and found[1].equals(table)
    other = fingerprint(cfg.model_copy(update={"score_threshold": 0.9}))
    assert resume.load_staged(staging, 0, 3, "listing-sha", other) is None  # other settings
    assert resume.load_staged(staging, 0, 3, "other-listing", key) is None  # other images
    assert resume.load_staged(staging, 0, 4, "listing-sha", key) is None  # other row count
    assert resume.load_staged(staging, 1, 3, "listing-sha", key) is None  # never staged
    Path(entry["uri"]).write_bytes(Path(entry["uri"]).read_bytes() + b"x")
    assert resume.load_staged(staging, 0, 3, "listing-sha", key) is None  # damaged


def test_listing_of_a_run_is_reused_only_when_intact(tmp_path, sample_dir):
    from detectflow.listing import write_listing

    listing = str(tmp_path / "listing")
    first = write_listing(str(sample_dir), listing, (".jpg",), 2)
    assert first == {"images": 5, "shards": 3, "reused": False,
                     "skipped": {"hidden": 0, "broken_link": 0, "unreadable": 0, "run_output": 0}}
    assert write_listing(str(sample_dir), listing, (".jpg",), 2) == {**first, "reused": True}
    assert not write_listing(str(sample_dir), listing, (".jpg",), 3)["reused"]  # other settings
    shard = tmp_path / "listing" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    assert not write_listing(str(sample_dir), listing, (".jpg",), 3)["reused"]  # damaged
