"""The temporary Prefect API server that `detectflow run` starts when no API is configured."""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from settle import settled

from detectflow.errors import DetectflowError
from detectflow.workarounds.api_server import TemporaryApiServer, listening_socket

HEALTH = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_registers_no_block_types_and_leaves_prefects_own_server_to_do_it(released):
    """A run uses no blocks, so its server skips their registration (~1 s on a fresh database).
    It must not record the registration as done either: Prefect's own server, started later on
    the same database, still registers them. A new database: the tests' copies have them."""
    home = released["home"]
    assert released["block_types"] == []
    assert not (home / "memo_store.toml").exists()

    with listening_socket() as sock:
        env = {**os.environ, "PREFECT_HOME": str(home),
               "PREFECT_UI_ENABLED": "0",  # and Prefect's defaults for the rest
               "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "1",
               "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "1"}
        prefects = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--fd", str(sock.fileno()), "--log-level", "error", "--lifespan", "on"],
            env=env, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    try:
        # Clients wait in the listening socket's backlog until the server answers.
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            slugs = {block_type.slug for block_type in client.read_block_types()}
        assert {"local-file-system", "secret"} <= slugs
        assert (home / "memo_store.toml").exists()
    finally:
        prefects.terminate()
        prefects.wait(timeout=30)


def test_connections_it_accepts_send_small_responses_at_once():
    """uvicorn treats a ``--fd`` socket as a Unix socket and never sets ``TCP_NODELAY`` on its
    connections; without it every response waited for a delayed ACK (44 ms instead of 1 ms per
    API call, measured). The listener's option is what each accepted connection gets."""
    with listening_socket() as listener, \
            socket.create_connection(listener.getsockname(), timeout=10):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_server_that_cannot_start_fails_with_its_own_last_line(monkeypatch):
    """The run's error names the server's reason (read back from its log while it may still be
    writing there), not just an exit code."""
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "nope://nowhere")
    server = TemporaryApiServer()
    try:
        with pytest.raises(DetectflowError, match=r"exited with code \d+: .*nope"):
            server.wait(120)
    finally:
        server.stop()


def test_stopped_while_starting_it_exits_at_once_and_never_opens_a_database(tmp_path,
                                                                            monkeypatch):
    """A run that fails fast stops a server still importing Prefect: it must not finish its
    start (migrating the database) first."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    server = TemporaryApiServer()
    server.stop()
    # Its own exit: uvicorn's stop on SIGTERM, after a finished start, re-raises the signal.
    assert server.process.returncode == 0
    assert not (tmp_path / "home").exists()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A held server in a new ``PREFECT_HOME``, released: what a run that passed its checks
    has. Its database is new (the tests' copies have block types)."""
    home = tmp_path_factory.mktemp("released")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("PREFECT_HOME", str(home))
        server = TemporaryApiServer(held=True)
    try:
        server.release()
        with socket.create_connection(("127.0.0.1", server.port), timeout=120) as client:
            client.sendall(HEALTH)
            health = client.recv(64)
        with temporary_settings({PREFECT_API_URL: server.wait(120)}), \
                get_client(sync_client=True) as api:
            block_types = api.read_block_types()
    finally:
        server.stop()
    return {"home": home, "health": health, "block_types": block_types}


def test_a_held_server_opens_no_database_until_released(tmp_path, monkeypatch, released):
    """`detectflow run` holds its server while the run's own checks go on: built, it waits
    before its lifespan (migrations on a new database). A run that fails its checks stops a
    server that never touched the database; a run that passes them releases it."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "stopped"))
    server = TemporaryApiServer(held=True)
    try:
        # Its start has got as far as it goes while held once it stops using the CPU.
        samples = [-1.0]
        settled(lambda: samples.append(_cpu_seconds(server.process.pid)) or samples,
                lambda s: s[-1] == s[-2], timeout=120)
        assert server.process.poll() is None
        assert not (tmp_path / "stopped" / "prefect.db").exists()
    finally:
        server.stop()
    assert server.process.returncode == 0 and not (tmp_path / "stopped" / "prefect.db").exists()

    assert released["health"].startswith(b"HTTP/1.1 200")
    assert (released["home"] / "prefect.db").exists()


def test_holds_its_port_from_the_start_serves_early_clients_and_dies_with_its_run(
        prefect_home):
    """The server of a run (a process of its own here): its port is bound before the server
    has even imported Prefect, so nothing can take it (a run once failed when the port it had
    only found free was gone seconds later), and a client that connects this early waits in
    the backlog and is answered. A run killed with SIGKILL (no atexit hook runs) leaves no
    server behind: it reads its lifeline until the run is gone, then stops as on SIGTERM."""
    code = ("import json, sys, time; from detectflow.workarounds.api_server import "
            "TemporaryApiServer; s = TemporaryApiServer(); "
            "print(json.dumps({'pid': s.process.pid, 'port': s.port}), flush=True); "
            "sys.stdin.readline(); print(s.wait(120), flush=True); time.sleep(600)")
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}  # a migrated copy
    run = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        started = json.loads(run.stdout.readline())
        server_pid, port = started["pid"], started["port"]
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port), timeout=120) as early:
            early.sendall(HEALTH)
            run.stdin.write("\n")  # the run waits for its server only now
            run.stdin.flush()
            assert early.recv(64).startswith(b"HTTP/1.1 200")
        url = run.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/api"
        name = f"api-server-{uuid.uuid4().hex[:8]}"
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name(name)
            assert client.read_flow(flow_id).name == name

        assert _alive(server_pid)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        assert not settled(lambda: _alive(server_pid), lambda alive: not alive, timeout=30)
    finally:
        run.kill()
        run.wait()
    # And nothing listens there any more. (Not checked by binding the port again: once it is
    # free, any outgoing connection on the machine may take it as its local end, as CI's once
    # did, and the bind then fails with nothing of ours holding the port.)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def _alive(pid: int) -> bool:
    """Running, and not a zombie (its parent, the killed run, can no longer reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
