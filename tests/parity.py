"""Compare pipeline detections with a direct model call, tolerant only where it must be.

Boxes are matched one-to-one (same label, scores within tolerance, best IoU) rather than by
position: near-saturated scores tie, and tied boxes may come out of NMS in either order.
"""

import torch
from torchvision.ops import box_iou


def as_prediction(row: dict) -> dict:
    """A detection row as the model returns its prediction: tensors of boxes, scores, labels."""
    return {"boxes": torch.tensor(row["boxes"]).reshape(-1, 4),
            "scores": torch.tensor(row["scores"]),
            "labels": torch.tensor(row["labels"], dtype=torch.int64)}


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
