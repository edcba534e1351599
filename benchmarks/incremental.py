"""Wall time of incremental runs against a full run of the same images (issue 33).

``python -m benchmarks.incremental [--images 400] [--rounds 1]``: N synthetic shapes images
(examples/shapes), detected with the shapes detector by ``detectflow run`` as a user runs it, each
run a fresh process with its own local Ray and Prefect server:

- **full**: every image, without ``--incremental`` (the baseline);
- **first incremental**: every image, into an empty table (the plan finds nothing to skip);
- **nothing new**: the same images again: no actors start;
- **1% new**: after adding 1% more images.

Prints one markdown table: wall seconds of the command, the detect stage's seconds, images
detected, and the ratio of each wall time to the full run's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from examples.shapes.data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
SHAPES = "examples.shapes.model:tiny_fasterrcnn"
WEIGHTS = ROOT / "examples" / "shapes" / "shapes_detector.pth"


def run(inp: Path, out: Path, run_id: str, *extra: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env["PREFECT_HOME"] = str(out.parent / "prefect-home")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "detectflow", "run", "--input", str(inp),
                           "--output", str(out), "--model", SHAPES, "--weights", str(WEIGHTS),
                           "--score-threshold", "0.3", "--run-id", run_id, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{run_id} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, json.loads((out / run_id / "manifest.json").read_text())


def one_round(work: Path, images: int, k: int) -> list[dict]:
    inp = work / "in"
    make_dataset(inp, images, seed=100 + k)
    (inp / "annotations.json").unlink()
    rows = []

    def measure(name: str, out: Path, run_id: str, *extra: str) -> None:
        wall, manifest = run(inp, out, run_id, *extra)
        rows.append({"run": name, "wall": wall, "detect": manifest["stage_seconds"]["detect"],
                     "detected": manifest["counts"]["images"],
                     "listed": manifest["input"]["count"]})

    measure("full", work / "full", "full", "--no-table")
    measure("first incremental", work / "out", "night-1", "--incremental")
    measure("nothing new", work / "out", "night-2", "--incremental")
    extra = work / "extra"
    make_dataset(extra, max(1, images // 100), seed=900 + k, subfolders=False)
    (extra / "annotations.json").unlink()
    for path in extra.iterdir():
        shutil.move(path, inp / "a" / f"new_{path.name}")
    measure("1% new", work / "out", "night-3", "--incremental")
    base = rows[0]["wall"]
    for row in rows:
        row["ratio"] = row["wall"] / base
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    print("| round | run | listed | detected | wall (s) | detect stage (s) | wall / full |")
    print("|---|---|---|---|---|---|---|")
    for k in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="detectflow-incremental-") as tmp:
            for row in one_round(Path(tmp), args.images, k):
                print(f"| {k + 1} | {row['run']} | {row['listed']} | {row['detected']} | "
                      f"{row['wall']:.1f} | {row['detect']:.1f} | {row['ratio']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
