"""Compare pipeline detections with a direct model call, tolerant only where it must be.

Boxes are matched one-to-one (same label, scores within tolerance, best IoU) rather than by
position: near-saturated scores tie, and tied boxes may come out of NMS in either order.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_iou


def as_prediction(row: dict) -> dict:
    """A detection row as the model returns its prediction: tensors of boxes, scores, labels."""
    return {"boxes": torch.tensor(row["boxes"]).reshape(-1, 4),
            "scores": torch.tensor(row["scores"]),
            "labels": torch.tensor(row["labels"], dtype=torch.int64)}


def direct_prediction(model: torch.nn.Module, path: str | Path,
                      preprocess: Callable | None = None,
                      score_threshold: float | None = None) -> dict:
    """``model``'s prediction for one image file, decoded by torchvision (an independent check
    of the pipeline's own decoder). A factory's model knows no threshold: give the run's."""
    image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    with torch.inference_mode():
        out = model([preprocess(image) if preprocess else image.float() / 255])[0]
    if score_threshold is None:
        return out
    keep = out["scores"] >= score_threshold
    return {k: v[keep] for k, v in out.items()}


def assert_same_detections(row: dict, ref: dict, iou: float = 0.99, score_tol: float = 1e-3):
    found = as_prediction(row)
    boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
    assert len(boxes) == len(ref["boxes"]), (len(boxes), len(ref["boxes"]))
    assert sorted(labels.tolist()) == sorted(ref["labels"].tolist())
    if not len(boxes):
        return
    ious = box_iou(boxes, ref["boxes"].float())
    compatible = (labels[:, None] == ref["labels"][None, :]) & (
        (scores[:, None] - ref["scores"][None, :]).abs() <= score_tol
    )
    ious = torch.where(compatible, ious, torch.zeros_like(ious))
    taken: set[int] = set()
    for i in torch.argsort(ious.max(dim=1).values, descending=True).tolist():
        order = torch.argsort(ious[i], descending=True).tolist()
        j = next(j for j in order if j not in taken)
        assert ious[i, j] >= iou, f"box {boxes[i].tolist()} has no match (best IoU {ious[i, j]:.4f})"
        taken.add(j)
