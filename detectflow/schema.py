"""The published Arrow schema (one row per image) and the pure functions that build rows.

Columns are Arrow list types rather than ragged numpy arrays: a batch of one image, or a batch whose
images all have the same number of boxes, then has the same type as any other batch
(see ray-project/ray#31779 and #30406).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

BOX = pa.list_(pa.float32(), 4)

DETECTION_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("boxes", pa.list_(BOX), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("labels", pa.list_(pa.int64()), nullable=False),
        pa.field("label_names", pa.list_(pa.string()), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        # What the detection was computed from: the listing's size:ETag or size:mtime_ns.
        pa.field("image_version", pa.string()),
    ],
    metadata={"detectflow.schema_version": "2", "boxes": "xyxy, original image pixels"},
)

# What the pipeline carries between stages besides the published columns: the listing position,
# which gives every image a stable place (its shard and its order in the output).
POSITION_FIELDS = [pa.field("index", pa.int64(), nullable=False), pa.field("shard", pa.int32())]
STAGED_SCHEMA = pa.schema(POSITION_FIELDS + list(DETECTION_SCHEMA))

# The detections table across runs (``<output>/table/``, Delta Lake): a published row, plus what
# it was computed by and from. Key: (image_uri, fingerprint); partitioned by fingerprint.
TABLE_SCHEMA = pa.schema(
    list(DETECTION_SCHEMA)
    + [pa.field("fingerprint", pa.string(), nullable=False)]  # config.model_fingerprint
)

LISTING_SCHEMA = pa.schema(
    [pa.field("image_uri", pa.string(), nullable=False), pa.field("size", pa.int64()),
     pa.field("image_version", pa.string())]
    + POSITION_FIELDS
)


def detection_row(
    *,
    image_uri: str,
    index: int,
    shard: int,
    width: int | None,
    height: int | None,
    boxes: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    categories: Sequence[str] = (),
    model: str,
    run_id: str,
    error: str | None = None,
    image_version: str | None = None,
) -> dict[str, Any]:
    """One output row; failed images get empty lists and an ``error`` reason."""
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)
    scores = np.zeros(0, np.float32) if scores is None else np.asarray(scores, np.float32)
    labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels, np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError("boxes, scores and labels must have the same length")
    return {
        "index": int(index),
        "shard": int(shard),
        "image_uri": image_uri,
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "boxes": boxes.reshape(-1, 4).tolist(),
        "scores": scores.tolist(),
        "labels": labels.tolist(),
        "label_names": [categories[i] if 0 <= i < len(categories) else str(i) for i in labels],
        "model": model,
        "run_id": run_id,
        "error": error,
        "image_version": image_version,
    }


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema = STAGED_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def published(table: pa.Table) -> pa.Table:
    """The staged table reduced to the published columns, in listing order."""
    ordered = table.sort_by("index") if table.num_rows else table
    return ordered.select(DETECTION_SCHEMA.names).cast(DETECTION_SCHEMA)
