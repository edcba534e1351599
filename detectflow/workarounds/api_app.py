"""The app the temporary API server runs: Prefect's own, built with the collector paused, and
stopped when the ``detectflow run`` that started it is gone."""

from __future__ import annotations

import os
import signal
import threading

from detectflow.gcpause import collection_paused

LIFELINE_ENV = "DETECTFLOW_API_LIFELINE_FD"  # set by ``workarounds.api_server.TemporaryApiServer``
GO = b"g"  # written to the lifeline once the run's own checks have passed
# Set once the app is built. Until then nothing is open (the database is opened by the app's
# lifespan, after this): a stop may end the process at once.
_built = threading.Event()
# Set once the run may use the server. The built app waits for it before uvicorn runs its
# lifespan (migrations on a new database), so a run that fails its checks never opens the
# database: it is not left half-migrated, and the run's end does not wait on it.
_go = threading.Event()


def create_app():
    """``prefect.server.api.server.create_app``; its imports and build run without cyclic
    garbage collection (``gcpause``): less CPU for a start-up that competes with ours."""
    if (fd := os.environ.pop(LIFELINE_ENV, None)) is not None:
        threading.Thread(target=_stop_when_orphaned, args=(int(fd),), daemon=True,
                         name="detectflow-lifeline").start()
    else:
        _go.set()
    with collection_paused():
        from prefect.server.api.server import create_app as prefect_create_app

        app = prefect_create_app()
    _built.set()
    _go.wait()
    return app


def _stop_when_orphaned(fd: int) -> None:
    """Let the app start once the pipe says ``GO``; block until its write end is closed (its
    process ended, however it ended, or it stopped the server), then stop as uvicorn stops on
    SIGTERM: in-flight requests finish, the database is closed. Closed before ``GO`` or before
    the app is built, exit at once: uvicorn would otherwise finish starting first (a doomed
    run's one-line error then waited seconds for it)."""
    try:
        while byte := os.read(fd, 1):
            if byte == GO:
                _go.set()
    except OSError:
        pass
    if not (_built.is_set() and _go.is_set()):
        os._exit(0)
    os.kill(os.getpid(), signal.SIGTERM)
