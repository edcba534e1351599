"""Validate a sample of results and draw their boxes on the original images.

The checks are invariants any correct detector output meets; a violation means a bug upstream
(wrong box rescaling, wrong category table), so the run must fail before anything is published.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detectflow import imaging, storage

if TYPE_CHECKING:
    from PIL import Image

BOX_TOLERANCE = 1e-3  # pixels; float32 rounding at the image border
# Samples are for eyes and the Prefect UI: a gigapixel scan drawn at full size took seconds and
# gigabytes and made a PNG nobody opens.
SAMPLE_MAX_SIDE = 2048


def check_row(row: dict[str, Any], categories: Sequence[str]) -> list[str]:
    """Violations in one result row (empty list = fine)."""
    problems = []
    uri, width, height = row["image_uri"], row["width"], row["height"]
    if row.get("error"):
        return problems
    if not width or not height or width < 1 or height < 1:
        return [f"{uri}: invalid image size {width}x{height}"]
    if not (len(row["boxes"]) == len(row["scores"]) == len(row["labels"])):
        problems.append(f"{uri}: boxes, scores and labels differ in length")
    for box in row["boxes"]:
        x1, y1, x2, y2 = box
        if not all(math.isfinite(v) for v in box):
            problems.append(f"{uri}: non-finite box {box}")
        elif not (
            -BOX_TOLERANCE <= x1 <= x2 <= width + BOX_TOLERANCE
            and -BOX_TOLERANCE <= y1 <= y2 <= height + BOX_TOLERANCE
        ):
            problems.append(f"{uri}: box {[round(v, 2) for v in box]} outside {width}x{height}")
    for score in row["scores"]:
        if not (0.0 <= score <= 1.0):
            problems.append(f"{uri}: score {score} outside [0, 1]")
    for label, name in zip(row["labels"], row["label_names"]):
        if not (0 < label < len(categories)) or categories[label] != name:
            problems.append(f"{uri}: label {label} ({name!r}) not in the model's categories")
    return problems


def pick_sample(staged_uris: list[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` successful rows in listing order, preferring images with detections."""
    chosen: list[dict[str, Any]] = []
    spare: list[dict[str, Any]] = []
    for uri in staged_uris:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as handle:
            table: pa.Table = pq.read_table(handle)
        for row in table.to_pylist():
            if row["error"]:
                continue
            (chosen if row["labels"] else spare).append(row)
            if len(chosen) >= n:
                return chosen
    return (chosen + spare)[:n]


def draw(row: dict[str, Any], max_side: int = SAMPLE_MAX_SIDE) -> Image.Image:
    """The original image (EXIF orientation applied, as the pipeline decodes it), downscaled to
    at most ``max_side``, with the row's boxes (scaled alike) and ``label score`` captions drawn
    in red, in the style of torchvision's ``draw_bounding_boxes`` (which draws with Pillow too),
    without importing torch."""
    from PIL import ImageDraw, ImageFont

    image, full_hw = imaging.open_bounded(storage.read_image(row["image_uri"]), max_side)
    if not row["boxes"]:
        return image
    boxes = imaging.rescale_boxes(np.asarray(row["boxes"]), full_hw, (image.height, image.width))
    width = max(2, round(max(image.size) / 250))
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, 5 * width))
    for box, name, score in zip(boxes.tolist(), row["label_names"], row["scores"]):
        pen.rectangle(box, outline="red", width=width)
        pen.text((box[0] + width + 1, box[1] + width + 1), f"{name} {score:.2f}", fill="red",
                 font=font)
    return image
