"""Lever: batching images of similar size. Mixed-size images, one model, two ways to batch.

``python -m benchmarks.probes.mixed_sizes [--device cuda]`` decodes a set of photos of several
sizes and aspect ratios (cut from the bundled photos), then runs the Detector actor's
``predict`` over batches of ``--batch`` images, grouping each batch either by the images' own
(H, W) (the old key: only identical sizes share a forward call) or by the padded shape inside
the model (``model_input_shape``: one aspect ratio batches together whatever its size).
Prints images/s of both and the forward calls each made. Same images, model and weights for
both; no Ray, no I/O.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from benchmarks.images import SAMPLES
from benchmarks.run import GPU_MODEL, ROOT, SMALL_MODEL, pick_weights

# Common photo sizes: 4:3 and 3:4, 3:2, 16:9.
SIZES = [(640, 480), (800, 600), (1024, 768), (500, 375), (480, 640), (375, 500), (600, 400),
         (1200, 800), (1280, 720), (1920, 1080)]


def mixed_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    import numpy as np
    from PIL import Image

    from benchmarks.images import variant

    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = variant(sources[i % len(sources)], rng, rng.choice(SIZES))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous())
    return out


def timed(detector, images: list[torch.Tensor], batch: int, by_model_shape: bool):
    import detectflow.predictor as predictor

    calls = []
    forward = detector._forward
    detector._forward = lambda group: calls.append(len(group)) or forward(group)
    original = predictor.model_input_shape
    if not by_model_shape:  # the old key: the image's own size
        predictor.model_input_shape = lambda h, w, transform: (h, w)
    try:
        detector.predict(images[:batch])  # warm-up
        calls.clear()
        if detector.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            detector.predict(images[i : i + batch])
        if detector.device == "cuda":
            torch.cuda.synchronize()
        return len(images) / (time.perf_counter() - start), calls
    finally:
        predictor.model_input_shape = original
        del detector._forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.mixed_sizes",
                                description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache-dir", default=str(ROOT / "output" / "bench"))
    args = p.parse_args(argv)
    from detectflow.predictor import Detector

    model = GPU_MODEL if args.device == "cuda" else SMALL_MODEL
    weights = pick_weights(model, None, Path(args.cache_dir))
    detector = Detector(model, weights, 0.5, run_id="bench", device=args.device)
    images = [img.to(detector.device) for img in mixed_images(args.n)]
    rows = []
    for name, key in (("by image size (old)", False), ("by model input shape", True)):
        rate, calls = timed(detector, images, args.batch, key)
        rows.append((name, rate, len(calls), sum(calls) / len(calls)))
    print(f"\n{args.n} images of {len(SIZES)} sizes, {model}, {args.device}, batch {args.batch}")
    print(f"{'grouping':<24}{'img/s':>8}{'calls':>7}{'imgs/call':>11}{'x old':>7}")
    for name, rate, calls, per in rows:
        print(f"{name:<24}{rate:>8.2f}{calls:>7}{per:>11.2f}{rate / rows[0][1]:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
