"""Stopping `detectflow run` as users do, mid-detect: Ctrl-C in a terminal (SIGINT to the whole
process group). The command must be gone within seconds with its one line and exit code, leave no
process behind, and a re-run must resume. SIGTERM: tests/test_cluster.py (`kill` of a run on a
cluster) and tests/test_deployments.py (a worker or `serve` cancelling a run)."""

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
from settle import session_processes, settled

ROOT = Path(__file__).resolve().parent.parent
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
IMAGES, SHARD = 40, 8  # several shards, so the signal lands with some staged and some not


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_dir) -> Path:
    folder = tmp_path_factory.mktemp("stop-photos")
    originals = sorted(sample_dir.glob("*.jpg"))
    for i in range(IMAGES):
        shutil.copy(originals[i % len(originals)], folder / f"photo-{i:02d}.jpg")
    return folder


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), TORCH_HOME=str(tmp_path / "torch"))
    return env


def _start(tmp_path, photos, out, weights, run_id) -> subprocess.Popen:
    # Its own session, as a terminal gives a command its own process group: what it starts
    # (Ray, the API server) is found by the session id afterwards.
    return subprocess.Popen(
        [sys.executable, "-m", "detectflow", "run", "--input", str(photos), "--output", str(out),
         "--model", SMALL, "--weights", str(weights), "--score-threshold", "0.3",
         "--shard-size", str(SHARD), "--run-id", run_id],
        env=_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def _stop_mid_detect(proc: subprocess.Popen, staged: Path, send) -> tuple[str, float]:
    """Wait until detect has staged its first shard, signal, and wait for the exit."""
    deadline = time.monotonic() + 300
    while not list(staged.glob("shard-*.parquet")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "detect staged nothing in 300 s"
        time.sleep(0.1)
    assert session_processes(proc.pid), "the run's processes are not in its session"
    sent = time.monotonic()
    send()
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return stderr, time.monotonic() - sent


def _assert_stopped(proc, stderr: str, seconds: float, code: int, run_id: str) -> None:
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"detectflow: interrupted; re-run with --run-id {run_id} to resume")
    assert "Traceback" not in stderr, stderr[-3000:]
    assert seconds < 10, f"stopped after {seconds:.1f} s"
    # Processes still exiting are given a moment; a local Ray's processes all end.
    left = settled(lambda: session_processes(proc.pid), lambda found: not found, timeout=10)
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_the_rerun_resumes(tmp_path, photos, small_weights):
    out = tmp_path / "out"
    proc = _start(tmp_path, photos, out, small_weights, "ctrl-c")
    stderr, seconds = _stop_mid_detect(proc, out / "ctrl-c" / "_staging" / "detections",
                                       lambda: os.killpg(proc.pid, signal.SIGINT))
    print(f"\nCtrl-C → exit in {seconds:.1f} s")
    _assert_stopped(proc, stderr, seconds, 130, "ctrl-c")
    assert not (out / "ctrl-c" / "manifest.json").exists()

    rerun = _start(tmp_path, photos, out, small_weights, "ctrl-c")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    manifest = json.loads((out / "ctrl-c" / "manifest.json").read_text())
    rows = [r for f in manifest["output"]["files"]
            for r in pq.read_table(out / "ctrl-c" / f["path"]).to_pylist()]
    assert sorted(r["image_uri"] for r in rows) == sorted(str(p) for p in photos.glob("*.jpg"))
    assert manifest["resume"]["shards_reused"] >= 1, manifest["resume"]
