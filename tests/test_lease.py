"""One run of a run id at a time, and a published manifest never changes: real processes racing
for a run id, on a local folder and on the loopback S3 server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detectflow import storage
from detectflow.errors import RunTaken
from detectflow.lease import LEASE, run_lease
from detectflow.publish import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "detectflow"]

# A process that takes the lease, says so, holds it for a while and exits 0; or exits 3 with the
# refusal's message.
HOLDER = """
import sys, time
from detectflow import storage
from detectflow.errors import RunTaken
from detectflow.lease import run_lease
storage.configure(sys.argv[3] or None)
try:
    with run_lease(sys.argv[1], "same", wait=sys.argv[4] == "wait"):
        print("held", time.time(), flush=True)
        time.sleep(float(sys.argv[2]))
except RunTaken as exc:
    print(exc, flush=True)
    sys.exit(3)
"""


def _holder(run_uri: str, seconds: float, endpoint: str = "", wait: bool = False):
    return subprocess.Popen([sys.executable, "-c", HOLDER, run_uri, str(seconds), endpoint,
                             "wait" if wait else ""], cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path, s3):
    if request.param == "local":
        storage.configure(None)
        yield str(tmp_path / "out" / "same"), ""
    else:
        storage.configure(s3)
        yield f"s3://detectflow-out/lease-{time.monotonic_ns()}/same", s3
        storage.configure(None)


def test_two_processes_started_together_one_takes_the_run_id(run_uri):
    uri, endpoint = run_uri
    procs = [_holder(uri, 3, endpoint) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    winner = procs[[p.returncode for p in procs].index(0)]
    refused = outs[[p.returncode for p in procs].index(3)]
    assert refused.strip() == refused.strip().splitlines()[0]  # one line
    assert f"run id same is taken by pid {winner.pid} on {socket.gethostname()}" in refused
    assert "--wait" in refused
    assert not storage.exists(storage.join(uri, LEASE))  # released at the end


def test_wait_takes_the_run_id_once_its_holder_is_done(run_uri):
    uri, endpoint = run_uri
    first = _holder(uri, 3, endpoint)
    assert first.stdout.readline().startswith("held")
    released_by = time.time() + 3
    second = _holder(uri, 0, endpoint, wait=True)
    out, _ = second.communicate(timeout=60)
    first.wait(30)
    assert second.returncode == 0, out
    assert float(out.split()[1]) >= released_by - 0.5  # it held the lease only after the first


def test_a_killed_holder_does_not_keep_the_run_id(run_uri):
    uri, endpoint = run_uri
    holder = _holder(uri, 60, endpoint)
    assert holder.stdout.readline().startswith("held")
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    started = time.monotonic()
    with run_lease(uri, "same"):  # a lock dies with its process; an S3 lease names a dead pid
        assert time.monotonic() - started < 5


def test_an_s3_lease_of_a_live_holder_elsewhere_is_kept_until_it_expires(s3):
    storage.configure(s3)
    try:
        uri = f"s3://detectflow-out/lease-{time.monotonic_ns()}/same"
        lease = {"token": "x", "host": "another-machine", "pid": 1,
                 "since": "2026-12-06T00:00:00+00:00", "expires": time.time() + 60}
        storage.atomic_write_bytes(storage.join(uri, LEASE), json.dumps(lease).encode())
        with pytest.raises(RunTaken, match="taken by pid 1 on another-machine"):
            with run_lease(uri, "same"):
                pass
        lease["expires"] = time.time() - 1  # its holder stopped renewing it
        storage.atomic_write_bytes(storage.join(uri, LEASE), json.dumps(lease).encode())
        with run_lease(uri, "same"):
            assert json.loads(storage.read_bytes(storage.join(uri, LEASE)))["pid"] == os.getpid()
    finally:
        storage.configure(None)


def test_a_published_manifest_is_never_overwritten(run_uri):
    uri, _ = run_uri
    first = {"run_id": "same", "created_at": "first"}
    assert write_manifest(uri, first) == first
    published = storage.read_bytes(storage.join(uri, "manifest.json"))
    assert write_manifest(uri, {"run_id": "same", "created_at": "second"}) == first
    assert storage.read_bytes(storage.join(uri, "manifest.json")) == published
    assert read_manifest(uri) == first


def test_detectflow_run_refuses_a_taken_run_id_in_one_line(tmp_path, sample_dir, small_weights):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    with run_lease(str(out / "same"), "same"):  # another run holds it
        started = time.monotonic()
        proc = subprocess.run(
            CLI + ["run", "--input", str(sample_dir), "--output", str(out), "--weights",
                   str(small_weights), "--model", "fasterrcnn_mobilenet_v3_large_320_fpn",
                   "--run-id", "same"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"detectflow: error: run id same is taken by pid {os.getpid()} on "
        f"{socket.gethostname()} since " + proc.stderr.split(" since ")[1].split(";")[0]
        + "; wait for it with --wait, or use another run id"]
    assert "Started a local Ray" not in proc.stderr  # refused before Ray starts
    print(f"\ntaken run id refused in {seconds:.1f} s")
    assert not (out / "same").exists()
