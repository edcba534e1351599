"""A deterministic benchmark image set: N JPEGs of one size cut from the bundled photos.

Every pipeline reads the same files, so their numbers compare. Same size for all images (like
the reference's Pascal VOC subset, mostly 500x375) keeps batching identical across pipelines.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "sample_images"
SIZE = (640, 480)  # width, height


def variant(src: Image.Image, rng: random.Random, size: tuple[int, int] = SIZE) -> Image.Image:
    """A random crop (60-100% of each side), maybe mirrored, resized to ``size``."""
    w, h = src.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def make_images(n: int, cache_dir: Path, seed: int = 0) -> Path:
    """``cache_dir/n<N>/img-00000.jpg`` …; reused when already complete."""
    out = Path(cache_dir) / f"n{n}-{SIZE[0]}x{SIZE[1]}-s{seed}"
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    rng = random.Random(seed)
    for i in range(n):
        variant(sources[i % len(sources)], rng).save(out / f"img-{i:05d}.jpg", quality=90)
    done.touch()
    return out
