"""The parity comparison itself must be able to fail."""

import pytest
import torch
from parity import assert_same_detections


def _ref(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


ROW = {"boxes": [[0, 0, 10, 10], [5, 5, 20, 20]], "scores": [0.9, 0.9], "labels": [1, 1]}


def test_order_of_tied_boxes_does_not_matter():
    assert_same_detections(ROW, _ref([[5, 5, 20, 20], [0, 0, 10, 10]], [0.9, 0.9], [1, 1]))


@pytest.mark.parametrize("ref", [
    _ref([[0, 0, 10, 10], [5, 5, 21, 20]], [0.9, 0.9], [1, 1]),  # a box moved
    _ref([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.8], [1, 1]),  # a score changed
    _ref([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.9], [1, 2]),  # a label changed
    _ref([[0, 0, 10, 10]], [0.9], [1]),  # a box missing
])
def test_differences_are_caught(ref):
    with pytest.raises(AssertionError):
        assert_same_detections(ROW, ref)
