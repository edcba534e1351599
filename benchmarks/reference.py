"""The reference: Ray's "Object Detection Batch Inference with PyTorch" recipe as written
(``../shared/reference/ray-object-detection-example.txt``), on our model and weights.

``read_images`` → ``map(preprocess_image)`` (per image: ``ToTensor`` + the weights' transforms,
so float32 tensors travel through the object store, next to the original image) →
``map_batches(ObjectDetectionModel, ActorPoolStrategy, batch_size=4)`` → results saved.

Only two substitutions, so all three pipelines run the same network: the model is built by name
with our weights file (the recipe downloads ``FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT``), and
the score threshold is the benchmark's (the recipe's 0.9). The recipe's ``write_parquet`` is done
batch by batch in the driver so the arrival of the first results can be timed; what is written
(images, labels, boxes) is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.measure import Clock, MemorySampler


def make_preprocess(model: str):
    def preprocess_image(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from torchvision import transforms

        from detectflow.models import default_weights

        weights = default_weights(model)
        preprocessor = transforms.Compose([transforms.ToTensor(), weights.transforms()])
        return {"image": data["image"], "transformed": preprocessor(data["image"])}

    return preprocess_image


class ObjectDetectionModel:
    def __init__(self, model: str, weights: str | None, score_threshold: float):
        from detectflow import models

        resolved = models.resolve_weights(model, weights, checksum=False)
        # Built as the recipe's `fasterrcnn_resnet50_fpn_v2(weights=...)` builds it: every weight
        # filled at random, then the checkpoint loaded (`models.load_model` skips the fill).
        self.model = models.build_model(model, score_threshold)
        state = torch.load(resolved.path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=False)
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.model.eval()

    def __call__(self, input_batch: dict[str, np.ndarray]) -> dict[str, Any]:
        batch = [torch.from_numpy(image) for image in input_batch["transformed"]]
        if torch.cuda.is_available():
            batch = [image.cuda() for image in batch]
        predictions = self.model(batch)
        return {
            "image": input_batch["image"],
            "labels": [pred["labels"].detach().cpu().numpy() for pred in predictions],
            "boxes": [pred["boxes"].detach().cpu().numpy() for pred in predictions],
        }


def run_reference(images_dir: Path, out_dir: Path, model: str, weights: str | None,
                  score_threshold: float, device: str, actors: int = 1) -> dict[str, Any]:
    """Run the recipe over ``images_dir``; Ray must already be initialised."""
    import ray

    n = len(list(images_dir.glob("*.jpg")))
    clock = Clock()
    with MemorySampler(ray=True) as mem:
        ds = ray.data.read_images(str(images_dir))
        ds = ds.map(make_preprocess(model))
        ds = ds.map_batches(
            ObjectDetectionModel,
            fn_constructor_kwargs={"model": model, "weights": weights,
                                   "score_threshold": score_threshold},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=4,
            num_gpus=1 if device == "cuda" else 0,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        done = 0
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            pq.write_table(_flat(batch), out_dir / f"part-{i:05d}.parquet")
            done += batch.num_rows
            clock.arrived(done)
        clock.stop()
    return {"images": done, "expected": n, "clock": clock, "peaks": mem.peaks}


def _flat(batch: pa.Table) -> pa.Table:
    """Tensor-extension columns as plain lists, so pyarrow alone can write them."""
    cols = {}
    for name in batch.column_names:
        col = batch.column(name)
        if isinstance(col.type, pa.ExtensionType):
            col = col.cast(col.type.storage_type) if hasattr(col.type, "storage_type") else col
        cols[name] = col
    return pa.table(cols)
