"""The two Ray Data UDFs: CPU decode (a task) and GPU/CPU inference (an actor).

``decode_batch`` reads and decodes images on CPU workers and ships uint8 pixels once (or, with
``gpu_decode``, ships plain JPEGs still encoded, a tenth of the bytes, for the GPU to decode);
``Detector`` loads the model once per actor, turns uint8 into the model's float input on its own
device (the weights' own ``transforms()``), and returns rows without pixels.

torch is imported inside the actor's methods only: the process that builds the pipeline (a
Prefect task worker) only needs these names, and the decode tasks decode with Pillow into numpy;
importing torch + torchvision costs each process seconds of CPU and hundreds of MiB
(benchmarks/RESULTS.md, Start-up).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from detectflow import allocator, gcpause, imaging, models, storage
from detectflow.schema import detection_row, rows_to_table

if TYPE_CHECKING:
    import torch

DECODED_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("shard", pa.int32()),
        pa.field("image_uri", pa.string()),
        pa.field("image_version", pa.string()),
        pa.field("pixels", pa.large_binary()),  # uint8, (3, height, width), C-contiguous
        pa.field("encoded", pa.large_binary()),  # or a plain JPEG as read, for the GPU to decode
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("error", pa.string()),
    ]
)


def decode_one(uri: str, max_side: int, ship_jpeg: bool = False) -> dict[str, Any]:
    """Read + decode one image; errors become a short reason instead of an exception.

    The image is decoded straight to at most ``max_side`` where its format allows
    (``imaging.open_bounded``); ``orig_height``/``orig_width`` are its full size, for boxes.
    With ``ship_jpeg``, a plain JPEG (``imaging.plain_jpeg_size``) is not decoded here but
    returned as read, for a GPU actor to decode.
    """
    try:
        data = storage.read_image(uri)
        if ship_jpeg and (size := imaging.plain_jpeg_size(data, max_side)):
            return {"encoded": data, "height": size[0], "width": size[1],
                    "orig_height": size[0], "orig_width": size[1], "error": None}
        image, (orig_h, orig_w) = imaging.open_bounded(data, max_side)
    except imaging.DecodeError as exc:
        return {"error": str(exc)}
    except FileNotFoundError:
        return {"error": "file not found"}
    except Exception as exc:  # unreadable file, permission, I/O: recorded, never fatal
        return {"error": f"cannot read image: {type(exc).__name__}: {exc}"[:300]}
    pixels = imaging.to_chw(image)
    return {
        "pixels": pixels.tobytes(),
        "height": pixels.shape[-2],
        "width": pixels.shape[-1],
        "orig_height": orig_h,
        "orig_width": orig_w,
        "error": None,
    }


def decode_batch(batch: pa.Table, max_side: int, ship_jpeg: bool = False,
                 keep_freed_memory: bool = False) -> pa.Table:
    """Ray Data task UDF: listing rows → decoded rows (one per input row, failures included).

    ``keep_freed_memory``: the worker's malloc keeps the decoded pixels' blocks for the next
    image instead of mapping each anew (``allocator``)."""
    if keep_freed_memory:
        allocator.keep_freed_memory()
    rows = []
    versions = (batch.column("image_version").to_pylist()
                if "image_version" in batch.column_names else [None] * batch.num_rows)
    for uri, index, shard, version in zip(
        batch.column("image_uri").to_pylist(),
        batch.column("index").to_pylist(),
        batch.column("shard").to_pylist(),
        versions,
    ):
        rows.append({"index": index, "shard": shard, "image_uri": uri, "image_version": version,
                     **decode_one(uri, max_side, ship_jpeg)})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def model_input_shape(height: int, width: int, transform: Any) -> tuple[int, int]:
    """The padded (H, W) the model's own ``GeneralizedRCNNTransform`` gives this image.

    Same arithmetic as torchvision's (float32 scale, floor of the resized size, padding up to a
    multiple of ``size_divisible``); a model without that transform keeps the image's shape.
    """
    if transform is None or not hasattr(transform, "size_divisible"):
        return height, width
    if getattr(transform, "fixed_size", None):
        height, width = transform.fixed_size[1], transform.fixed_size[0]
    else:
        low, high = np.float32(min(height, width)), np.float32(max(height, width))
        scale = float(min(np.float32(transform.min_size[-1]) / low,
                          np.float32(transform.max_size) / high))
        height, width = math.floor(height * scale), math.floor(width * scale)
    step = transform.size_divisible
    return math.ceil(height / step) * step, math.ceil(width / step) * step


def group_by_shape(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Positions grouped by identical shape, in first-seen order.

    Called with the shape each image has inside the model (``model_input_shape``): images of one
    aspect ratio batch together whatever their size, and since each is padded to exactly what a
    single-image call pads it to, results equal the model's per-image output; a mixed batch would
    pad small images up to the largest one's size.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pos, shape in enumerate(shapes):
        groups[shape].append(pos)
    return list(groups.values())


def pick_device(num_gpus: float, device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

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
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device, dtype=dtype)


def model_tuning(device: str, channels_last: bool | None = None,
                 fold_batchnorm: bool | None = None) -> tuple[bool, bool]:
    """(channels_last, fold_batchnorm) for a model on ``device``; ``None`` (the default) means
    on for a CPU, where together they run the model faster with the same boxes, and off for a
    GPU, until measured there (benchmarks/RESULTS.md, lever log)."""
    auto = device == "cpu"
    return (auto if channels_last is None else channels_last,
            auto if fold_batchnorm is None else fold_batchnorm)


def tune_for_device(model: Any, device: str, channels_last: bool | None = None,
                    fold_batchnorm: bool | None = None) -> Any:
    """Batch norms folded into their convolutions (``bnfold``) and convolutions in the
    channels-last (NHWC) layout, which tensor cores and oneDNN's CPU kernels read natively: the
    weights are reordered, not changed. Either way boxes differ only by float rounding."""
    channels_last, fold_batchnorm = model_tuning(device, channels_last, fold_batchnorm)
    if fold_batchnorm:
        from detectflow.bnfold import fold_batch_norms

        fold_batch_norms(model)
    if not channels_last:
        return model
    import torch

    return model.to(memory_format=torch.channels_last)


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
        channels_last: bool | None = None,
        fold_batchnorm: bool | None = None,
        keep_freed_memory: bool = True,
        num_classes: int | None = None,
        categories: Sequence[str] | None = None,
        keep: Sequence[int] = (),
    ) -> None:
        self.model_name = model
        self.run_id = run_id
        self.score_threshold = score_threshold
        with gcpause.collection_paused():  # torch's imports and the model's build (gcpause)
            import torch

            self.device = pick_device(num_gpus, device)
            if self.device == "cpu":
                torch.set_num_threads(max(1, cpu_threads))
                if keep_freed_memory:  # before the model's first batch allocates
                    allocator.keep_freed_memory()
            resolved = models.resolve_weights(model, weights, checksum=False)
            net = models.load_model(model, resolved, score_threshold, "cpu", num_classes)
            self.model = tune_for_device(net.to(self.device), self.device, channels_last,
                                         fold_batchnorm)
        self._local = threading.local()  # each thread's CUDA stream (``gpu_streams`` > 1)
        self.transforms = models.input_transform(model)
        self.categories = list(categories or models.categories(model))
        self.keep = np.asarray(sorted(keep), dtype=np.int64)  # empty: every label
        self.precision = precision
        self.pid = os.getpid()

    def _forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            inputs = [self.transforms(img.to(self.device, non_blocking=True)) for img in images]
            outs = self.model(inputs)
        # Boxes and scores back in float32 whatever the precision, so rows never change type.
        return [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}
                for out in outs]

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per image: {boxes, scores, labels} or {error}; a failing batch is retried per image."""
        results: list[dict[str, Any]] = [{} for _ in images]
        transform = getattr(self.model, "transform", None)
        shapes = [model_input_shape(*img.shape[-2:], transform) for img in images]
        for group in group_by_shape(shapes):
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

    def _host_tensor(self, buffer: pa.Buffer, height: int, width: int) -> torch.Tensor:
        """Shipped pixels as a tensor the actor owns: in pinned memory for a GPU actor, so the
        host-to-device copy is a DMA that ``non_blocking=True`` really overlaps."""
        import torch

        array = np.frombuffer(buffer, dtype=np.uint8).reshape(3, height, width)
        if self.device != "cuda":
            return torch.from_numpy(array.copy())
        out = torch.empty((3, height, width), dtype=torch.uint8, pin_memory=True)
        np.copyto(out.numpy(), array)
        return out

    def decode_jpegs(self, blobs: list[bytes]) -> list[torch.Tensor | str]:
        """Plain JPEGs → uint8 tensors on the actor's device (nvJPEG, one batched call on a GPU);
        an error reason (str) for an image that cannot be decoded.

        A failing batch is decoded again image by image; an image the device decoder rejects goes
        through the CPU decoders exactly as in a decode task (``imaging.decode``), so a corrupt
        file gets the same row whichever side decoded it.
        """
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        raws = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(raws, mode=ImageReadMode.RGB, device=self.device))
        except Exception:
            pass
        out: list[torch.Tensor | str] = []
        for raw, blob in zip(raws, blobs):
            try:
                out.append(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
            except Exception:
                try:
                    out.append(torch.from_numpy(imaging.decode(bytes(blob))))
                except imaging.DecodeError as exc:
                    out.append(str(exc))
        return out

    def _inputs(self, batch: pa.Table, cols: dict[str, list]) -> dict[int, torch.Tensor | str]:
        """Row position → image tensor (shipped pixels or a JPEG decoded here) or error reason."""
        pixels = batch.column("pixels")
        encoded = batch.column("encoded") if "encoded" in batch.column_names else None
        out: dict[int, torch.Tensor | str] = {}
        jpegs: list[int] = []
        for i, err in enumerate(cols["error"]):
            if err is not None:
                continue
            if encoded is not None and encoded[i].is_valid:
                jpegs.append(i)
            else:
                out[i] = self._host_tensor(pixels[i].as_buffer(), cols["height"][i],
                                           cols["width"][i])
        if jpegs:
            decoded = self.decode_jpegs([encoded[i].as_buffer() for i in jpegs])
            for i, image in zip(jpegs, decoded):
                shape = (3, cols["height"][i], cols["width"][i])
                if not isinstance(image, str) and tuple(image.shape) != shape:
                    image = f"decoded shape {tuple(image.shape)} differs from the header's {shape}"
                if isinstance(image, str):  # a row as a decode task would have made it
                    cols["orig_height"][i] = cols["orig_width"][i] = None
                out[i] = image
        return out

    def _stream(self):
        """This thread's own CUDA stream on a GPU (Ray Data runs ``gpu_streams`` batches at once
        in threads of this actor): copies, decoding and the model's kernels of one batch queue
        there, so another batch's kernels fill the GPU while this one runs its serial steps."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        import torch

        if (stream := getattr(self._local, "stream", None)) is None:
            stream = self._local.stream = torch.cuda.Stream()
        return torch.cuda.stream(stream)

    def __call__(self, batch: pa.Table) -> pa.Table:
        skip = ("pixels", "encoded")
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names
                if name not in skip}
        with self._stream():
            inputs = self._inputs(batch, cols)
            ok = [i for i, image in inputs.items() if not isinstance(image, str)]
            predictions = dict(zip(ok, self.predict([inputs[i] for i in ok])))
        predictions.update({i: {"error": reason} for i, reason in inputs.items()
                            if isinstance(reason, str)})
        rows = []
        versions = cols.get("image_version") or [None] * batch.num_rows
        for i in range(batch.num_rows):
            base = {
                "image_uri": cols["image_uri"][i],
                "index": cols["index"][i],
                "shard": cols["shard"][i],
                "image_version": versions[i],
                "model": self.model_name,
                "run_id": self.run_id,
            }
            pred = predictions.get(i)
            if pred is None or "error" in pred:
                error = cols["error"][i] if pred is None else pred["error"]
                rows.append(detection_row(**base, width=cols["orig_width"][i],
                                          height=cols["orig_height"][i], error=error))
                continue
            scores, labels = pred["scores"].numpy(), pred["labels"].numpy()
            keep = scores >= self.score_threshold
            if self.keep.size:  # ``only``: the other classes' boxes are dropped
                keep &= np.isin(labels, self.keep)
            boxes = imaging.rescale_boxes(
                pred["boxes"].numpy()[keep],
                (cols["height"][i], cols["width"][i]),
                (cols["orig_height"][i], cols["orig_width"][i]),
            )
            rows.append(
                detection_row(
                    **base,
                    width=cols["orig_width"][i],
                    height=cols["orig_height"][i],
                    boxes=boxes,
                    scores=scores[keep],
                    labels=labels[keep],
                    categories=self.categories,
                )
            )
        return rows_to_table(rows)
