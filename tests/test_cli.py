"""`detectflow run` as a user runs it: a fresh process, its own local Ray and Prefect API; stopped
with Ctrl-C mid-detect and run again (SIGTERM: tests/test_cluster.py, and the Prefect worker and
`serve` cancelling a run in tests/test_deployments.py)."""

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from settle import session_processes, settled

from detectflow.cli import options_table

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "detectflow"]
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # its own ephemeral API database
        TORCH_HOME=str(tmp_path / "torch-home"),  # an empty hub cache
        https_proxy="http://127.0.0.1:9",  # downloads fail at once, online or not
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # conftest's; a user's shell has none
    return env


def _stored_events(prefect_home: Path) -> dict[str, int]:
    """Events the run's temporary API server stored, by name (its database outlives it)."""
    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        return dict(db.execute("SELECT event, count(*) FROM events GROUP BY event").fetchall())


def _task_runs(prefect_home: Path) -> dict[str, tuple[str, str]]:
    """Task runs the run's temporary API server recorded (from the tasks' events): by id, their
    name and state."""
    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        return {id_: (name, state) for id_, name, state in
                db.execute("SELECT id, name, state_type FROM task_run")}


def _task_logs(prefect_home: Path) -> dict[str, list[str]]:
    """Log messages the run's temporary API server stored, by task run id."""
    by_task: dict[str, list[str]] = {}
    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        for task_run_id, message in db.execute(
                "SELECT task_run_id, message FROM log WHERE task_run_id IS NOT NULL"):
            by_task.setdefault(task_run_id, []).append(message)
    return by_task


def test_missing_pretrained_weights_fail_fast_with_one_line(tmp_path):
    proc = subprocess.run(CLI + ["run", "--output", str(tmp_path / "out")], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth" in lines[0]
    assert "--weights" in lines[0] and "torch hub cache" in lines[0]
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_fail_before_ray_in_one_line(tmp_path, small_weights):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small_weights.read_bytes()[:100_000])
    proc = subprocess.run(
        CLI + ["run", "--input", str(ROOT / "data" / "sample_images"), "--output",
               str(tmp_path / "out"), "--model", SMALL, "--weights", str(truncated)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"detectflow: error: weights for {SMALL}: {truncated} is not a complete file saved by "
        "torch.save (RuntimeError)"]
    assert not (tmp_path / "out").exists()  # Ray never started, nothing was written
    # Its API server was held until the checks passed: it never opened (or half-migrated) a
    # database in the new Prefect home.
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()


def test_bad_parameter_is_refused_with_the_field_name(tmp_path):
    proc = subprocess.run(CLI + ["run", "--score-threshold", "3"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "score_threshold" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# Several shards, and more images than two blocks of 16 (the first shard is staged once a block
# is back): Ctrl-C lands with some shards staged and some not.
IMAGES, SHARD = 48, 8
STAGES = ("list_images", "detect", "validate_sample", "write_parquet", "publish_manifest",
          "merge_table", "publish_latest")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-photos")
    originals = sorted((ROOT / "data" / "sample_images").glob("*.jpg"))
    for i in range(IMAGES):
        shutil.copy(originals[i % len(originals)], folder / f"photo-{i:02d}.jpg")
    return folder


def _args(photos: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return CLI + ["run", "--input", str(photos), "--output", str(out), "--model", SMALL,
                  "--weights", str(weights), "--score-threshold", "0.3", "--shard-size",
                  str(SHARD), "--run-id", "cli-run", *extra]


@pytest.fixture(scope="module")
def stopped_then_resumed(photos, small_weights, prefect_db, tmp_path_factory):
    """`detectflow run` stopped by Ctrl-C mid-detect (SIGINT to its process group, as a
    terminal sends it), then run again with the same run id to the end. In a Prefect home
    that has a database, as a user's after the first run (a new one's migrations cost seconds;
    tests/test_api_server.py starts a server on one)."""
    tmp = tmp_path_factory.mktemp("cli-run")
    out, home = tmp / "out", tmp / "prefect-home"
    home.mkdir()
    shutil.copy(prefect_db, home / "prefect.db")
    # Its own session, as a terminal gives a command its own process group: what it starts
    # (Ray, the API server) is found by the session id afterwards.
    proc = subprocess.Popen(_args(photos, out, small_weights), env=_env(tmp),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    staged = out / "cli-run" / "_staging" / "detections"
    deadline = time.monotonic() + 300
    while not list(staged.glob("shard-*.parquet")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "detect staged nothing in 300 s"
        time.sleep(0.1)
    assert session_processes(proc.pid), "the run's processes are not in its session"
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stopped = {"proc": proc, "stderr": stderr, "seconds": time.monotonic() - sent,
               "left": settled(lambda: session_processes(proc.pid), lambda f: not f, timeout=10),
               "manifest_after_stop": (out / "cli-run" / "manifest.json").exists()}
    # Run again from the same shell: the same Prefect home, whose database the first run used.
    before = {"events": _stored_events(home),
              "task_runs": set(_task_logs(home)) | set(_task_runs(home))}
    rerun = subprocess.run(_args(photos, out, small_weights), env=_env(tmp),
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return {"stopped": stopped, "rerun": rerun, "out": out, "home": home, "before": before}


@pytest.mark.slow
def test_ctrl_c_stops_the_run_in_seconds_leaving_nothing_behind(stopped_then_resumed):
    stopped = stopped_then_resumed["stopped"]
    print(f"\nCtrl-C → exit in {stopped['seconds']:.1f} s")
    assert stopped["proc"].returncode == 130, stopped["stderr"][-3000:]
    assert stopped["stderr"].strip().splitlines()[-1] == (
        "detectflow: interrupted; re-run with --run-id cli-run to resume")
    assert "Traceback" not in stopped["stderr"], stopped["stderr"][-3000:]
    assert stopped["seconds"] < 10
    assert not stopped["left"], f"processes left behind: {stopped['left']}"
    assert not stopped["manifest_after_stop"]


def test_rerun_resumes_prints_summary_and_run_folder_last(stopped_then_resumed, photos):
    proc, out = stopped_then_resumed["rerun"], stopped_then_resumed["out"]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out / "cli-run")
    summary = "\n".join(lines[-25:])
    assert f"run cli-run: {IMAGES} images, {IMAGES} ok, 0 failed" in summary
    assert "images/s" in summary
    progress = re.search(r"detect: \d+/\d+ images \(100%\)", proc.stdout + proc.stderr)
    assert progress, "\n".join(line for line in proc.stderr.splitlines() if "detect" in line)
    assert "row/s" not in proc.stdout + proc.stderr  # by us: no terminal bars from a Ray worker
    manifest = json.loads((out / "cli-run" / "manifest.json").read_text())
    rows = [r for f in manifest["output"]["files"]
            for r in pq.read_table(out / "cli-run" / f["path"]).to_pylist()]
    assert sorted(r["image_uri"] for r in rows) == sorted(str(p) for p in photos.glob("*.jpg"))
    # The stopped run's shards are reused, the rest inferred now.
    assert manifest["resume"]["shards_reused"] >= 1 and manifest["resume"]["images_inferred"] > 0, \
        manifest["resume"]
    assert len(list((out / "cli-run" / "samples").glob("*.png"))) == 4
    home, before = stopped_then_resumed["home"], stopped_then_resumed["before"]
    events = {name: count - before["events"].get(name, 0)
              for name, count in _stored_events(home).items()}  # the rerun's own
    assert events.get("prefect.flow-run.Running") == 1, events  # the run reported to its API...
    assert "prefect.flow-run.heartbeat" not in events, events  # ...which dies with it: no beats
    # Every task's logs reached that API although the run's local Ray killed its workers right
    # after the last task (Prefect sends logs in batches; workarounds.task_logs flushes them).
    by_task = {task_run: messages for task_run, messages in _task_logs(home).items()
               if task_run not in before["task_runs"]}
    # list, detect, validate, write, manifest, merge_table, latest
    assert len(by_task) == 7, by_task
    # ...and their states too, which Ray's workers send as events over a websocket: behind a
    # proxy (this test's environment has one) loopback must bypass it.
    task_runs = {name.rsplit("-", 1)[0]: state for id_, (name, state) in _task_runs(home).items()
                 if id_ not in before["task_runs"]}
    assert task_runs == dict.fromkeys(STAGES, "COMPLETED"), task_runs
    assert "Unable to connect" not in proc.stderr, proc.stderr[-3000:]
    for messages in by_task.values():  # each task's last log, as Prefect writes it
        assert any(m.startswith("Finished in state Completed") for m in messages), messages
    assert sum(m.startswith(f"wrote {IMAGES} rows") for ms in by_task.values() for m in ms) == 1
    assert sum(m.startswith(f"merged {IMAGES} rows into") for ms in by_task.values()
               for m in ms) == 1


def test_readme_lists_every_option_that_help_prints():
    """README's option table is generated from RunConfig like `--help`; after a field changes,
    paste ``python -c 'from detectflow.cli import options_table; print(options_table())'``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- options: generated")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end options -->")].strip()
    assert table == options_table()
    help_text = subprocess.run(CLI + ["run", "--help"], capture_output=True, text=True, cwd=ROOT,
                               env=os.environ | {"COLUMNS": "200"}, timeout=60).stdout
    flags = {part.split()[0] for line in help_text.splitlines() if line.startswith("  --")
             for part in line.strip().split("  ")[0].split(", ")} - {"--help"}
    listed = set()
    for flag in re.findall(r"`(--[^\s`]+)", table):
        listed |= {flag.replace("[no-]", ""), flag.replace("[no-]", "no-")}
    assert flags == listed
    assert len(flags) >= 31
