"""The bound's loops (benchmarks/limit.py): several batches in flight must run each batch once
and give the serial loop's detections back in input order."""

import pytest
import torch
from conftest import SMALL_MODEL

from benchmarks.limit import load_inputs, load_net, loop, streams_loop


@pytest.fixture(scope="module")
def net_and_inputs(small_weights, sample_dir):
    net = load_net(SMALL_MODEL, str(small_weights), 0.3, "cpu")
    return net, load_inputs(sample_dir, "cpu", 5)


def test_batches_in_flight_give_the_serial_loops_detections_in_order(net_and_inputs):
    net, inputs = net_and_inputs
    serial, threaded = [], []
    loop(net, inputs, 2, "cpu", keep=serial)
    seconds = streams_loop(net, inputs, 2, "cpu", streams=3, keep=threaded)
    assert seconds > 0
    assert len(threaded) == len(serial) == 5
    assert sum(len(out["boxes"]) for out in serial) > 0  # calibrated weights find something
    for a, b in zip(serial, threaded):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])


def test_a_failing_thread_fails_the_loop(net_and_inputs):
    net, inputs = net_and_inputs
    bad = [*inputs[:2], torch.zeros(5, 5)]  # not an image: the model raises in one thread
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        streams_loop(net, bad, 1, "cpu", streams=2)
