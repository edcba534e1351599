"""The app the temporary API server runs: Prefect's own, built with the collector paused, and
stopped when the ``detectflow run`` that started it is gone."""

from __future__ import annotations

import os
import signal
import threading

from detectflow.gcpause import collection_paused

LIFELINE_ENV = "DETECTFLOW_API_LIFELINE_FD"  # set by ``workarounds.api_server.TemporaryApiServer``
# Set once the app is built. Until then nothing is open (the database is opened by the app's
# lifespan, after this): a stop may end the process at once.
_built = threading.Event()


def create_app():
    """``prefect.server.api.server.create_app``; its imports and build run without cyclic
    garbage collection (``gcpause``): less CPU for a start-up that competes with ours."""
    if (fd := os.environ.pop(LIFELINE_ENV, None)) is not None:
        threading.Thread(target=_stop_when_orphaned, args=(int(fd),), daemon=True,
                         name="detectflow-lifeline").start()
    with collection_paused():
        from prefect.server.api.server import create_app as prefect_create_app

        app = prefect_create_app()
    _built.set()
    return app


def _stop_when_orphaned(fd: int) -> None:
    """Block until the pipe's write end is closed (its process ended, however it ended, or it
    stopped the server), then stop as uvicorn stops on SIGTERM: in-flight requests finish, the
    database is closed. Before the app is built, exit at once: uvicorn would otherwise finish
    starting first (a doomed run's one-line error then waited seconds for it)."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    if not _built.is_set():
        os._exit(0)
    os.kill(os.getpid(), signal.SIGTERM)
