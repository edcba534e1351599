"""Run test code in a fresh interpreter: an import, a process-wide setting or a Ray of one's own
can only be observed once per process, and never in the test session's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str, timeout: float = 240, **env_vars: str) -> dict:
    """Run ``code`` in a new Python process from the repository root; the JSON its last line of
    stdout prints. ``RAY_ADDRESS`` is left out, so a ``ray.init`` there starts its own Ray;
    ``env_vars`` are added to its environment."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env_vars
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
