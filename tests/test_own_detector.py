"""Your own detector through the whole flow: the shapes detector trained here
(examples/shapes), scored against ground truth on held-out images, locally and on S3, with the
``min_map`` gate and ``only``. Real Ray, real Prefect, real Parquet, a loopback S3."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from export_readers import assert_boxes, images_dir, label_studio_coco, read_names, xyxy
from faster_coco_eval import COCO, COCOeval_faster
from parity import direct_prediction
from PIL import Image
from prefect.client.orchestration import get_client
from settle import settled

from detectflow import cli, storage

with warnings.catch_warnings():  # supervision warns that it runs without OpenCV
    warnings.simplefilter("ignore")
    import supervision as sv
from detectflow.config import REPO_ROOT
from examples.shapes.data import CLASSES, make_dataset
from examples.shapes.model import tiny_fasterrcnn
from flows.detect_objects import detect_objects

SHAPES = "examples.shapes.model:tiny_fasterrcnn"
WEIGHTS = str(REPO_ROOT / "examples" / "shapes" / "shapes_detector.pth")
THRESHOLD = 0.05  # the COCO convention: AP is measured on nearly every detection
HELD_OUT_SEED = 777  # training uses other seeds (examples/shapes/README.md)
METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "AR100": 8}  # index in COCOeval's stats


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Held-out images and their annotations, plus: one labelled image that cannot be decoded
    (a miss) and one labelled image that is not in the input (reported)."""
    root = tmp_path_factory.mktemp("shapes")
    images = root / "images"
    make_dataset(images, 40, seed=HELD_OUT_SEED)
    gt = json.loads((images / "annotations.json").read_text())
    (images / "annotations.json").unlink()
    broken = gt["images"][0]
    (images / broken["file_name"]).write_bytes(b"\xff\xd8 not really a JPEG")
    gt["images"].append({"id": 10**6, "file_name": "elsewhere/gone.png", "width": 160,
                         "height": 160})
    gt["annotations"].append({"id": 10**6, "image_id": 10**6, "category_id": 1,
                              "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0})
    path = root / "ground_truth.json"
    path.write_text(json.dumps(gt))
    return {"images": images, "gt": path, "broken": str(images / broken["file_name"])}


def _run(held_out, out, run_id, **params):
    return detect_objects(
        input_uri=str(held_out["images"]), output_uri=str(out), model=SHAPES, weights=WEIGHTS,
        ground_truth=str(held_out["gt"]), score_threshold=THRESHOLD, batch_size=4,
        run_id=run_id, return_state=True, **({"num_actors": 1} | params))


@pytest.fixture(scope="module")
def run(ray_local, prefect_api, held_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    state = _run(held_out, out, "shapes", exports=["coco", "yolo", "voc", "labelstudio"])
    assert state.is_completed(), state.message
    return {"state": state, "manifest": state.result(), "out": out, "dir": out / "shapes"}


def direct_evaluation(held_out) -> COCOeval_faster:
    """The same evaluator on a plain per-image call of the same model on the same images."""
    saved = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net = tiny_fasterrcnn(num_classes=len(saved["categories"]) + 1)
    net.load_state_dict(saved["model"])
    net.eval()
    gt = COCO(str(held_out["gt"]))
    names = dict(enumerate(saved["categories"], start=1))
    cat_ids = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    results, in_input = [], []
    for image in gt.dataset["images"]:
        path = held_out["images"] / image["file_name"]
        if not path.exists():
            continue
        in_input.append(image["id"])
        if str(path) == held_out["broken"]:
            continue  # undecodable: no detections, its objects count as misses
        out = direct_prediction(net, path, score_threshold=THRESHOLD)
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                     out["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": image["id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score, "category_id": cat_ids[names[label]]})
    evaluator = COCOeval_faster(gt, gt.loadRes(results), "bbox", print_function=lambda *a: None)
    evaluator.params.imgIds = in_input
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def test_the_trained_detector_scores_as_a_direct_evaluation_does(run, held_out):
    evaluation = run["manifest"]["evaluation"]
    metrics = evaluation["metrics"]
    assert metrics["AP50"] >= 0.8, metrics
    direct = direct_evaluation(held_out)
    for name, index in METRICS.items():
        assert metrics[name] == pytest.approx(direct.stats[index], abs=1e-3), name
    precision = direct.eval["precision"]  # [iou, recall, class, area, max dets]
    for k, cls in enumerate(evaluation["per_class"]):
        assert cls["name"] == CLASSES[k]
        for key, values in (("AP", precision[:, :, k, 0, -1]),
                            ("AP50", precision[0, :, k, 0, -1])):  # IoU .50:.95, and .50
            expected = values[values > -1].mean()
            assert cls[key] == pytest.approx(expected, abs=1e-3), (cls["name"], key)
    assert evaluation["score_threshold"] == pytest.approx(THRESHOLD)
    assert evaluation["matched_images"] == 40 and evaluation["gt_images"] == 41


def test_unlabelled_and_undecodable_images_are_reported_not_dropped(run, held_out):
    evaluation = run["manifest"]["evaluation"]
    assert evaluation["unmatched_count"] == 1
    assert evaluation["unmatched_images"] == ["elsewhere/gone.png"]
    assert evaluation["failed_count"] == 1 and evaluation["failed_images"] == [held_out["broken"]]


def test_the_runs_classes_name_rows_samples_and_manifest(run):
    manifest = run["manifest"]
    assert manifest["model"]["name"] == SHAPES
    assert manifest["model"]["classes"] == {"num_classes": len(CLASSES) + 1,
                                            "source": "checkpoint", "names": list(CLASSES),
                                            "only": []}
    rows = pq.read_table(run["dir"] / manifest["output"]["files"][0]["path"]).to_pylist()
    names = {n for r in rows for n in r["label_names"]}
    assert names and names <= set(CLASSES)
    assert set(manifest["counts"]["per_class"]) == names


def test_evaluation_is_written_to_the_run_and_shown_in_prefect(run):
    manifest = run["manifest"]
    plots = manifest["evaluation"]["plots"]
    assert len(plots) == len(CLASSES)
    for plot in plots:
        with Image.open(run["dir"] / plot) as picture:
            assert picture.format == "PNG" and picture.size[0] >= 320
    written = json.loads((run["dir"] / "evaluation" / "evaluation.json").read_text())
    assert written["metrics"] == manifest["evaluation"]["metrics"]
    flow_run_id = run["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = settled(
            lambda: {a.key: a for a in client.read_artifacts() if a.flow_run_id == flow_run_id},
            lambda found: {"evaluation", "precision-recall"} <= set(found))
    table = json.loads(artifacts["evaluation"].data)
    assert table[0]["class"] == "all" and table[0]["AP"] == manifest["evaluation"]["metrics"]["AP"]
    assert [r["class"] for r in table[1:]] == list(CLASSES)
    assert artifacts["precision-recall"].data.count("data:image/png;base64,") == len(CLASSES)


def test_a_run_below_min_map_is_failed_and_latest_stays(run, held_out):
    latest = json.loads((run["out"] / "latest.json").read_text())
    assert latest["run_id"] == "shapes"
    kept = list(CLASSES[:2])
    state = _run(held_out, run["out"], "gated", only=kept, min_map=0.99)
    assert state.is_failed() and "below min_map=0.99" in state.message
    manifest = json.loads((run["out"] / "gated" / "manifest.json").read_text())  # written
    assert [c["name"] for c in manifest["evaluation"]["per_class"]] == kept  # only those scored
    rows = pq.read_table(run["out"] / "gated" / manifest["output"]["files"][0]["path"])
    names = {n for r in rows.column("label_names").to_pylist() for n in r}
    assert names and names <= set(kept)
    assert manifest["model"]["classes"]["only"] == sorted(kept)
    assert json.loads((run["out"] / "latest.json").read_text()) == latest  # not moved

    def published(client) -> list[str]:
        page = client._client.post("/events/filter", json={
            "filter": {"event": {"name": ["detectflow.manifest.published"]},
                       "any_resource": {"id": [f"detectflow.dataset.{run['out']}"]}}}).json()
        return [e["payload"]["manifest_uri"] for e in page["events"]]

    with get_client(sync_client=True) as client:
        # The gated run's own Failed state is recorded after anything it emitted.
        settled(lambda: client.read_flow_run(state.state_details.flow_run_id).state,
                lambda s: s is not None and s.is_failed())
        events = settled(lambda: published(client), lambda found: len(found) >= 1)
    assert events == [str(run["dir"] / "manifest.json")]  # the first run's event, none for this


def test_names_that_disagree_with_the_checkpoint_fail_before_ray(tmp_path, held_out):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    done = subprocess.run(
        [sys.executable, "-m", "detectflow", "run", "--input", str(held_out["images"]),
         "--output", str(tmp_path / "out"), "--model", SHAPES, "--weights", WEIGHTS,
         "--classes", str(names)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": ""})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"names 2 classes but the weights of {SHAPES} have {len(CLASSES)}" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_the_same_run_from_and_to_s3_gives_the_same_numbers(run, held_out, s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3)
    fs.put(str(held_out["images"]) + "/", "detectflow-in/shapes/", recursive=True)
    fs.put_file(str(held_out["gt"]), "detectflow-in/shapes-gt.json")
    state = detect_objects(
        input_uri="s3://detectflow-in/shapes", output_uri="s3://detectflow-out/shapes",
        model=SHAPES, weights=WEIGHTS, ground_truth="s3://detectflow-in/shapes-gt.json",
        score_threshold=THRESHOLD, batch_size=4, run_id="shapes-s3", s3_endpoint_url=s3,
        return_state=True)
    assert state.is_completed(), state.message
    local, remote = run["manifest"]["evaluation"], state.result()["evaluation"]
    assert remote["metrics"] == local["metrics"]
    assert [c["AP"] for c in remote["per_class"]] == [c["AP"] for c in local["per_class"]]
    assert remote["failed_images"] == ["s3://detectflow-in/shapes/"
                                       + os.path.relpath(held_out["broken"], held_out["images"])]
    assert fs.exists(f"detectflow-out/shapes/shapes-s3/{remote['plots'][0]}")
    assert np.isclose(remote["score_threshold"], THRESHOLD)

    # `detectflow export` of the S3 run folder (SOURCE as a run's own folder, on S3).
    try:
        assert cli.main(["export", "s3://detectflow-out/shapes/shapes-s3", "--format", "yolo",
                         "--yolo-scores", "--out", str(tmp_path / "yolo"),
                         "--s3-endpoint-url", s3]) == 0
    finally:
        storage.configure(None)
    labels = [line.split() for f in sorted((tmp_path / "yolo" / "labels").iterdir())
              for line in f.read_text().splitlines()]
    assert len(labels) == state.result()["counts"]["detections"]
    assert all(len(fields) == 6 and 0 < float(fields[5]) <= 1 for fields in labels)
    flat = read_names(tmp_path / "yolo" / "names.csv")
    assert all(uri.startswith("s3://detectflow-in/shapes/") for uri in flat.values())
    # SOURCE as an output prefix on S3: its latest.json names the run.
    try:
        assert cli.main(["export", "s3://detectflow-out/shapes", "--format", "coco", "--out",
                         "s3://detectflow-out/shapes-coco", "--s3-endpoint-url", s3]) == 0
    finally:
        storage.configure(None)
    coco = json.loads(fs.cat_file("detectflow-out/shapes-coco/annotations.json"))
    assert len(coco["images"]) == 39 and len(coco["annotations"]) == len(labels)


def _rows(run) -> dict[str, list]:
    """Image path -> [(xyxy, class name, score)] of the run's published rows that decoded."""
    rows = {}
    for f in run["manifest"]["output"]["files"]:
        for r in pq.read_table(run["dir"] / f["path"]).to_pylist():
            if r["error"] is None:
                rows[storage.image_path(r["image_uri"])] = list(zip(r["boxes"], r["label_names"], r["scores"]))
    return rows


def test_exports_are_written_before_the_manifest_which_lists_them(run, held_out, tmp_path):
    """Each export of the run, read back by its tool's own reader, holds the run's rows."""
    from pycocotools.coco import COCO

    manifest, exported = run["manifest"], run["dir"] / "exports"
    exports = {e["format"]: e for e in manifest["output"]["exports"]}
    assert set(exports) == {"coco", "yolo", "voc", "labelstudio"}
    for entry in exports.values():
        assert entry["images"] == 39 and entry["skipped_errors"] == 1  # the undecodable image
        for f in entry["files"]:
            assert storage.sha256_file(str(run["dir"] / f["path"])) == f["sha256"], f["path"]
    rows = _rows(run)
    assert len(rows) == 39

    coco = COCO(str(exported / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.dataset["categories"]] == list(CLASSES)
    assert len(coco.dataset["annotations"]) == exports["coco"]["boxes"] \
        == manifest["counts"]["detections"]
    coco.loadRes(str(exported / "coco" / "results.json"))
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for image in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert_boxes([xyxy(a["bbox"]) for a in anns], [names[a["category_id"]] for a in anns],
                     rows[str(held_out["images"] / image["file_name"])], 0.01)

    for fmt in ("yolo", "voc"):
        flat = read_names(exported / fmt / "names.csv")
        folder = images_dir(flat, tmp_path / fmt)
        if fmt == "yolo":
            ds = sv.DetectionDataset.from_yolo(
                images_directory_path=folder, data_yaml_path=str(exported / fmt / "data.yaml"),
                annotations_directory_path=str(exported / fmt / "labels"))
        else:
            ds = sv.DetectionDataset.from_pascal_voc(
                images_directory_path=folder,
                annotations_directory_path=str(exported / fmt / "annotations"))
        assert sorted(ds.classes) == sorted(CLASSES)
        for name, uri in flat.items():
            det = ds.annotations[str(tmp_path / fmt / name)]
            assert_boxes(det.xyxy, [ds.classes[c] for c in det.class_id],
                         rows[storage.image_path(uri)], 0.5)

    tasks = json.loads((exported / "labelstudio" / "tasks.json").read_text())
    names, got = label_studio_coco(tasks, exported / "labelstudio" / "config.xml",
                                   tmp_path / "labelstudio")
    for image, task in zip(sorted(got["images"], key=lambda i: i["id"]), tasks):
        anns = [a for a in got["annotations"] if a["image_id"] == image["id"]]
        assert_boxes([xyxy(a["bbox"]) for a in anns], [names[a["category_id"]] for a in anns],
                     rows[storage.image_path(task["data"]["image"])], 0.5)

def test_export_command_reads_the_latest_run_of_a_prefix(run, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "detectflow", "export", str(run["out"]), "--format",
         "labelstudio", "--out", str(tmp_path / "ls"), "--image-root", "http://files.local/",
         "--min-score", "0.5", "--only", CLASSES[0]],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "exported run shapes: 39 images" in done.stdout  # latest.json names run "shapes"
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert len(tasks) == 39
    fingerprint = run["manifest"]["model"]["fingerprint"]
    results = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    assert {p["model_version"] for t in tasks for p in t["predictions"]} == {fingerprint}
    assert results and all(r["value"]["rectanglelabels"] == [CLASSES[0]] and r["score"] >= 0.5
                           for r in results)
    assert all(t["data"]["image"].startswith("http://files.local/") for t in tasks)
    # SOURCE as the run's own folder.
    assert cli.main(["export", str(run["dir"]), "--format", "voc", "--out",
                     str(tmp_path / "voc")]) == 0
    assert len(list((tmp_path / "voc" / "annotations").glob("*.xml"))) == 39
