"""Test-only crash points: freeze the process at a named step so a test can kill the run there.

``DETECTFLOW_TEST_FAILPOINT=NAME`` (or ``NAME:N`` for a counted point) makes the process that reaches
that step stop and wait to be killed. A test then SIGKILLs the whole run at a known step — a real
crash, without racing the pipeline. Unset (always, outside tests), every call is a no-op.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "DETECTFLOW_TEST_FAILPOINT"
FREEZE_S = 600.0  # then exit hard: a forgotten failpoint never lets the run carry on
EXIT_CODE = 70


def hit(name: str, count: int | None = None) -> None:
    """Freeze here if ``DETECTFLOW_TEST_FAILPOINT`` names this point (and ``count`` matches ``:N``)."""
    spec = os.environ.get(ENV, "")
    wanted, _, n = spec.partition(":")
    if not spec or wanted != name or (n and count != int(n)):
        return
    print(f"detectflow: failpoint {spec} reached, waiting to be killed", file=sys.stderr,
          flush=True)
    time.sleep(FREEZE_S)
    os._exit(EXIT_CODE)
