"""The app the temporary API server runs: Prefect's own, built with the collector paused."""

from __future__ import annotations

from detectflow.gcpause import collection_paused


def create_app():
    """``prefect.server.api.server.create_app``; its imports and build run without cyclic
    garbage collection (``gcpause``): 0.3-0.5 CPU-s less of a start-up that competes with ours."""
    with collection_paused():
        from prefect.server.api.server import create_app as prefect_create_app

        return prefect_create_app()
