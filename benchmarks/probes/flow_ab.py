"""Whole-flow A/B: ``detectflow run`` alternating between two settings.

A start-up lever moves a run by a second or two, while a shared VM's speed drifts by more than
that within an hour, so runs an hour apart cannot show it. Here each pair runs both settings back
to back, in alternating order, on the same images, and the table gives the means, their ranges
and in how many pairs B was quicker (method: benchmarks/RESULTS.md, "Method").

A setting is ``NAME=VALUE``: a lower-case NAME is a RunConfig field, given to ``detectflow run``
as its option; an upper-case one an environment variable of the run (Ray's, Prefect's). An
empty VALUE leaves it unset (the default).

    python -m benchmarks.probes.flow_ab ray_dashboard=false ray_dashboard=true --pairs 4
    python -m benchmarks.probes.flow_ab PREFECT_LOGGING_LEVEL= PREFECT_LOGGING_LEVEL=WARNING
    python -m benchmarks.probes.flow_ab A B --device cuda --n 1600 --set precision=fp16 ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.run import GPU_MODEL, SMALL_MODEL, flow_flags, pick_weights

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.flow_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="NAME=VALUE for the A runs (VALUE may be empty: unset)")
    p.add_argument("b", help="NAME=VALUE for the B runs")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--n", type=int, default=96, help="images (cut as `make bench` cuts them)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a RunConfig field for every run, e.g. precision=fp16 (repeatable)")
    p.add_argument("--cache-dir", default=str(ROOT / "output" / "bench"))
    return p.parse_args(argv)


def setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"flow_ab: expected NAME=VALUE, got {text!r}")
    return name, value


def format_table(label: dict[str, str], runs: dict[str, list[dict]]) -> str:
    def cell(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows]
        return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = ["| runs | setting | wall s | detect stage s | outside detect s |",
             "|---|---|---|---|---|"]
    for key in ("a", "b"):
        cells = [cell(runs[key], col) for col in ("wall", "detect", "outside")]
        lines.append(" | ".join([f"| {len(runs[key])}", label[key], *cells]) + " |")
    pairs = list(zip(runs["a"], runs["b"]))
    for key in ("wall", "detect", "outside"):
        deltas = [b[key] - a[key] for a, b in pairs]
        quicker = sum(d < 0 for d in deltas)
        lines.append(f"\nB - A, {key}: mean {statistics.mean(deltas):+.2f} s, "
                     f"B quicker in {quicker} of {len(pairs)} pairs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.images import make_images
    from benchmarks.ours import run_whole_flow

    args = parse_args(argv)
    settings = {"a": setting(args.a), "b": setting(args.b)}
    cache = Path(args.cache_dir)
    model = args.model or (GPU_MODEL if args.device == "cuda" else SMALL_MODEL)
    weights = pick_weights(model, args.weights, cache)
    images = make_images(args.n, cache / "images")
    label = {k: f"{n}={v}" if v else f"{n} unset" for k, (n, v) in settings.items()}
    print(f"flow_ab: {args.n} images, model {model}, device {args.device}, "
          f"{os.cpu_count()} CPUs; A: {label['a']}, B: {label['b']}", flush=True)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for k in range(args.pairs):
        for key in ("a", "b") if k % 2 == 0 else ("b", "a"):
            name, value = settings[key]
            option = name.islower()  # a RunConfig field, else an environment variable
            extra = flow_flags(args.sets + ([f"{name}={value}"] if option and value else []))
            # The child's environment: ours with the setting applied (an empty value unsets).
            saved = None if option else os.environ.pop(name, None)
            if value and not option:
                os.environ[name] = value
            work = Path(tempfile.mkdtemp(prefix="flow-ab-", dir=cache))
            try:
                result = run_whole_flow(images, work, model, weights, args.score_threshold,
                                        args.device, extra, log=work / "flow.log")
            finally:
                if not option:
                    os.environ.pop(name, None)
                if saved is not None:
                    os.environ[name] = saved
                shutil.rmtree(work, ignore_errors=True)
            row = {"wall": result["wall"], "detect": result["detect_seconds"],
                   "outside": result["overhead"]}
            runs[key].append(row)
            print(f"pair {k + 1} {key.upper()} {label[key]}: wall {row['wall']:.2f} s, detect "
                  f"{row['detect']:.2f} s, outside detect {row['outside']:.2f} s", flush=True)
    print("\n" + format_table(label, runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
