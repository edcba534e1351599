"""Where an inference actor's start goes, step by step, in a fresh process.

On a GPU the detect stage's first seconds pass with the GPU idle (benchmarks/RESULTS.md, "GPU"):
the actor's process imports torch, makes its CUDA context, builds the model, loads the weights
and runs its first batches. This times each of those steps as ``Detector.__init__`` and its
first calls do them, so a lever can aim at the largest. ``--plain-torchvision`` times upstream's
import (with TorchDynamo) instead of the actors' own.

    python -m benchmarks.probes.actor_start --device cuda [--weights W.pth] [--images DIR]

Without ``--weights`` / ``--images`` it takes the benchmark's (``make bench``'s cache, made here
when missing), so it also runs first on a fresh machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fasterrcnn_resnet50_fpn_v2")
    p.add_argument("--weights", default=None, help="default: the benchmark's (made if missing)")
    p.add_argument("--images", default=None, help="a folder of JPEGs (default: the benchmark's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--plain-torchvision", action="store_true",
                   help="import torchvision as upstream does (loads TorchDynamo), to compare")
    p.add_argument("--inputs-for", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inputs_for:
        print(*default_inputs(args.inputs_for), sep="\n")
        return 0
    if args.weights is None or args.images is None:
        # In a child process: this one must import torch first, inside the timing.
        made = subprocess.run([sys.executable, "-m", "benchmarks.probes.actor_start",
                               "--inputs-for", args.model],
                              check=True, capture_output=True, text=True)
        weights, images = made.stdout.splitlines()[-2:]
        args.weights, args.images = args.weights or weights, args.images or images

    steps: list[tuple[str, float]] = []
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        if args.device == "cuda" and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # never the first CUDA call: that is its own step
        now = time.perf_counter()
        steps.append((name, now - last))
        last = now

    import torch

    mark("import torch")
    if args.plain_torchvision:
        import torchvision  # noqa: F401 - timed on its own

        mark("import torchvision (plain: loads TorchDynamo)")
    else:
        from detectflow.workarounds.torchvision_import import import_torchvision

        import_torchvision()
        mark("import torchvision (TorchDynamo deferred, as actors do)")
    from detectflow import imaging, models
    from detectflow.predictor import Detector

    mark("import detectflow's predictor")
    if args.device == "cuda":
        torch.empty(1, device="cuda")
    mark("CUDA context")
    net = models.build_model(args.model, 0.5)
    mark("build the model (random init)")
    with models.weights_left_unfilled():
        net = models.build_model(args.model, 0.5)
    mark("build it again, fill skipped (as load_model does)")
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    mark("torch.load the weights")
    net.load_state_dict(state, strict=False)
    net.eval().to(args.device)
    mark("load_state_dict + to(device)")
    del net, state
    detector = Detector(args.model, args.weights, 0.5, "probe",
                        num_gpus=1.0 if args.device == "cuda" else 0.0, device=args.device)
    mark("Detector(...) as an actor makes it (all of the above again)")
    paths = sorted(Path(args.images).glob("*.jpg"))[: 3 * args.batch]
    images = [torch.from_numpy(imaging.decode(p.read_bytes())) for p in paths]
    mark(f"decode {len(images)} JPEGs (CPU)")
    for i in range(3):
        detector.predict(images[i * args.batch : (i + 1) * args.batch])
        mark(f"batch {i + 1} of {args.batch}")

    width = max(len(name) for name, _ in steps)
    print(f"actor start, {args.model} on {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    for name, seconds in steps:
        print(f"  {name:<{width}}  {seconds:6.2f} s")
    return 0


def default_inputs(model: str) -> tuple[str, str]:
    """The benchmark's weights for ``model`` and its 96 images, made when missing."""
    from benchmarks.images import make_images
    from benchmarks.run import ROOT, pick_weights
    from detectflow.models import hub_checkpoint_path

    cache = ROOT / "output" / "bench"
    weights = pick_weights(model, None, cache) or str(hub_checkpoint_path(model))
    return str(weights), str(make_images(96, cache / "images"))


if __name__ == "__main__":
    raise SystemExit(main())
