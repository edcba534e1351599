"""Synthetic shapes on textured backgrounds, with a COCO ground-truth file.

Each image holds 1-4 filled shapes (``CLASSES``, label ids 1..K in order) in random colours,
sizes and positions, without overlap, on noise, gradient, stripe or blotch backgrounds.
Everything follows from the seed, so a dataset can be regenerated instead of committed.

    python -m examples.shapes.data OUT_DIR --images 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star")

# Shapes are drawn this many times larger and scaled down: anti-aliased edges, like a photo's.
_SUPERSAMPLE = 4
_MAX_TRIES = 20

Size = tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An (h, w, 3) float image in [0, 255]: noise, gradient, stripes or blotches."""
    kind = rng.integers(4)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # flat colour with coarse noise
        img = np.broadcast_to(a, (h, w, 3)) + rng.normal(0, rng.uniform(5, 25), (h, w, 1))
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        img = a * (1 - t) + b * t
    elif kind == 2:  # stripes, soft or hard, at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        t = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        t = (t > 0).astype(np.float32) if rng.random() < 0.5 else (t + 1) / 2
        b = a + (b - a) * rng.uniform(0.2, 0.6)  # lower contrast than the shapes, mostly
        img = a * (1 - t[..., None]) + b * t[..., None]
    else:  # blotches: a coarse random grid blown up smoothly
        cells = rng.uniform(0, 255, (int(rng.integers(3, 8)), int(rng.integers(3, 8))))
        t = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
        img = a * (1 - t) + b * t
    return img.astype(np.float32)


def _polygon(kind: str, c: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or five-pointed star of circumradius ``r`` about (c, c)."""
    radii, n = {"square": ([r], 4), "triangle": ([r], 3)}.get(kind, ([r, r * 0.45], 10))
    return [(c + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n),
             c + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def _shape_mask(rng: np.random.Generator, kind: str, radius: float) -> np.ndarray:
    """Coverage (float, in [0, 1]) of one shape of circumradius ``radius`` centred in a square
    patch with a pixel of margin."""
    s = _SUPERSAMPLE
    n = int(math.ceil(2 * radius + 2))
    c = n * s / 2
    canvas = Image.new("L", (n * s, n * s), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([c - radius * s, c - radius * s, c + radius * s, c + radius * s], fill=255)
    else:
        # Squares stay near axis-aligned (a 45 degree square reads as a diamond); the rest spin.
        rot = (math.pi / 4 + rng.uniform(-0.3, 0.3)) if kind == "square" else rng.uniform(
            0, 2 * math.pi)
        draw.polygon(_polygon(kind, c, radius * s, rot), fill=255)
    return np.asarray(canvas.resize((n, n), Image.Resampling.BOX), dtype=np.float32) / 255


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < ox1 and ox0 < x1 and y0 < oy1 and oy0 < y1 for ox0, oy0, ox1, oy1 in others)


def _pick_size(rng: np.random.Generator, size: Size) -> tuple[int, int]:
    w, h = size
    if isinstance(w, tuple | list):
        return int(rng.integers(w[0], w[1] + 1)), int(rng.integers(h[0], h[1] + 1))
    return int(w), int(h)


def generate(
    n_images: int, seed: int, size: Size = (160, 160)
) -> Iterator[tuple[Image.Image, list[tuple[int, list[float]]]]]:
    """Yield ``n_images`` (RGB image, [(label, [x, y, w, h]), ...]) pairs, all from ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_images):
        w, h = _pick_size(rng, size)
        img = _background(rng, w, h)
        objects: list[tuple[int, list[float]]] = []
        taken: list[tuple[int, int, int, int]] = []  # the patches placed so far
        for _ in range(int(rng.integers(1, 5))):
            label = int(rng.integers(len(CLASSES))) + 1
            kind = CLASSES[label - 1]
            side = rng.uniform(0.14, 0.38) * min(w, h)
            # A square's corners reach sqrt(2) times half its side from its centre.
            mask = _shape_mask(rng, kind, side / 2 * (math.sqrt(2) if kind == "square" else 1))
            n = mask.shape[0]
            if n > min(w, h):
                continue
            for _ in range(_MAX_TRIES):  # a free place, 2 px from the others, if there is one
                x, y = int(rng.integers(0, w - n + 1)), int(rng.integers(0, h - n + 1))
                if not _overlaps((x - 2, y - 2, x + n + 2, y + n + 2), taken):
                    break
            else:
                continue  # none: fewer shapes in this image
            taken.append((x, y, x + n, y + n))
            region = img[y:y + n, x:x + n]
            # A colour that stands out from what lies under the shape (best of a few draws).
            under = region[mask >= 0.5].mean(axis=0)
            colours = rng.uniform(0, 255, (8, 3))
            colour = colours[np.argmax(np.linalg.norm(colours - under, axis=1))]
            shade = colour * rng.uniform(0.85, 1.15, (n, n, 1))  # uneven lighting on the fill
            region[:] = region * (1 - mask[..., None]) + shade * mask[..., None]
            # The box: tight around the pixels the shape covers at least half of.
            ys, xs = np.nonzero(mask >= 0.5)
            objects.append((label, [float(x + xs.min()), float(y + ys.min()),
                                    float(xs.max() + 1 - xs.min()),
                                    float(ys.max() + 1 - ys.min())]))
        img += rng.normal(0, rng.uniform(2, 8), img.shape)  # sensor noise over everything
        yield Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), objects


def make_dataset(
    out_dir: str | Path, n_images: int, seed: int, size: Size = (160, 160),
    subfolders: bool = True,
) -> Path:
    """Write ``n_images`` images and ``annotations.json`` (COCO) under ``out_dir``; returns the
    annotation file's path.

    ``size`` is (W, H), or ((W_min, W_max), (H_min, H_max)) for sizes drawn per image. Images
    alternate between ``a/`` and ``b/`` (when ``subfolders``), about half JPEG and half PNG.
    """
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 1])  # file formats: apart from the images' own stream
    images, annotations = [], []
    for i, (img, objects) in enumerate(generate(n_images, seed, size)):
        ext = "jpg" if rng.random() < 0.5 else "png"
        name = f"{'ab'[i % 2]}/img_{i:05d}.{ext}" if subfolders else f"img_{i:05d}.{ext}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(out / name, quality=92) if ext == "jpg" else img.save(out / name)
        images.append({"id": i + 1, "file_name": name, "width": img.width,
                       "height": img.height})
        for label, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": label, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES, start=1)]
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--flat", action="store_true", help="no a/ and b/ subfolders")
    args = parser.parse_args(argv)
    path = make_dataset(args.out_dir, args.images, args.seed, (args.width, args.height),
                        subfolders=not args.flat)
    print(f"wrote {args.images} images and {path}")


if __name__ == "__main__":
    main()
