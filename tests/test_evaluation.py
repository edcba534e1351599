"""Accuracy against ground truth: real staged Parquet shards, real COCO files, real evaluators."""

import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detectflow import storage
from detectflow.evaluation import (
    GroundTruthError,
    evaluate,
    load_ground_truth,
    pr_curve_png,
    pr_curves,
)
from detectflow.schema import detection_row, rows_to_table

# A torchvision-like table: 0 is background, "N/A" holes, ids unlike the GT's below.
CATEGORIES = ["__background__", "person", "N/A", "car", "dog"]
LABEL = {name: i for i, name in enumerate(CATEGORIES)}
INPUT = "/data/in"


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def row(uri, index=0, dets=(), error=None, shard=0):
    """A staged row; ``dets`` are (xywh box, class name, score)."""
    return detection_row(
        image_uri=uri, index=index, shard=shard,
        width=None if error else 640, height=None if error else 480,
        boxes=np.array([xyxy(b) for b, _, _ in dets], np.float32).reshape(-1, 4),
        scores=np.array([s for _, _, s in dets], np.float32),
        labels=np.array([LABEL[n] for _, n, _ in dets], np.int64),
        categories=CATEGORIES, model="m", run_id="r", error=error)


def write_shards(folder: Path, shards) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, rows in enumerate(shards):
        path = folder / f"shard-{i:05d}.parquet"
        pq.write_table(rows_to_table(rows), path)
        uris.append(str(path))
    return uris


def write_gt(path: Path, images, annotations, categories) -> str:
    """``images``: file names (ids 1..n); ``annotations``: (image index, category id, xywh)."""
    dataset = {
        "images": [{"id": i + 1, "file_name": name, "width": 640, "height": 480}
                   for i, name in enumerate(images)],
        "annotations": [{"id": k + 1, "image_id": image + 1, "category_id": cat, "bbox": list(box)}
                        for k, (image, cat, box) in enumerate(annotations)],
        "categories": [{"id": cid, "name": name} for cid, name in categories],
    }
    path.write_text(json.dumps(dataset))
    return str(path)


GT_CATEGORIES = [(7, "person"), (3, "car")]  # names as the model's, ids not its labels


def test_perfect_detections_score_one(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    anns = [(0, 7, (10, 20, 50, 80)), (0, 3, (200, 100, 120, 60)), (1, 7, (300, 50, 40, 90)),
            (2, 3, (5.5, 6.25, 100.5, 40.75)), (2, 3, (400, 300, 80, 80))]
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", names, anns, GT_CATEGORIES))
    by_image = {i: [(box, dict((c, n) for c, n in GT_CATEGORIES)[cat], 0.9)
                    for j, cat, box in anns if j == i] for i in range(3)}
    staged = write_shards(tmp_path / "staged", [
        [row(f"{INPUT}/{n}", i, by_image[i]) for i, n in enumerate(names)]])

    result = evaluate(gt, staged, INPUT, CATEGORIES, score_threshold=0.5)

    assert (result.ap, result.ap50, result.ap75, result.ar100) == (1.0, 1.0, 1.0, 1.0)
    assert {c.name: (c.ap, c.ap50, c.labels, c.gt_boxes, c.detections)
            for c in result.per_class} == {"person": (1.0, 1.0, (1,), 2, 2),
                                          "car": (1.0, 1.0, (3,), 3, 3)}
    assert (result.gt_images, result.matched_images, result.gt_boxes, result.detections) == (
        3, 3, 5, 5)
    manifest = json.loads(json.dumps(result.as_manifest()))
    assert manifest["ground_truth"] == {"uri": gt.uri, "sha256": storage.sha256_bytes(
        Path(gt.uri).read_bytes())}
    assert manifest["metrics"] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR100": 1.0}
    assert manifest["score_threshold"] == 0.5
    assert manifest["evaluator"].startswith("faster-coco-eval 1.8")
    assert "curves" not in manifest and manifest["unmatched_count"] == 0


def test_numbers_equal_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(7)
    names = [f"img{i}.jpg" for i in range(8)]
    anns, dets = [], {i: [] for i in range(8)}
    for i in range(8):
        for _ in range(int(rng.integers(0, 5))):
            cat, name = GT_CATEGORIES[int(rng.integers(0, 2))]
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(8, 140, 2)
            anns.append((i, cat, (round(x, 2), round(y, 2), round(w, 2), round(h, 2))))
            if rng.random() < 0.85:  # else a missed object
                jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = (x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1))
                dets[i].append((box, name, float(rng.uniform(0.05, 1))))
        for _ in range(int(rng.integers(0, 3))):  # false positives, one class the GT lacks
            box = (*rng.uniform(0, 500, 2), *rng.uniform(10, 90, 2))
            dets[i].append((box, ["person", "car", "dog"][int(rng.integers(0, 3))],
                            float(rng.uniform(0.05, 1))))
    anns.append((1, 7, (0, 0, 300, 300)))
    gt_path = write_gt(tmp_path / "gt.json", names, anns, GT_CATEGORIES + [(9, "dog house")])
    gt = load_ground_truth(gt_path)
    gt.dataset["annotations"][-1]["iscrowd"] = 1
    staged = write_shards(tmp_path / "staged", [
        [row(f"{INPUT}/{n}", i, dets[i]) for i, n in enumerate(names[:5])],
        [row(f"{INPUT}/{n}", i, dets[i]) for i, n in enumerate(names[5:], 5)]])

    ours = evaluate(gt, staged, INPUT, CATEGORIES)
    assert ours.categories_not_in_model == ["dog house"]

    # The same detections (as staged: float32 xyxy) through pycocotools.
    (tmp_path / "gt-full.json").write_text(json.dumps(gt.dataset))
    coco_gt = COCO(str(tmp_path / "gt-full.json"))
    to_cat = {"person": 7, "car": 3}
    results = []
    for r in pq.read_table(staged[0]).to_pylist() + pq.read_table(staged[1]).to_pylist():
        image_id = names.index(r["image_uri"].rsplit("/", 1)[1]) + 1
        for (x1, y1, x2, y2), score, label in zip(r["boxes"], r["scores"], r["labels"]):
            if CATEGORIES[label] in to_cat:
                results.append({"image_id": image_id, "category_id": to_cat[CATEGORIES[label]],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    reference = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    reference.params.imgIds = list(range(1, 9))
    reference.params.catIds = [3, 7]
    reference.evaluate()
    reference.accumulate()
    reference.summarize()

    stats = reference.stats
    assert 0.2 < stats[0] < 0.95  # non-trivial
    for mine, theirs in zip((ours.ap, ours.ap50, ours.ap75, ours.ar100),
                            (stats[0], stats[1], stats[2], stats[8])):
        assert mine == pytest.approx(theirs, abs=1e-6)
    precision = reference.eval["precision"]
    for k, cat in enumerate([3, 7]):
        mine = next(c for c in ours.per_class if c.category_id == cat)
        s = precision[:, :, k, 0, -1]
        assert mine.ap == pytest.approx(np.mean(s[s > -1]), abs=1e-6)
        s50 = precision[0, :, k, 0, -1]
        assert mine.ap50 == pytest.approx(np.mean(s50[s50 > -1]), abs=1e-6)
        recall, curve = pr_curves(ours)[mine.name]
        np.testing.assert_allclose(recall, reference.params.recThrs)
        np.testing.assert_allclose(curve, s50, atol=1e-6)
    assert ours.detections == len(results)
    assert ours.gt_boxes == len(anns)


def test_matching_rules(tmp_path):
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a local name that is not UTF-8
    latin1_uri = storage.local_image_uri(f"{INPUT}/{latin1}")
    assert latin1_uri.startswith(storage.FILE_URI)
    box = (10, 10, 50, 50)
    gt_names = ["a/x.jpg", "./b/y.jpg", "z.jpg", "dup.jpg", "missing1.jpg", "sub/missing2.jpg",
                latin1, f"{INPUT}/abs.jpg", "elsewhere/x.jpg"]
    anns = [(i, 7, box) for i in range(len(gt_names))]
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", gt_names, anns, GT_CATEGORIES))
    hit = [(box, "person", 0.9)]
    staged = write_shards(tmp_path / "staged", [
        [row(f"{INPUT}/a/x.jpg", 0, hit), row(f"{INPUT}/b/y.jpg", 1, hit),
         row(f"{INPUT}/deep/er/z.jpg", 2, hit), row(f"{INPUT}/p/dup.jpg", 3, hit)],
        [row(f"{INPUT}/q/dup.jpg", 4, hit), row(latin1_uri, 5, hit), row(f"{INPUT}/abs.jpg", 6, hit),
         # Not labelled: its detections are not evaluated (they would be false positives).
         row(f"{INPUT}/nogt.jpg", 7, hit * 3)],
    ])

    result = evaluate(gt, staged, INPUT, CATEGORIES)

    assert result.matched_images == 5  # a/x, ./b/y, z by base name, the latin-1 one, abs
    assert result.detections == 5 and result.ap == 1.0
    assert result.ambiguous_count == 1 and result.ambiguous_images == ["dup.jpg"]
    # elsewhere/x.jpg: its only base-name candidate is a/x.jpg's image.
    assert result.unmatched_count == 3
    assert result.unmatched_images == ["missing1.jpg", "sub/missing2.jpg", "elsewhere/x.jpg"]
    manifest = result.as_manifest()
    assert manifest["unmatched_images"] == result.unmatched_images
    assert manifest["ambiguous_count"] == 1


def test_matching_s3_uris_and_many_unmatched(tmp_path):
    box = (1, 1, 20, 20)
    names = ["cats/one.jpg"] + [f"gone/{i:03d}.jpg" for i in range(30)]
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", names, [(0, 7, box)], GT_CATEGORIES))
    staged = write_shards(tmp_path / "staged", [
        [row("s3://bucket/prefix/cats/one.jpg", 0, [(box, "person", 0.8)])]])

    result = evaluate(gt, staged, "s3://bucket/prefix", CATEGORIES)

    assert result.matched_images == 1 and result.ap == 1.0
    assert result.unmatched_count == 30
    assert result.unmatched_images == names[1:21]


def test_failed_image_counts_as_miss_and_is_listed(tmp_path):
    box = (100, 100, 60, 60)
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", ["ok.jpg", "broken.jpg"],
                                    [(0, 7, box), (1, 7, box)], GT_CATEGORIES))
    staged = write_shards(tmp_path / "staged", [
        [row(f"{INPUT}/ok.jpg", 0, [(box, "person", 0.9)]),
         row(f"{INPUT}/broken.jpg", 1, error="cannot decode image")]])

    result = evaluate(gt, staged, INPUT, CATEGORIES)

    assert result.matched_images == 2 and result.gt_boxes == 2
    assert result.failed_count == 1 and result.failed_images == [f"{INPUT}/broken.jpg"]
    # Precision 1 up to recall 0.5, then nothing: 51 of the 101 recall points.
    assert result.ap50 == pytest.approx(51 / 101)
    assert result.ar100 == pytest.approx(0.5)
    assert result.as_manifest()["failed_images"] == [f"{INPUT}/broken.jpg"]


def test_no_detections_at_all(tmp_path):
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", ["a.jpg"], [(0, 3, (1, 2, 30, 40))],
                                    GT_CATEGORIES))
    staged = write_shards(tmp_path / "staged", [[row(f"{INPUT}/a.jpg")]])

    result = evaluate(gt, staged, INPUT, CATEGORIES)

    assert (result.ap, result.ap50, result.ar100, result.detections) == (0.0, 0.0, 0.0, 0)
    car = next(c for c in result.per_class if c.name == "car")
    person = next(c for c in result.per_class if c.name == "person")
    assert car.ap == 0.0 and person.ap is None  # no person in the GT: nothing to measure
    assert list(pr_curves(result)) == ["car"]


def test_categories_mapped_by_name_and_class_names(tmp_path):
    box_p, box_c = (10, 10, 40, 80), (200, 200, 90, 40)
    categories = [(10, "car"), (20, "person"), (30, "unicorn")]
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", ["a.jpg"],
                                    [(0, 20, box_p), (0, 10, box_c), (0, 30, box_c)], categories))
    staged = write_shards(tmp_path / "staged", [
        [row(f"{INPUT}/a.jpg", 0, [(box_p, "person", 0.9), (box_c, "car", 0.8),
                                   (box_c, "dog", 0.7)])]])

    every = evaluate(gt, staged, INPUT, CATEGORIES)
    assert every.categories_not_in_model == ["unicorn"]
    assert {(c.name, c.category_id, c.labels) for c in every.per_class} == {
        ("car", 10, (3,)), ("person", 20, (1,))}
    assert every.ap == 1.0 and every.gt_boxes == 2 and every.detections == 2

    strict = evaluate(gt, staged, INPUT, CATEGORIES, score_threshold=0.85)  # drops the car
    assert strict.detections == 1 and strict.score_threshold == 0.85
    assert {c.name: c.ap for c in strict.per_class} == {"car": 0.0, "person": 1.0}

    only = evaluate(gt, staged, INPUT, CATEGORIES, class_names=["person"])
    assert [c.name for c in only.per_class] == ["person"]
    assert only.categories_not_in_model == [] and only.gt_boxes == 1 and only.detections == 1

    with pytest.raises(GroundTruthError, match="none of its categories"):
        evaluate(gt, staged, INPUT, CATEGORIES, class_names=["unicorn"])


def test_no_gt_image_in_the_run(tmp_path):
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", ["x.jpg"], [], GT_CATEGORIES))
    staged = write_shards(tmp_path / "staged", [[row(f"{INPUT}/y.jpg")]])
    with pytest.raises(GroundTruthError, match="none of its 1 images is in the run"):
        evaluate(gt, staged, INPUT, CATEGORIES)


GOOD_IMAGE = {"id": 1, "file_name": "a.jpg"}
GOOD_CATEGORY = {"id": 1, "name": "person"}


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (json.dumps({"images": [GOOD_IMAGE], "categories": [GOOD_CATEGORY]}).encode(),
     "missing key 'annotations'"),
    (json.dumps({"images": [GOOD_IMAGE], "categories": [GOOD_CATEGORY], "annotations": [
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}).encode(),
     "'bbox' must be 4 numbers"),
    (json.dumps({"images": [GOOD_IMAGE], "categories": [GOOD_CATEGORY], "annotations": [
        {"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}]}).encode(),
     "is not the id of an image"),
    (json.dumps({"images": [GOOD_IMAGE], "categories": [GOOD_CATEGORY], "annotations": [
        {"image_id": [1], "category_id": 1, "bbox": [1, 2, 3, 4]}]}).encode(),
     "is not the id of an image"),
    (json.dumps({"images": [{"id": 1}], "categories": [], "annotations": []}).encode(),
     "'file_name'"),
    (json.dumps([1, 2]).encode(), "JSON object"),
])
def test_bad_ground_truth_is_one_line(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(GroundTruthError) as caught:
        load_ground_truth(str(path))
    message = str(caught.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_unreadable_ground_truth(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(GroundTruthError, match=f"ground truth {missing}: cannot read: not found"):
        load_ground_truth(missing)


def test_area_and_iscrowd_filled_in(tmp_path):
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", ["a.jpg"], [(0, 7, (0, 0, 4, 5))],
                                    GT_CATEGORIES))
    (ann,) = gt.dataset["annotations"]
    assert ann["area"] == 20 and ann["iscrowd"] == 0
    assert len(gt.sha256) == 64


def test_pr_curve_png(tmp_path):
    recall = np.linspace(0, 1, 101)
    png = pr_curve_png("person", recall, np.clip(1.2 - recall, 0, 1), 0.912)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (480, 360)
    blank = pr_curve_png("nothing", recall, np.full(101, -1.0), None)
    assert Image.open(io.BytesIO(blank)).size == (480, 360)


def test_streams_the_shards(tmp_path):
    """20,000 unlabelled rows in 40 shards, 100 labelled: Python memory stays well below what
    holding the run's listing would take."""
    box = (5, 5, 30, 30)
    folder = "/data/in/" + "a-rather-long-folder-name-" * 6
    labelled = [f"lab/{i:03d}.jpg" for i in range(100)]
    gt = load_ground_truth(write_gt(tmp_path / "gt.json", labelled,
                                    [(i, 7, box) for i in range(100)], GT_CATEGORIES))
    shards, index = [], 0
    for s in range(40):
        rows = []
        for _ in range(500):
            rows.append(row(f"{folder}/unlabelled/{index:08d}.jpg", index, shard=s))
            index += 1
        if s % 8 == 0:
            rows += [row(f"{folder}/{name}", index + k, [(box, "person", 0.9)], shard=s)
                     for k, name in enumerate(labelled[s // 8 * 20:(s // 8 + 1) * 20])]
            index += 20
        shards.append(rows)
    staged = write_shards(tmp_path / "staged", shards)
    evaluate(gt, staged[:1], folder, CATEGORIES)  # warm up imports and caches

    tracemalloc.start()
    try:
        result = evaluate(gt, staged, folder, CATEGORIES)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        listing = [uri for shard in staged
                   for uri in pq.read_table(shard, columns=["image_uri"])["image_uri"].to_pylist()]
        _, listing_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.matched_images == 100 and result.ap == 1.0
    assert len(listing) == 20_100
    assert peak < listing_peak / 3, (peak, listing_peak)


def test_ground_truth_and_shards_on_s3(moto_server, tmp_path):
    import s3fs

    url = moto_server()
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(url)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=url)
        fs.mkdir("eval-bucket")
        box = (3, 4, 50, 60)
        gt_local = write_gt(tmp_path / "gt.json", ["cats/one.jpg", "two.jpg"],
                            [(0, 7, box), (1, 3, box)], GT_CATEGORIES)
        fs.put_file(gt_local, "eval-bucket/gt/instances.json")
        (local_shard,) = write_shards(tmp_path / "staged", [
            [row("s3://eval-bucket/in/cats/one.jpg", 0, [(box, "person", 0.9)]),
             row("s3://eval-bucket/in/more/two.jpg", 1, [(box, "car", 0.6)])]])
        fs.put_file(local_shard, "eval-bucket/run/staged/shard-00000.parquet")

        gt = load_ground_truth("s3://eval-bucket/gt/instances.json")
        result = evaluate(gt, ["s3://eval-bucket/run/staged/shard-00000.parquet"],
                          "s3://eval-bucket/in", CATEGORIES)
        assert gt.sha256 == storage.sha256_bytes(Path(gt_local).read_bytes())
        assert result.matched_images == 2 and result.ap == 1.0

        with pytest.raises(GroundTruthError, match="s3://eval-bucket/gt/missing.json: cannot read"):
            load_ground_truth("s3://eval-bucket/gt/missing.json")
    finally:
        storage.configure(None)
        s3fs.S3FileSystem.clear_instance_cache()
