"""Batch norms folded into their convolutions (``fold_batchnorm``): the same function, fewer ops.

Checked on the real torchvision architectures with non-trivial batch-norm statistics (a model
built without weights has mean 0 and variance 1 everywhere, which a wrong fold could pass), and
through the ``Detector`` on the offline calibrated weights against the unfolded model's rows.
"""

import copy

import pyarrow as pa
import pytest
import torch
from parity import assert_same_detections

from detectflow import bnfold, models
from detectflow.cli import build_parser
from detectflow.config import RunConfig, fingerprint
from detectflow.predictor import Detector, decode_batch, model_tuning

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _listing(uris):
    return pa.table({"image_uri": uris, "index": list(range(len(uris))),
                     "shard": [0] * len(uris)})


def _with_random_statistics(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with models.weights_left_unfilled():
        net = models.build_model(name).eval()
    for module in net.modules():
        if isinstance(module, bnfold._norm_types()):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.25, 4.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_uniform_(module.weight)
            if module.bias is not None:
                module.bias.data.uniform_(-0.1, 0.1)
    return net


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", [
    "fasterrcnn_resnet50_fpn_v2",      # the default: BatchNorm2d in backbone, FPN, RPN and box head
    SMALL,
    "retinanet_resnet50_fpn_v2",       # GroupNorm in its heads: left alone
    "ssdlite320_mobilenet_v3_large",
])
def test_every_batch_norm_is_folded_and_the_features_stay_the_same(name):
    net = _with_random_statistics(name)
    before = bnfold.batch_norms(net)
    folded = copy.deepcopy(net)
    assert before > 0 and bnfold.fold_batch_norms(folded) == before
    assert bnfold.batch_norms(folded) == 0
    groups = sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in folded.modules()) == groups

    x = torch.rand(2, 3, 224, 288)
    with torch.inference_mode():
        want, got = net.backbone(x), folded.backbone(x)
        if not isinstance(want, dict):
            want, got = {"0": want}, {"0": got}
        for key in want:
            assert _close(want[key], got[key]) < 1e-4, key
        if name == "fasterrcnn_resnet50_fpn_v2":  # its heads have batch norms too
            features = list(want.values())
            for a, b in zip(net.rpn.head(features)[0], folded.rpn.head(features)[0]):
                assert _close(a, b) < 1e-4
            pooled = torch.rand(8, 256, 7, 7)
            assert _close(net.roi_heads.box_head(pooled), folded.roi_heads.box_head(pooled)) < 1e-4


def test_a_model_in_training_mode_is_refused():
    net = _with_random_statistics(SMALL).train()
    with pytest.raises(ValueError, match="eval mode"):
        bnfold.fold_batch_norms(net)


def test_cpu_defaults_fold_and_go_channels_last_with_the_same_boxes(small_weights, sample_dir):
    """On a CPU the defaults fold and reorder the model (measured faster there); the rows match
    the untouched model's, and each lever alone too."""
    uris = [str(p) for p in sorted(sample_dir.glob("*.jpg"))]
    decoded = decode_batch(_listing(uris), max_side=4096)

    def detector(**levers):
        return Detector(SMALL, str(small_weights), 0.5, run_id="unit", device="cpu", **levers)

    plain = detector(fold_batchnorm=False, channels_last=False)
    want = plain(decoded).to_pylist()
    assert sum(len(r["boxes"]) for r in want) > 50
    assert bnfold.batch_norms(plain.model) > 0
    for levers in ({}, {"fold_batchnorm": True, "channels_last": False},
                   {"fold_batchnorm": False, "channels_last": True}):
        tuned = detector(**levers)
        folded = levers.get("fold_batchnorm", True)
        assert (bnfold.batch_norms(tuned.model) == 0) == folded, levers
        conv = tuned.model.backbone.body["0"][0].weight  # the stem's convolution
        assert conv.is_contiguous(memory_format=torch.channels_last) == levers.get(
            "channels_last", True), levers
        for row, ref in zip(tuned(decoded).to_pylist(), want):
            assert_same_detections(
                row, {k: torch.tensor(ref[k]) for k in ("boxes", "scores", "labels")})


def test_the_defaults_depend_on_the_device():
    assert model_tuning("cpu") == (True, True)
    assert model_tuning("cuda") == (False, False)
    assert model_tuning("cpu", channels_last=False) == (False, True)
    assert model_tuning("cuda", fold_batchnorm=True) == (False, True)


def test_the_option_reaches_the_config_and_keys_staged_shards(tmp_path):
    assert build_parser().parse_args(["run", "--fold-batchnorm"]).fold_batchnorm is True
    assert build_parser().parse_args(["run", "--no-channels-last"]).channels_last is False
    assert "fold_batchnorm" not in vars(build_parser().parse_args(["run"]))  # field default
    assert RunConfig().fold_batchnorm is None
    auto = RunConfig(output_uri=str(tmp_path), run_id="r")
    folded = RunConfig(output_uri=str(tmp_path), run_id="r", fold_batchnorm=True)
    plain = RunConfig(output_uri=str(tmp_path), run_id="r", fold_batchnorm=False)
    # Shards staged with one choice are not reused by a re-run that made another.
    assert len({fingerprint(auto), fingerprint(folded), fingerprint(plain)}) == 3
    assert fingerprint(auto) == fingerprint(RunConfig(output_uri=str(tmp_path), run_id="r"))
