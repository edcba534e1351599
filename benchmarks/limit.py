"""The limit: the bare model's forward loop over images already decoded in memory.

No Ray, no I/O, no decoding in the timed loop: the float input the model takes, batch after
batch, at the best of a few batch sizes. Torch uses all its default threads (every core).
A pipeline cannot beat this by much; it is the bound for that model on that device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import MemorySampler


def load_inputs(images_dir: Path, device: str) -> list[torch.Tensor]:
    from detectflow.imaging import decode

    return [
        decode(p.read_bytes()).to(device).float().div_(255)
        for p in sorted(images_dir.glob("*.jpg"))
    ]


def loop(net: torch.nn.Module, inputs: list[torch.Tensor], batch: int, device: str) -> float:
    """Seconds for one pass over ``inputs`` in batches of ``batch`` (after one warm-up batch)."""
    with torch.inference_mode():
        net(inputs[:batch])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            net(inputs[i : i + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def run_limit(images_dir: Path, model: str, weights: str | None, score_threshold: float,
              device: str, batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
              sweep_images: int = 48) -> dict[str, Any]:
    """Images/s at each batch size (on at most ``sweep_images`` images) and the best of them."""
    from detectflow import models

    with MemorySampler() as mem:
        net = models.load_model(model, models.resolve_weights(model, weights, checksum=False),
                                score_threshold, device)
        inputs = load_inputs(images_dir, device)[:sweep_images]
        rates = {b: len(inputs) / loop(net, inputs, b, device) for b in batch_sizes}
    best = max(rates, key=rates.get)
    return {"rates": rates, "best_batch": best, "rate": rates[best], "images": len(inputs),
            "peaks": mem.peaks, "threads": torch.get_num_threads()}
