"""A tiny Faster R-CNN for the synthetic shapes: a custom factory for ``--model``.

    detectflow run ... --model examples.shapes.model:tiny_fasterrcnn \\
        --weights examples/shapes/shapes_detector.pth

torchvision's ``FasterRCNN`` with a six-layer stride-8 backbone (conv + batch norm + ReLU, all
in one ``nn.Sequential`` so the pipeline can fold the norms), one feature map, anchors sized to
the shapes and a slim box head: 0.57 M parameters, 2.3 MB in fp32.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

# The shapes dataset's image size (examples/shapes/data.py): its images go in unscaled, others
# are brought to a 160 px short side, where shapes (drawn relative to it) have the trained size.
MIN_SIZE = 160
MAX_SIZE = 320


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def backbone(width: int = 16) -> nn.Sequential:
    """Stride 8, ``4 * width`` channels. The dilated last layer widens the receptive field to
    about 70 px, the largest shapes' size, at no extra cost."""
    net = nn.Sequential(
        *_block(3, width, 2),
        *_block(width, 2 * width, 2), *_block(2 * width, 2 * width),
        *_block(2 * width, 4 * width, 2), *_block(4 * width, 4 * width),
        *_block(4 * width, 4 * width, dilation=2),
    )
    net.out_channels = 4 * width  # what FasterRCNN reads to size its heads
    return net


def tiny_fasterrcnn(
    num_classes: int, width: int = 16, pool: int = 7, sampling_ratio: int = 1,
    head_size: int = 128, **kwargs: Any,
) -> FasterRCNN:
    """The shapes detector for ``num_classes`` labels (background included), untrained.

    ``kwargs`` go to ``FasterRCNN`` (e.g. ``box_score_thresh``) and override the defaults here.
    """
    body = backbone(width)
    options: dict[str, Any] = {
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        # One feature map of stride 8: shapes are 20-70 px, three sizes and ratios cover them.
        "rpn_anchor_generator": AnchorGenerator(sizes=((16, 32, 64),),
                                                aspect_ratios=((0.5, 1.0, 2.0),)),
        # A handful of objects per image: far fewer proposals than COCO's defaults, far faster.
        "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 32,
        "box_detections_per_img": 20,
        # RoIAlign's backward runs on one core: one sample per bin and 32 sampled boxes per image
        # (above) keep it to about a quarter of a training step.
        "box_roi_pool": MultiScaleRoIAlign(featmap_names=["0"], output_size=pool,
                                           sampling_ratio=sampling_ratio),
        "box_head": TwoMLPHead(body.out_channels * pool * pool, head_size),
        "box_predictor": FastRCNNPredictor(head_size, num_classes),
    }
    options.update(kwargs)
    return FasterRCNN(body, **options)
