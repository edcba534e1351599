"""Shared fixtures: real local Ray (2 CPUs), a real Prefect API (test harness: a subprocess
server on loopback with a temporary SQLite database), the bundled photos and offline weights."""

import os
import sys
from pathlib import Path

# Before Prefect or Ray are imported anywhere: keep test runs quiet and self-contained.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Credentials for the loopback S3 server, set before Ray starts so its workers inherit them the
# way they would on a real node. The secret is distinctive so tests can prove it never leaks.
S3_SECRET = "detectflow-test-secret-must-not-leak"
os.environ["AWS_ACCESS_KEY_ID"] = "testing-key-id"
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_var, None)

import contextlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

# A suite started in the background (a CI job may be) has SIGINT ignored, and every process a
# test starts would inherit that; a user's shell starts commands with it on. (Prefect's runners,
# stopped with SIGINT, then hung until killed.)
signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ray_nodes import free_port  # noqa: E402,F401 - tests import it from here

SMALL_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"

# `make test` hands whole modules to its workers in collection order (--dist loadfile, with
# xdist's reordering by test count off): the longest go first, so that no worker is left
# running one of them alone at the end (benchmarks/RESULTS.md, "Test suite").
LONGEST_FIRST = ("test_deployments", "test_reliability", "test_incremental_runs", "test_cli",
                 "test_cluster", "test_own_detector", "test_default_model", "test_bad_input",
                 "test_s3", "test_api_server", "test_torchvision_import", "test_flow",
                 "test_models", "test_lease", "test_allocator", "test_device_kit",
                 "test_raycluster", "test_file_names", "test_classes")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return ROOT / "data" / "sample_images"


def _once_per_suite(tmp_path_factory, name: str, make) -> Path:
    """``name`` in the folder that xdist's workers share, made by ``make(path)`` in the first
    worker to take its lock; whole or not at all (a worker may die while it writes)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # this run's folder, above the worker's own
        shared = shared.parent
    path = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = path.with_name(f"{name}.partial")
            make(partial)
            os.replace(partial, path)
    return path


@pytest.fixture(scope="session")
def small_weights(sample_dir, tmp_path_factory) -> Path:
    """Calibrated (non-degenerate) weights for the small model, made offline once per suite."""
    from calibrated_weights import write_calibrated_weights

    return _once_per_suite(tmp_path_factory, f"{SMALL_MODEL}.pth",
                           lambda path: write_calibrated_weights(SMALL_MODEL, sample_dir, path))


def _harness_database(path: Path) -> None:
    """Copy the test harness's database to ``path`` (SQLite's backup: consistent while the
    server writes)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    live = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]
    with contextlib.closing(sqlite3.connect(live)) as source, \
            contextlib.closing(sqlite3.connect(path)) as copy:
        source.backup(copy)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        # Its database as it starts, migrated and empty, for other servers' tests (prefect_db).
        _once_per_suite(tmp_path_factory, "prefect.db", _harness_database)
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def prefect_db(prefect_api, tmp_path_factory) -> Path:
    """A migrated, empty Prefect database: the first harness's own as it started. A server
    starting on a new database spends seconds of CPU migrating it; tests of servers that need
    no new database (a user's second run) start on a copy of this one."""
    return _once_per_suite(tmp_path_factory, "prefect.db", _harness_database)


@pytest.fixture
def prefect_home(prefect_db, tmp_path) -> Path:
    """A new ``PREFECT_HOME`` holding a copy of the migrated database."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    shutil.copy(prefect_db, home / "prefect.db")
    return home


@pytest.fixture(scope="session")
def ray_local(prefect_api):
    """The worker's local Ray, started as ``detectflow run`` starts one: with the environment
    its flows' tasks need (the API above), so that they run on its pooled workers."""
    import ray

    from detectflow import raycluster

    raycluster.start_local(raycluster.worker_env(prefect_api), num_cpus=2, num_gpus=0,
                           namespace="detectflow-tests", log_to_driver=True)
    yield ray
    ray.shutdown()


# Our own opener: urllib's global one keeps the proxy settings of its first use (a test points
# proxies at a closed port to make a weights download fail at once).
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """Start a real S3-compatible server (moto's standalone mode) on loopback."""

    def start(**env: str) -> str:
        port = free_port()
        log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                LOOPBACK.open(url + "/moto-api/data.json", timeout=2)
                return url
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto server exited") from None
                time.sleep(0.2)
        raise RuntimeError("moto server did not start in 60 s")

    procs: list[subprocess.Popen] = []
    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3(moto_server, sample_dir):
    """A loopback S3 with bucket ``detectflow-in`` (photos under ``photos/``) and an empty
    ``detectflow-out``; yields the endpoint URL."""
    import s3fs

    url = moto_server()
    fs = s3fs.S3FileSystem(endpoint_url=url)
    fs.mkdir("detectflow-in")
    fs.mkdir("detectflow-out")
    for path in sorted(sample_dir.glob("*.jpg")):
        fs.put_file(str(path), f"detectflow-in/photos/{path.name}")
    fs.pipe_file("detectflow-in/other/readme.txt", b"not an image")
    return url


@pytest.fixture(scope="session")
def s3_auth(moto_server):
    """A second loopback S3 that enforces IAM: bucket ``auth-in`` holds a photo, ``auth-out``
    exists, and user ``reader`` may only list and read ``auth-in``. Yields (url, key, secret)."""
    import json

    import boto3

    url = moto_server()
    setup = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup")
    s3c, iam = boto3.client("s3", **setup), boto3.client("iam", **setup)
    for bucket in ("auth-in", "auth-out"):
        s3c.create_bucket(Bucket=bucket)
    s3c.put_object(Bucket="auth-in", Key="photos/chelsea.jpg",
                   Body=(ROOT / "data" / "sample_images" / "chelsea.jpg").read_bytes())
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-input", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
                       "Resource": ["arn:aws:s3:::auth-in", "arn:aws:s3:::auth-in/*"]}],
    }))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    # From now on every request must be signed by a known key and allowed by its policy.
    LOOPBACK.open(urllib.request.Request(
        url + "/moto-api/reset-auth", data=b"0", method="POST",
        headers={"Content-Type": "text/plain"}), timeout=10)
    return url, key["AccessKeyId"], key["SecretAccessKey"]
