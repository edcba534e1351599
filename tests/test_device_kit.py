"""The GPU check script runs its steps as the device call will, here on the CPU.

A lent GPU gives a session 15 minutes; a script that first fails there wastes them. This runs
``benchmarks/probes/gpu_check.sh`` for real (the actor-start step, the small model, this CPU)
and checks what it leaves in its output folder, and that a wrong step fails at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "probes" / "gpu_check.sh"
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def run_script(*args: str, out: Path, timeout: float = 240, **env_vars: str
               ) -> subprocess.CompletedProcess:
    # Batches of 2: the steps are what is checked here, not the CPU's speed.
    env = os.environ | {"OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable,
                        "MODEL": SMALL, "BATCH": "2"} | env_vars
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_start_step_runs_and_leaves_its_logs(tmp_path, small_weights, sample_dir):
    # The suite's weights and photos: the benchmark's own would be made first on a fresh clone.
    done = run_script("imports", "start", out=tmp_path, WEIGHTS=str(small_weights),
                      IMAGES=str(sample_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = (tmp_path / "steps.txt").read_text()
    assert "=== imports exit 0" in steps and "=== start exit 0" in steps
    imports = (tmp_path / "imports.log").read_text()
    assert "actor imports in a fresh interpreter" in imports
    assert any(line.split()[-1] == "torch" for line in imports.splitlines()[2:])
    log = (tmp_path / "start.log").read_text()
    assert f"actor start, {SMALL} on cpu" in log
    # every step of the start was timed, the first batch included
    for step in ("import torch", "torch.load the weights", "batch 3 of 2"):
        assert step in log, log
    # the machine's versions are recorded beside the numbers
    env = (tmp_path / "env.txt").read_text()
    assert "torch" in env and "ray 2.60.0" in env and "prefect 3.9.1" in env


def test_the_default_plan_is_the_owed_measurements(tmp_path):
    done = run_script("--dry-run", out=tmp_path, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["imports", "bare", "fold4800"]
    assert "folded BN:fold_batchnorm=true" in lines[2] and "--n 4800" in lines[2]
    limits = [int(line.split("(")[1].split()[0]) for line in lines]
    assert sum(limits) <= 560  # one device call: 600 s at most, the unpack and set-up included
    assert not list(tmp_path.glob("*.log"))  # a dry run runs nothing


def test_an_unknown_step_fails_before_anything_runs(tmp_path):
    done = run_script("bare", "warmup", out=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "unknown step 'warmup'" in done.stderr
    assert not (tmp_path / "steps.txt").exists()
