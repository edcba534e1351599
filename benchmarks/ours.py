"""Ours: the flow's detect stage alone (Ray already up), and the whole flow as a user runs it.

The detect stage is ``pipeline.run_detection`` exactly as the ``detect`` task calls it (listing
shards → decode tasks → Detector actors → staged Parquet shards). The whole flow is
``python -m detectflow run`` in a fresh process, all five tasks: on its own (Prefect's temporary
API server, a new local Ray) and against long-lived services (a Prefect server and a Ray head
that outlive the run, as deployments use). Its overhead is its wall time minus the detect
stage's own seconds, read from the manifest it publishes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Clock, MemorySampler
from detectflow import workarounds
from detectflow.config import RunConfig
from detectflow.listing import write_listing
from detectflow.pipeline import plan_resources, run_detection

ROOT = Path(__file__).resolve().parent.parent


def run_detect_stage(images_dir: Path, work_dir: Path, **params: Any) -> dict[str, Any]:
    """One detect stage over ``images_dir``; Ray must already be initialised."""
    import ray

    cfg = RunConfig(input_uri=str(images_dir), output_uri=str(work_dir), run_id="bench",
                    **params)
    listing = write_listing(cfg.input_uri, str(work_dir / "listing"), cfg.extensions,
                            cfg.shard_size)
    plan = plan_resources(cfg, ray.cluster_resources())
    clock = Clock()
    with MemorySampler(ray=True) as mem:
        stats = run_detection(cfg, str(work_dir / "listing"), str(work_dir / "staged"),
                              listing["images"], plan,
                              on_progress=lambda done, total, elapsed: clock.arrived(done),
                              actor_env=workarounds.actor_runtime_env())
        clock.stop()
    return {"images": stats.images, "failed": stats.failed, "detections": stats.detections,
            "clock": clock, "peaks": mem.peaks, "plan": plan}


def run_whole_flow(images_dir: Path, work_dir: Path, model: str, weights: str | None,
                   score_threshold: float, device: str, extra: list[str] = (),
                   log: Path | None = None, services: dict | None = None) -> dict[str, Any]:
    """``detectflow run`` in a child process; wall time, peak memory and the manifest's timings.

    With ``services`` (``benchmarks.services.long_lived_services``) the run uses that Prefect
    server and Ray cluster, as a deployment does, and their processes count in its memory.
    """
    services = services or {"args": [], "env": {}, "pids": []}
    cmd = [sys.executable, "-m", "detectflow", "run", "--input", str(images_dir),
           "--output", str(work_dir), "--model", model, "--score-threshold",
           str(score_threshold), "--device", device, "--run-id", "bench-flow", *extra,
           *services["args"]]
    if weights:
        cmd += ["--weights", weights]
    # As a user runs it: the flow turns Ray Data's progress bars off for its own dataset.
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"}
    env.update(services["env"])
    log = log or work_dir / "flow.log"
    work_dir.mkdir(parents=True, exist_ok=True)
    start, started_at = time.perf_counter(), dt.datetime.now()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with MemorySampler(pid=proc.pid, also=tuple(services["pids"])) as mem:
            code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"detectflow run exited {code}; see {log}")
    manifest = json.loads((work_dir / "bench-flow" / "manifest.json").read_text())
    stages = manifest["stage_seconds"]
    return {"images": manifest["counts"]["images"], "wall": wall, "stages": stages,
            "detect_seconds": stages["detect"], "overhead": wall - stages["detect"],
            "peaks": mem.peaks, "log": str(log),
            "timeline": timeline(log.read_text(errors="replace"), started_at)}


# Log lines that mark the start-up steps of `detectflow run`, in order.
MARKS = {
    "ray started": "Ray started|Started a local Ray instance",
    "flow run begins": "Beginning flow run",
    "first task logs": "Task run 'list_images",
    "detect starts": "resource plan:",
    "detect done": "Task run 'detect-.*Finished",
    "flow done": "Flow run .* Finished",
}
_TIME = re.compile(r"(\d\d:\d\d:\d\d)[.,](\d{3})")


def timeline(text: str, started_at: dt.datetime) -> dict[str, float]:
    """Seconds from the process start to the first log line matching each mark."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name, pattern in MARKS.items():
            if name in out or not re.search(pattern, line) or not (m := _TIME.search(line)):
                continue
            clock = dt.datetime.strptime(m.group(1), "%H:%M:%S").time()
            when = dt.datetime.combine(started_at.date(), clock).replace(
                microsecond=int(m.group(2)) * 1000)
            out[name] = round((when - started_at).total_seconds(), 1)
    return out
