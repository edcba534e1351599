"""The start-up's pause of cyclic garbage collection: off while the heavy imports run, back on
(as it was) afterwards whatever happens, with the imported objects frozen; the processes that
use it (an inference actor, the command) come out of their start-up collecting again."""

from __future__ import annotations

import gc
import threading

import pytest
from fresh import run_fresh

from detectflow.gcpause import collection_paused


@pytest.fixture(autouse=True)
def _unfreeze():
    yield
    gc.unfreeze()  # the test session's objects back to the oldest generation
    gc.enable()


def test_collection_is_off_in_the_block_and_back_on_with_the_block_frozen():
    frozen_before = gc.get_freeze_count()
    with collection_paused():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # tracked containers, as an import makes
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(made)


def test_cycles_dropped_in_the_block_are_freed_not_frozen():
    """An import's leftover cycles must not become permanent: one held an actor's weights."""
    import weakref

    class Node:
        pass

    with collection_paused():
        node = Node()
        node.me = node
        gone = weakref.ref(node)
        del node
        assert gone() is not None  # a cycle: only the collector frees it
    assert gone() is None


def test_a_block_beside_other_work_ends_without_freezing_even_when_nested():
    frozen_before = gc.get_freeze_count()
    with collection_paused(), collection_paused(freeze=False):
        _kept = [[i] for i in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen_before


def test_an_error_in_the_block_still_turns_collection_back_on():
    with pytest.raises(RuntimeError, match="boom"), collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_collection_off_before_stays_off():
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_pauses_in_two_threads_end_with_the_last():
    """The command pauses in its main thread and in the thread that imports Prefect."""
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with collection_paused():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with collection_paused():
        thread.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # the other thread is still importing
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_an_inference_actor_builds_its_model_paused_and_keeps_only_the_model(small_weights):
    """Frozen without the pause's collection, the loaded state dict (a second copy of every
    weight) stayed alive for good, held by an import's cycle of frames."""
    out = run_fresh(f"""
        import gc, json, warnings
        import torch
        from detectflow.predictor import Detector
        frozen_before = gc.get_freeze_count()
        detector = Detector("fasterrcnn_mobilenet_v3_large_320_fpn", {str(small_weights)!r},
                            0.5, "run", device="cpu")
        enabled, frozen = gc.isenabled(), gc.get_freeze_count() - frozen_before
        gc.unfreeze()  # get_objects does not list the permanent generation
        model = list(detector.model.parameters()) + list(detector.model.buffers())
        held = {{id(t) for t in model}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on torch's deprecated module attributes
            others = [o for o in gc.get_objects()
                      if isinstance(o, torch.Tensor) and id(o) not in held]
        print(json.dumps({{"enabled": enabled, "frozen": frozen, "model": len(held),
                          "others": len(others)}}))
    """)
    assert out["enabled"] is True
    assert out["frozen"] > 10_000  # torch, torchvision and the model's modules
    assert out["model"] > 100  # 146 tensors once the CPU default folds the batch norms
    assert out["others"] < 20  # a few module-level constants, not a second set of weights


def test_the_command_collects_again_after_a_start_up_that_failed(tmp_path):
    out = run_fresh(f"""
        import gc, json
        from detectflow import cli
        code = cli.main(["run", "--score-threshold", "3", "--output", {str(tmp_path)!r}])
        print(json.dumps({{"code": code, "enabled": gc.isenabled()}}))
    """)
    assert out == {"code": 2, "enabled": True}
