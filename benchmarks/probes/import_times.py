"""Where an inference actor's imports go, in a fresh interpreter: the modules that cost most.

An actor imports ``ray.data`` (Ray Data's actor class, with pandas), torch and torchvision
before its model exists: most of the GPU's idle start (benchmarks/RESULTS.md, "GPU").
``python -X importtime`` says which modules take it (``torch._C``'s own time is the loading of
libtorch and its CUDA libraries), so the next lever can aim at the right one.

    python -m benchmarks.probes.import_times [--top 25]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

# What an inference actor imports before its first batch, in its order.
ACTOR_IMPORTS = ("import ray.data; import torch; "
                 "from detectflow.workarounds.torchvision_import import import_torchvision; "
                 "import_torchvision(); import detectflow.predictor")


def parse_importtime(text: str) -> list[tuple[float, float, str]]:
    """``-X importtime`` lines → (cumulative s, self s, module), largest cumulative first."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)) / 1e6, int(m.group(1)) / 1e6, m.group(3)[1:] + m.group(4)))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    cmd = [sys.executable, "-X", "importtime", "-c",
           f"import time; t = time.process_time(); {ACTOR_IMPORTS}; "
           "print('cpu', time.process_time() - t)"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:  # say why, not where in this script
        errors = [line for line in done.stderr.splitlines() if not line.startswith("import time")]
        print("the imports failed:", *errors[-15:], sep="\n", file=sys.stderr)
        return 1
    cpu = float(done.stdout.split()[-1])
    rows = parse_importtime(done.stderr)
    print(f"actor imports in a fresh interpreter: {wall:.2f} s wall (interpreter start "
          f"included), {cpu:.2f} CPU-s")
    print(f"{'cumulative s':>12} {'self s':>7}  module")
    for cumulative, own, module in rows[: args.top]:
        print(f"{cumulative:12.3f} {own:7.3f}  {module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
