"""Long-lived services for the whole-flow row that runs as deployments do.

A scheduled deployment does not start a Prefect server or a Ray cluster: both outlive the run.
This starts a real ``prefect server start`` and a real ``ray start --head`` (``LocalCluster``,
the tests' one-machine cluster, with one node) before the run, outside its timing, and stops
them after. The run then reaches them by address, like any deployment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' one-machine Ray cluster

from ray_nodes import LocalCluster, free_port  # noqa: E402


@contextlib.contextmanager
def prefect_server(log: Path, timeout: float = 120) -> Iterator[tuple[str, int]]:
    """``prefect server start`` on loopback with its own home and database; yields the API URL
    and the server's process id."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="bench-prefect-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}/api"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                opener.open(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start; see {log}") from None
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def long_lived_services(cpus: int, gpus: int, log_dir: Path) -> Iterator[dict]:
    """A Prefect server and a one-node Ray cluster; yields what ``detectflow run`` needs to use
    them (``--ray-address`` and environment) and the services' process ids (for memory)."""
    cluster = LocalCluster(nodes=1, cpus_per_node=cpus, gpus_per_node=gpus,
                           object_store_bytes=None)
    with prefect_server(log_dir / "prefect-server.log") as (api_url, server_pid):
        cluster.start(dict(os.environ))
        try:
            yield {
                # Deployments run on nodes whose environment holds detectflow: no code shipped.
                "args": ["--ray-address", cluster.address, "--no-ship-code"],
                "env": {"PREFECT_API_URL": api_url, "RAY_AUTH_MODE": "token"},
                "pids": [server_pid] + [p.pid for p in cluster.procs],
            }
        finally:
            cluster.stop()
