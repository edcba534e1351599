"""The two Ray Data UDFs: CPU decode (a task) and GPU/CPU inference (an actor).

``decode_batch`` reads and decodes images on CPU workers and ships uint8 pixels once;
``Detector`` loads the model once per actor, turns uint8 into the model's float input on its own
device (the weights' own ``transforms()``), and returns rows without pixels.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from detectflow import imaging, models, storage
from detectflow.schema import detection_row, rows_to_table

DECODED_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("shard", pa.int32()),
        pa.field("image_uri", pa.string()),
        pa.field("pixels", pa.large_binary()),  # uint8, (3, height, width), C-contiguous
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("error", pa.string()),
    ]
)


def decode_one(uri: str, max_side: int) -> dict[str, Any]:
    """Read + decode one image; errors become a short reason instead of an exception."""
    try:
        image = imaging.decode(storage.read_bytes(uri))
    except imaging.DecodeError as exc:
        return {"error": str(exc)}
    except FileNotFoundError:
        return {"error": "file not found"}
    except Exception as exc:  # unreadable file, permission, I/O: recorded, never fatal
        return {"error": f"cannot read image: {type(exc).__name__}: {exc}"[:300]}
    orig_h, orig_w = image.shape[-2:]
    image = imaging.limit_size(image, max_side)
    return {
        "pixels": image.numpy().tobytes(),
        "height": image.shape[-2],
        "width": image.shape[-1],
        "orig_height": orig_h,
        "orig_width": orig_w,
        "error": None,
    }


def decode_batch(batch: pa.Table, max_side: int) -> pa.Table:
    """Ray Data task UDF: listing rows → decoded rows (one per input row, failures included)."""
    rows = []
    for uri, index, shard in zip(
        batch.column("image_uri").to_pylist(),
        batch.column("index").to_pylist(),
        batch.column("shard").to_pylist(),
    ):
        rows.append({"index": index, "shard": shard, "image_uri": uri, **decode_one(uri, max_side)})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def group_by_shape(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Positions grouped by identical (H, W), in first-seen order.

    Batching only same-sized images means no padding differs from a single-image call, so results
    equal the model's per-image output exactly, and homogeneous datasets still batch fully.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pos, shape in enumerate(shapes):
        groups[shape].append(pos)
    return list(groups.values())


def pick_device(num_gpus: float, device: str) -> str:
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available() and (num_gpus > 0 or device == "cuda"):
        return "cuda"
    if device == "cuda":
        raise RuntimeError("device=cuda was requested but this actor sees no CUDA device")
    return "cpu"


def autocast(device: str, precision: str):
    """``torch.autocast`` for bf16/fp16 (matmuls and convolutions in half precision, the rest,
    e.g. box decoding and NMS, in float32), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device, dtype=dtype)


class Detector:
    """Ray Data actor: one model per actor, a batch of decoded images in, detection rows out."""

    def __init__(
        self,
        model: str,
        weights: str | None,
        score_threshold: float,
        run_id: str,
        num_gpus: float = 0.0,
        device: str = "auto",
        cpu_threads: int = 1,
        precision: str = "fp32",
    ) -> None:
        self.model_name = model
        self.run_id = run_id
        self.score_threshold = score_threshold
        self.device = pick_device(num_gpus, device)
        if self.device == "cpu":
            torch.set_num_threads(max(1, cpu_threads))
        resolved = models.resolve_weights(model, weights, checksum=False)
        self.model = models.load_model(model, resolved, score_threshold, self.device)
        self.transforms = models.default_weights(model).transforms()
        self.categories = models.categories(model)
        self.precision = precision
        self.pid = os.getpid()

    def _forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode(), autocast(self.device, self.precision):
            inputs = [self.transforms(img.to(self.device, non_blocking=True)) for img in images]
            outs = self.model(inputs)
        # Boxes and scores back in float32 whatever the precision, so rows never change type.
        return [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}
                for out in outs]

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per image: {boxes, scores, labels} or {error}; a failing batch is retried per image."""
        results: list[dict[str, Any]] = [{} for _ in images]
        for group in group_by_shape([tuple(img.shape[-2:]) for img in images]):
            try:
                outs = self._forward([images[i] for i in group])
            except Exception:
                outs = []
                for i in group:
                    try:
                        outs.extend(self._forward([images[i]]))
                    except Exception as exc:
                        outs.append({"error": f"inference failed: {type(exc).__name__}: {exc}"})
            for i, out in zip(group, outs):
                results[i] = out
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "pixels"}
        pixels = batch.column("pixels")
        ok = [i for i, err in enumerate(cols["error"]) if err is None]
        images = [
            torch.from_numpy(
                np.frombuffer(pixels[i].as_buffer(), dtype=np.uint8)
                .reshape(3, cols["height"][i], cols["width"][i])
                .copy()
            )
            for i in ok
        ]
        predictions = dict(zip(ok, self.predict(images)))
        rows = []
        for i in range(batch.num_rows):
            base = {
                "image_uri": cols["image_uri"][i],
                "index": cols["index"][i],
                "shard": cols["shard"][i],
                "model": self.model_name,
                "run_id": self.run_id,
            }
            pred = predictions.get(i)
            if pred is None or "error" in pred:
                error = cols["error"][i] if pred is None else pred["error"]
                rows.append(detection_row(**base, width=cols["orig_width"][i],
                                          height=cols["orig_height"][i], error=error))
                continue
            keep = pred["scores"] >= self.score_threshold
            boxes = imaging.rescale_boxes(
                pred["boxes"][keep].numpy(),
                (cols["height"][i], cols["width"][i]),
                (cols["orig_height"][i], cols["orig_width"][i]),
            )
            rows.append(
                detection_row(
                    **base,
                    width=cols["orig_width"][i],
                    height=cols["orig_height"][i],
                    boxes=boxes,
                    scores=pred["scores"][keep].numpy(),
                    labels=pred["labels"][keep].numpy(),
                    categories=self.categories,
                )
            )
        return rows_to_table(rows)
