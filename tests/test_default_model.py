"""The default model (fasterrcnn_resnet50_fpn_v2, ~6 s per image on CPU) through the whole flow,
on one image, with parity against a direct call. Calibrated on that one photo to stay fast."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from parity import assert_same_detections, direct_prediction

from detectflow import models
from detectflow.config import DEFAULT_MODEL
from flows.detect_objects import detect_objects


@pytest.fixture(scope="module")
def default_weights(sample_dir, tmp_path_factory):
    from calibrated_weights import write_calibrated_weights

    one = tmp_path_factory.mktemp("one-photo")
    shutil.copy(sample_dir / "chelsea.jpg", one / "chelsea.jpg")
    return one, write_calibrated_weights(DEFAULT_MODEL, one, one.parent / "default.pth")


@pytest.mark.slow
def test_default_model_runs_end_to_end_with_parity(ray_local, prefect_api, default_weights,
                                                   tmp_path):
    images, weights = default_weights
    state = detect_objects(input_uri=str(images), output_uri=str(tmp_path), weights=str(weights),
                           score_threshold=0.3, run_id="default-model", return_state=True)
    assert state.is_completed(), state.message
    row = pq.read_table(tmp_path / "default-model" / "detections" / "part-00000.parquet").to_pylist()[0]
    assert row["model"] == DEFAULT_MODEL and row["error"] is None
    # One image, one batch: one model loaded, with the cores the second actor would have had.
    plan = json.loads((tmp_path / "default-model" / "manifest.json").read_text())["resources"]
    assert (plan["num_actors"], plan["cpus_per_actor"]) == (1, 1.0)

    direct = models.load_model(DEFAULT_MODEL, models.resolve_weights(DEFAULT_MODEL, str(weights)),
                               score_threshold=0.3)
    ref = direct_prediction(direct, images / "chelsea.jpg",
                            models.default_weights(DEFAULT_MODEL).transforms())
    assert len(ref["boxes"]) > 0
    assert_same_detections(row, ref)
