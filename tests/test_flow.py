"""The whole flow on the bundled photos: real local Ray, real Prefect API, real Parquet."""

import csv
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from parity import assert_same_detections, direct_prediction
from prefect.client.orchestration import get_client
from settle import completed_task_runs

from detectflow import models, storage
from detectflow.imaging import decode
from detectflow.schema import DETECTION_SCHEMA
from flows.detect_objects import detect_objects

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
# export: the run asks for one format
STAGES = {"list_images", "detect", "validate_sample", "write_parquet", "export",
          "publish_manifest", "merge_table", "publish_latest"}


@pytest.fixture(scope="module")
def run(ray_local, prefect_api, sample_dir, small_weights, tmp_path_factory):
    """The bundled photos, detected into a folder inside their own (``--input photos --output
    photos/results``): the run must not list its own output as input."""
    photos = tmp_path_factory.mktemp("photos")
    for path in sample_dir.glob("*.jpg"):
        shutil.copy(path, photos / path.name)
    out = photos / "results"
    state = detect_objects(
        input_uri=str(photos), output_uri=str(out), model=SMALL, weights=str(small_weights),
        score_threshold=0.3, batch_size=2, run_id="flow-test", exports=["yolo"],
        return_state=True,
    )
    assert state.is_completed(), state.message
    return {"state": state, "result": state.result(), "dir": out / "flow-test", "input": photos}


def _read_table(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    tables = [pq.read_table(run_dir / f["path"]) for f in manifest["output"]["files"]]
    return manifest, tables


def test_outputs_exist_and_parquet_reads_back(run):
    run_dir = run["dir"]
    assert sorted(os.listdir(run_dir)) == ["detections", "exports", "manifest.json", "samples"]
    manifest, tables = _read_table(run_dir)
    table = tables[0]
    assert table.schema.equals(DETECTION_SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"detectflow.run_id"] == b"flow-test"
    rows = table.to_pylist()
    assert [r["image_uri"] for r in rows] == sorted(str(p) for p in run["input"].glob("*.jpg"))
    assert all(r["error"] is None and r["model"] == SMALL and r["run_id"] == "flow-test"
               for r in rows)
    assert sum(len(r["boxes"]) for r in rows) > 0
    for row in rows:
        height, width = decode(open(row["image_uri"], "rb").read()).shape[-2:]
        assert (row["width"], row["height"]) == (width, height)
        assert all(0.3 <= s <= 1 for s in row["scores"])


def test_manifest_describes_exactly_what_was_written(run, small_weights):
    run_dir = run["dir"]
    manifest, tables = _read_table(run_dir)
    assert manifest["run_id"] == "flow-test" and manifest["input"]["count"] == 5
    assert manifest["model"] == {
        "name": SMALL,
        "weights": {"source": str(small_weights), "file": small_weights.name,
                    "sha256": storage.sha256_file(str(small_weights))},
        "precision": "fp32",
        # 91 classes and no names in the file: torchvision's COCO table
        "classes": {"num_classes": 91, "source": "torchvision",
                    "names": list(models.COCO_CATEGORIES[1:]), "only": []},
        "fingerprint": manifest["model"]["fingerprint"],
    }
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["model"]["fingerprint"])
    for entry, table in zip(manifest["output"]["files"], tables):
        path = str(run_dir / entry["path"])
        assert entry["sha256"] == storage.sha256_file(path)
        assert entry["bytes"] == os.path.getsize(path) and entry["rows"] == table.num_rows
    counts = manifest["counts"]
    detections = sum(len(r) for t in tables for r in t.column("labels").to_pylist())
    assert counts["images"] == 5 and counts["failed"] == 0 and counts["detections"] == detections
    assert sum(counts["per_class"].values()) == detections
    # The stages after the manifest are not in it.
    assert set(manifest["stage_seconds"]) == STAGES - {"publish_manifest", "merge_table",
                                                       "publish_latest"}
    assert manifest["images_per_second"] > 0
    assert manifest["parameters"]["score_threshold"] == 0.3
    # The Ray it ran on: the worker's one-node local Ray (a cluster's: tests/test_cluster.py).
    assert (manifest["resources"]["nodes"], manifest["resources"]["cluster_cpus"]) == (1, 2.0)
    assert not (run_dir / "_staging").exists()


def test_samples_are_drawn_pngs_of_the_original_size(run):
    manifest = run["result"]
    assert len(manifest["output"]["samples"]) == 4
    for rel in manifest["output"]["samples"]:
        data = (run["dir"] / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert decode(data).dtype == np.uint8


def test_every_task_run_lands_in_the_flow_api_completed(run):
    flow_run_id = run["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = completed_task_runs(client, flow_run_id, len(STAGES))
        artifacts = {a.key for a in client.read_artifacts() if a.flow_run_id == flow_run_id}
    assert {t.name.rsplit("-", 1)[0] for t in task_runs} == STAGES
    assert all(t.state.is_completed() for t in task_runs) and len(task_runs) == len(STAGES)
    assert {"detection-samples", "detections-per-category", "run-manifest",
            "detect-progress"} <= artifacts


def test_a_coco_model_runs_yolo_export_reads_back_with_supervision(run, sample_dir, tmp_path):
    import supervision as sv

    manifest, tables = _read_table(run["dir"])
    folder = run["dir"] / "exports" / "yolo"
    images = tmp_path / "images"  # YOLO's layout: the images beside their labels, same names
    images.mkdir()
    with open(folder / "names.csv", newline="") as mapping:
        for name, uri in list(csv.reader(mapping))[1:]:
            os.symlink(uri, images / name)
    dataset = sv.DetectionDataset.from_yolo(str(images), str(folder / "labels"),
                                            str(folder / "data.yaml"))
    real = [n for n in models.COCO_CATEGORIES[1:] if n != "N/A"]
    assert dataset.classes == real and len(dataset) == 5
    rows = {os.path.basename(r["image_uri"]): r for r in tables[0].to_pylist()}
    unnamed = 0  # random weights also predict COCO's unused ids ("N/A"): no class to export
    for path, _, found in dataset:
        row = rows[os.path.basename(path)]
        named = [n != "N/A" for n in row["label_names"]]
        unnamed += named.count(False)
        boxes = np.asarray(row["boxes"]).reshape(-1, 4)[named]
        names = [n for n in row["label_names"] if n != "N/A"]
        assert len(found) == len(boxes)
        for xyxy, class_id in zip(found.xyxy, found.class_id):  # each read box is a row's box
            gap = np.abs(boxes - xyxy).max(axis=1)  # (a box may come twice, once per class)
            assert any(g <= 0.5 and names[k] == dataset.classes[class_id]
                       for k, g in enumerate(gap))
    assert manifest["output"]["exports"][0]["unnamed_boxes"] == unnamed


def test_latest_pointer_names_the_published_run(run):
    latest = json.loads((run["dir"].parent / "latest.json").read_text())
    manifest = run["dir"] / "manifest.json"
    assert latest["run_id"] == "flow-test" and latest["manifest_uri"] == str(manifest)
    assert latest["manifest_sha256"] == storage.sha256_file(str(manifest))
    assert latest["images"] == 5


def test_rerun_of_a_published_run_changes_nothing(run, small_weights):
    before = {p: p.stat().st_mtime_ns for p in run["dir"].rglob("*")}
    again = detect_objects(input_uri=str(run["input"]), output_uri=str(run["dir"].parent),
                           model=SMALL, weights=str(small_weights), run_id="flow-test")
    assert again["run_id"] == "flow-test"
    assert {p: p.stat().st_mtime_ns for p in run["dir"].rglob("*")} == before


def test_a_run_never_lists_the_samples_an_earlier_run_drew_inside_its_input(run, small_weights):
    """Output inside the input (``--input photos --output photos/results``): the first run
    drew its samples there, and a second one, writing to another output prefix inside the
    input, must still list only the photos: a folder holding a run is never input."""
    photos = run["input"]
    assert len(list((run["dir"] / "samples").glob("*.png"))) == 4
    assert run["result"]["input"]["skipped"]["run_output"] == 1  # its own, holding the lease
    state = detect_objects(input_uri=str(photos), output_uri=str(photos / "other"), model=SMALL,
                           weights=str(small_weights), run_id="second", sample_size=2,
                           num_actors=1, return_state=True)
    assert state.is_completed(), state.message
    manifest, tables = _read_table(photos / "other" / "second")
    # Two run folders left out: the first run's, and this run's own (it holds the run's lease).
    assert manifest["counts"]["images"] == 5 and manifest["input"]["skipped"]["run_output"] == 2
    assert tables[0].column("image_uri").to_pylist() == sorted(str(p)
                                                               for p in photos.glob("*.jpg"))


def test_empty_input_fails_the_run_with_one_clear_line(ray_local, prefect_api, tmp_path,
                                                       small_weights):
    (tmp_path / "empty").mkdir()
    state = detect_objects(input_uri=str(tmp_path / "empty"), output_uri=str(tmp_path / "o"),
                           model=SMALL, weights=str(small_weights), return_state=True)
    assert state.is_failed()
    assert "no images with extensions" in state.message and str(tmp_path / "empty") in state.message
    assert not list((tmp_path / "o").rglob("manifest.json"))


def test_parity_with_a_direct_per_image_model_call(run, small_weights):
    """The pipeline's detections equal calling the same model on each image directly."""
    weights = models.resolve_weights(SMALL, str(small_weights))
    direct = models.load_model(SMALL, weights, score_threshold=0.3)
    preprocess = models.default_weights(SMALL).transforms()
    _, tables = _read_table(run["dir"])
    compared = 0
    for row in tables[0].to_pylist():
        ref = direct_prediction(direct, row["image_uri"], preprocess)
        assert_same_detections(row, ref)
        compared += len(ref["boxes"])
    assert compared > 0


@pytest.mark.parametrize("cpus", [None, 1.0])
def test_decoding_is_not_fused_into_the_inference_actors(ray_local, tmp_path, capsys, cpus):
    """Ray Data fuses a task into the next actor pool when their remote args match; decoding
    would then run serially inside the actors instead of beside them. With 1 CPU for the actor
    and 1 for decoding the args match except for the barrier ``build_dataset`` sets."""
    from detectflow.config import RunConfig
    from detectflow.pipeline import build_dataset, plan_resources

    cfg = RunConfig(input_uri=str(tmp_path), output_uri=str(tmp_path / "o"),
                    num_actors=1 if cpus else None, cpus_per_actor=cpus, decode_cpus=1.0)
    plan = plan_resources(cfg, ray_local.cluster_resources())
    assert cpus is None or plan.cpus_per_actor == plan.decode_cpus
    build_dataset(cfg, [str(tmp_path / "listing-00000.parquet")], plan).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1].splitlines()
    operators = [line.strip("+- ") for line in physical[1:] if line.strip()]
    assert operators[0] == "ActorPoolMapOperator[MapBatches(Detector)]"
    assert operators[1] == "TaskPoolMapOperator[MapBatches(decode_batch)]"
