"""A real multi-node Ray cluster on one machine, started and stopped the way an operator does.

Each node is a ``ray start --block`` process in its own session, with its own ports, so the
cluster looks like any existing cluster to the flow (reached only by its address). Teardown
never uses ``ray stop``, which would kill *every* Ray on the machine (other test sessions' local
Rays included): it signals our nodes' process groups and then any process still carrying our
cluster's unique temp folder in its command line.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

# The ``ray`` CLI as a module of this interpreter: also where Ray is installed without its scripts
# (a ``pip install --target`` on a GPU machine, for the benchmark).
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def cmdline(pid: int) -> bytes:
    """A process's command line (NUL-separated), or b"" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def free_port() -> int:
    """A port free now, for a server that binds it seconds later.

    Not one the kernel hands out (``bind(0)``): those come from its ephemeral range, which is
    also where the local end of every outgoing connection comes from, so one could take the
    port before the server binds it. Nor Ray's worker ports (10002-19999 by default).
    """
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@dataclass
class LocalCluster:
    """``ray start --head`` plus ``ray start --address`` nodes, each with ``cpus_per_node``."""

    nodes: int = 2
    cpus_per_node: int = 1
    gpus_per_node: int = 0
    object_store_bytes: int | None = 100 * 1024 * 1024  # None: Ray's default share of memory
    # The state API needs the dashboard; a minimal Ray (no aiohttp_cors, e.g. carried to a GPU
    # machine for the benchmark) has none, and its head then starts without it.
    dashboard: bool = field(default_factory=lambda: find_spec("aiohttp_cors") is not None)
    # Short on purpose: Ray's unix sockets live under it and paths are capped at 107 bytes.
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dfc-", dir="/tmp"))
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        """What a user passes as ``--ray-address`` (the GCS bootstrap address)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The API server the state API (``ray.util.state``) talks to."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start_node(self, head: bool, env: dict[str, str]) -> None:
        index = len(self.procs)
        args = [
            *RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}", f"--num-gpus={self.gpus_per_node}",
            f"--temp-dir={self.temp_dir}",
            # Every per-node port is explicit: two raylets on one host must not share one.
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
        ]
        if self.object_store_bytes is not None:
            args.append(f"--object-store-memory={self.object_store_bytes}")
        if head:
            self.gcs_port = free_port()
            args += ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
                     f"--include-dashboard={str(self.dashboard).lower()}"]
            if self.dashboard:
                self.dashboard_port = free_port()
                args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += [f"--address={self.address}"]
        log = open(Path(self.temp_dir) / f"node-{index}.log", "wb")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def start(self, env: dict[str, str], timeout: float = 180) -> LocalCluster:
        # Ray 2.60 secures a new cluster with ~/.ray/auth_token; a joining node only presents
        # it in token mode (shared home here; on real nodes the token file or RAY_AUTH_TOKEN).
        env = {**env, "RAY_AUTH_MODE": "token"}
        if not env.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").exists():
            # A fresh machine (CI): make the token a local ray.init would have made.
            subprocess.run([*RAY, "get-auth-token", "--generate"], env=env, check=True,
                           capture_output=True, timeout=60)
        self._start_node(True, env)
        self._wait_for(1, timeout)
        for _ in range(self.nodes - 1):
            self._start_node(False, env)
        self._wait_for(self.nodes, timeout)
        return self

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the state API reports them (``node_id``, ``is_head_node``...)."""
        from ray.util.state import list_nodes

        use_token_auth()
        nodes = list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
        return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in nodes
                if (n.state if hasattr(n, "state") else n["state"]) == "ALIVE"]

    def _nodes_up(self) -> int:
        if self.dashboard:
            return len(self.alive_nodes())
        # No state API: a node is up once ``ray start`` says so (it waits for GCS and raylet).
        return sum("Ray runtime started" in log.read_text(errors="replace")
                   for log in Path(self.temp_dir).glob("node-*.log"))

    def _wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({proc.returncode}): {self.logs()}")
            try:
                if self._nodes_up() >= count:
                    return
            except Exception as exc:  # API server still starting
                error = exc
            time.sleep(1)
        raise RuntimeError(f"{count} Ray node(s) not up in {timeout:.0f} s ({error}): {self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        text = ""
        for path in sorted(Path(self.temp_dir).glob("node-*.log")):
            text += f"\n--- {path.name}\n" + path.read_text(errors="replace")[-tail:]
        return text

    def our_pids(self) -> list[int]:
        """Every process whose command line names our temp folder: raylets, GCS, workers."""
        return [int(entry.name) for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and int(entry.name) != os.getpid()
                and self.temp_dir.encode() in cmdline(int(entry.name))]

    def stop(self, grace: float = 2) -> None:
        """Stop worker nodes, then the head; kill what is left of *this* cluster only.

        A short grace: ``ray start --block`` stops its processes one by one on SIGTERM, waiting
        on each (over 10 s for these two nodes), and a test's cluster holds nothing to save.
        """
        for proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + grace
        while (left := self.our_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.our_pids():
            _signal(pid, signal.SIGKILL)
        time.sleep(0.5)
        if left := self.our_pids():
            raise RuntimeError(f"Ray processes of {self.temp_dir} still running: {left}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def use_token_auth() -> None:
    """Let this process's state-API client authenticate the way ``ray.init`` would.

    Ray 2.60 clusters enable token authentication when ``~/.ray/auth_token`` exists; a driver
    turns it on in ``ray.init``, but a bare state-API client does not, and is refused.
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the node's own session: ray start and what it spawned
    except ProcessLookupError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
