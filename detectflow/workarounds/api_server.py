"""Prefect's temporary API server, started as the very first thing a local run does.

Without ``PREFECT_API_URL`` Prefect starts this server itself, but only once the flow is called,
after every import and, in our flow, before Ray starts: the three waits added up
(benchmarks/RESULTS.md, Start-up). This module starts the same server (the command and environment of
Prefect's ephemeral mode, ``prefect.server.api.server.SubprocessASGIServer``, but on a socket
we bind first) in a subprocess before anything heavy is imported, so its start-up overlaps ours.
The flow is then pointed at it with ``PREFECT_API_URL``, the setting Prefect documents for a
server of one's own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from detectflow.errors import DetectflowError
from detectflow.workarounds.api_app import GO, LIFELINE_ENV

# Prefect's ephemeral server: no UI, the services of an ephemeral server only. No block type
# registration: a run uses no blocks, and on a fresh PREFECT_HOME (a new container) it costs
# a share of the server's start (benchmarks/RESULTS.md, lever log). Its memo off too, or
# Prefect would record the registration as done, and a later `prefect server start` on the same
# database would skip it.
_EPHEMERAL_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                  "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "0",
                  "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "0"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def listening_socket() -> socket.socket:
    """A loopback TCP socket on a free port, listening, with ``TCP_NODELAY`` for what it accepts.

    uvicorn wraps a socket passed by ``--fd`` as a Unix socket, so asyncio never sets
    ``TCP_NODELAY`` on its connections, and every response then waited for a delayed ACK. Linux gives accepted sockets the
    listener's ``TCP_NODELAY``.
    """
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class TemporaryApiServer:
    """A Prefect API server on a free loopback port, for the lifetime of one ``detectflow run``."""

    def __init__(self, held: bool = False) -> None:
        """``held``: import and build, but open no database until ``release`` (or ``wait``)."""
        import importlib.util

        # The port is bound and listening here and the socket handed to uvicorn (``--fd``): a
        # port merely found free and bound seconds later by the server could meanwhile be taken,
        # e.g. as the local end of any outgoing connection (both come from the kernel's
        # ephemeral range), and the run would fail at once. Clients that connect before the
        # server is up wait in the listen backlog instead of being refused.
        self._log = tempfile.TemporaryFile()
        # Prefect's own app (``api_app``: built without cyclic garbage collection).
        app_dir = os.path.dirname(os.path.dirname(importlib.util.find_spec("detectflow").origin))
        # The server's lifeline (``api_app``): it reads a pipe whose other end only this process
        # holds, and stops when that read ends, i.e. when this process has ended, however it
        # ended (an atexit hook does not run on SIGKILL, e.g. the OOM killer's).
        lifeline, self._lifeline = os.pipe()  # not inherited by other children (PEP 446)
        self._released = False
        with listening_socket() as sock:  # the child keeps its copy; ours closes after the spawn
            self.port = sock.getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}/api"
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
                     "detectflow.workarounds.api_app:create_app", "--fd", str(sock.fileno()),
                     "--log-level", "error", "--lifespan", "on"],
                    env={**os.environ, **_EPHEMERAL_ENV, LIFELINE_ENV: str(lifeline)},
                    stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    pass_fds=(sock.fileno(), lifeline),
                    # Out of the terminal's process group: Ctrl-C is for the run to handle,
                    # which still reports its end here; the lifeline stops the server after.
                    start_new_session=True,
                )
            finally:
                os.close(lifeline)
        if not held:
            self.release()

    def release(self) -> None:
        """Let a held server finish its start: the run's own checks have passed."""
        if self._lifeline is not None and not self._released:
            self._released = True
            try:
                os.write(self._lifeline, GO)
            except BrokenPipeError:  # it has exited already: ``wait`` says why
                pass

    def wait(self, timeout: float) -> str:
        """Release the server, and block until it answers its health check; its URL."""
        self.release()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DetectflowError(f"Prefect's temporary API server exited with code "
                                      f"{self.process.returncode}: {self._tail()}")
            try:
                with _NO_PROXY.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                pass
            time.sleep(0.1)
        raise DetectflowError(f"Prefect's temporary API server did not answer within "
                              f"{timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
                              f"SECONDS): {self._tail()}")

    def _tail(self) -> str:
        # pread, not seek: the server writes through the same open file (and offset), so a seek
        # made while it is still writing would have it overwrite its earlier lines.
        fd = self._log.fileno()
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        lines = text.strip().splitlines()
        return lines[-1][:300] if lines else "no output"

    def stop(self) -> None:
        """Stop the server through its lifeline (``api_app``): at once while it is still
        starting or held, else as on SIGTERM."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
