"""Build offline, "calibrated" torchvision detection weights for tests.

Why this exists: tests must run without network access, so the pretrained COCO weights cannot be
downloaded. They should still exercise the real loading path (``torch.load(path,
weights_only=True)`` followed by ``load_state_dict(strict=True)`` into a stock torchvision
builder) and real inference, not fake detections. A seeded random init is useless for that: every
proposal gets the same box-head features, so all detections tie. Here the random weights are made
to behave like a (meaningless but non-degenerate) detector instead:

* batch-norm running statistics are recalibrated on a few real photos (cumulative average over
  the model's own transformed batch), so activations are well scaled and depend on the image;
* the classification logits layer weights are multiplied by ``logit_scale`` so scores spread out
  instead of sitting near ``1 / num_classes`` (or the RetinaNet prior).

The boxes and labels are arbitrary; only their variety is meaningful.

Usage::

    python tests/calibrated_weights.py --model fasterrcnn_mobilenet_v3_large_320_fpn \
        --images data/sample_images --out /tmp/frcnn_mnv3.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.io import ImageReadMode, decode_image

# Per-model logit multiplier, tuned on data/sample_images: calibrated on all five photos, each gets
# at least one detection with score >= 0.5 (the resnet50 model: calibrated on one photo, dozens).
# Feature magnitudes differ between photos (high-contrast ones give ~4x larger activations), so
# with several calibration photos the high-contrast ones get many confident boxes.
DEFAULT_LOGIT_SCALE = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": 45.0,
    "fasterrcnn_resnet50_fpn_v2": 12.0,
    "retinanet_resnet50_fpn_v2": 2.5,
    "ssdlite320_mobilenet_v3_large": 8.0,
}
MODEL_NAMES = tuple(DEFAULT_LOGIT_SCALE)


def build_model(model_name: str) -> nn.Module:
    """A stock, randomly initialised model with the COCO class count (no downloads)."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unsupported model {model_name!r}; expected one of {MODEL_NAMES}")
    builder = torchvision.models.get_model_builder(model_name)
    return builder(weights=None, weights_backbone=None, num_classes=91)


def _logit_layers(model: nn.Module) -> list[nn.Module]:
    """The final layers producing classification logits."""
    if hasattr(model, "roi_heads"):  # Faster R-CNN
        return [model.roi_heads.box_predictor.cls_score]
    cls_head = model.head.classification_head
    if hasattr(cls_head, "cls_logits"):  # RetinaNet
        return [cls_head.cls_logits]
    return [block[-1] for block in cls_head.module_list]  # SSDlite: 1x1 conv after depthwise+BN


@torch.no_grad()
def make_calibrated_state_dict(
    model_name: str, images: list[torch.Tensor], seed: int = 0, logit_scale: float | None = None
) -> dict:
    """Seeded random weights with BN statistics calibrated on ``images`` (uint8 CHW RGB).

    ``logit_scale`` defaults to ``DEFAULT_LOGIT_SCALE[model_name]``.
    """
    if not images:
        raise ValueError("need at least one calibration image")
    torch.manual_seed(seed)
    model = build_model(model_name).eval()
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    # Full forward in eval mode with only the BN layers in train mode: this calibrates the
    # backbone and any BN inside the heads (SSDlite heads, Faster R-CNN v2 box head) alike.
    # One pass: in train mode a BN layer normalises with the batch's own statistics, so more
    # passes over the same images only average the same numbers again.
    model([img.float() / 255 for img in images])
    model.eval()
    if logit_scale is None:
        logit_scale = DEFAULT_LOGIT_SCALE[model_name]
    for layer in _logit_layers(model):
        layer.weight.mul_(logit_scale)
    return model.state_dict()


def write_calibrated_weights(
    model_name: str, image_dir: str | Path, out_path: str | Path, **kw
) -> Path:
    """Calibrate on the sorted ``*.jpg`` files of ``image_dir`` and save to ``out_path``."""
    paths = sorted(Path(image_dir).glob("*.jpg"))
    images = [decode_image(str(p), mode=ImageReadMode.RGB) for p in paths]
    state_dict = make_calibrated_state_dict(model_name, images, **kw)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_path)
    return out_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--images", required=True, help="directory of *.jpg calibration photos")
    parser.add_argument("--out", required=True, help="output .pth path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=None)
    args = parser.parse_args()
    out = write_calibrated_weights(
        args.model, args.images, args.out, seed=args.seed, logit_scale=args.logit_scale
    )
    print(out)


if __name__ == "__main__":
    main()
