"""Exports of a run read back by the tools' own readers: pycocotools, supervision (COCO, YOLO,
Pascal VOC) and Label Studio's converter, on real images and Parquet files, locally and on S3."""

import hashlib
import io
import json
import os
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from export_readers import (
    assert_boxes,
    images_dir,
    label_studio_coco,
    read_names,
    read_names_text,
    xyxy,
)
from lxml import etree
from PIL import Image

from benchmarks.exports import write_file
from detectflow import storage
from detectflow.errors import ConfigError
from detectflow.exports import FORMATS, export
from detectflow.models import COCO_CATEGORIES
from detectflow.schema import DETECTION_SCHEMA, detection_row, rows_to_table

with warnings.catch_warnings():  # supervision warns that it runs without OpenCV
    warnings.simplefilter("ignore")
    import supervision as sv

SHAPES = ("__background__", "circle", "square", "triangle", "star")
# The same four classes as label ids of each table: torchvision's COCO table has gaps.
TABLES = {"shapes": (SHAPES, [1, 2, 3, 4]),
          "coco": (COCO_CATEGORIES, [1, 18, 90, 44])}
# (relative path, size, [(xyxy, class 1..4, score)]); a/cat.png and b/cat.png share a name.
IMAGES = [
    ("a/cat.png", (64, 48), [((1.25, 2.5, 30.75, 40.125), 1, 0.9),
                             ((10.5, 5.25, 60.0, 20.75), 2, 0.4)]),
    ("a/dog.jpg", (100, 75), [((20.2, 10.4, 55.6, 70.8), 4, 0.8),
                              ((5.0, 5.0, 15.0, 15.0), 1, 0.05),
                              ((40.3, 30.1, 99.9, 74.9), 2, 0.6)]),
    ("b/cat.png", (80, 60), [((0.5, 0.5, 79.5, 59.5), 3, 0.95)]),
    ("b/empty.png", (50, 40), []),
]
BROKEN = "b/broken.jpg"


def make_run(root: Path, table: str = "shapes", order=(0, 1)) -> dict:
    """Images under ``root/in``, two Parquet files under ``root/run`` (one error row)."""
    categories, ids = TABLES[table]
    folder = root / "in"
    rows = []
    for rel, (w, h), dets in IMAGES:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (40, 90, 160)).save(path)
        rows.append(detection_row(
            image_uri=str(path), index=len(rows), shard=0, width=w, height=h,
            boxes=np.array([b for b, _, _ in dets], np.float32).reshape(-1, 4),
            scores=np.array([s for _, _, s in dets], np.float32),
            labels=np.array([ids[k - 1] for _, k, _ in dets], np.int64),
            categories=categories, model="m", run_id="r"))
    rows.insert(1, detection_row(image_uri=str(folder / BROKEN), index=9, shard=0, width=None,
                                 height=None, model="m", run_id="r", error="decode: bad"))
    shards = [rows[:3], rows[3:]]
    uris = []
    (root / "run").mkdir(exist_ok=True)
    for i in order:
        path = root / "run" / f"part-{i:05d}.parquet"
        pq.write_table(rows_to_table(shards[i], DETECTION_SCHEMA), path)
        uris.append(str(path))
    return {"uris": uris, "input": str(folder), "categories": categories, "ids": ids}


def expected(min_score=0.0, only=()):
    """rel -> [(xyxy, class name, score)] as an export should hold them."""
    return {rel: [(b, SHAPES[k], s) for b, k, s in dets
                  if s >= min_score and (not only or SHAPES[k] in only)]
            for rel, _, dets in IMAGES}


def name_of(table: str, k_name: str) -> str:
    categories, ids = TABLES[table]
    return categories[ids[SHAPES.index(k_name) - 1]]


def listed(read, files: list[dict]) -> dict[str, str]:
    """Every file an export vouches for, path → sha256: ``files`` (each checked against
    ``read(path)``) and, for per-image files, the ``SHA256SUMS`` that ``files`` lists."""
    found = {}
    for f in files:
        data = read(f["path"])
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        found[f["path"]] = f["sha256"]
        if f["path"] == "SHA256SUMS":  # the format of sha256sum: "<hex>  <path>"
            found |= {p: h for h, p in (line.split("  ", 1)
                                        for line in data.decode().splitlines())}
    return found


def check_files(result, out: Path) -> None:
    """``files`` (and the SHA256SUMS it lists) vouch for every file written, by its sha256;
    no leftovers; per-image files are not in ``files`` itself."""
    on_disk = sorted(str(p.relative_to(out)).replace(os.sep, "/")
                     for p in out.rglob("*") if p.is_file())
    vouched = listed(lambda path: (out / path).read_bytes(), result.files)
    assert sorted(vouched) == on_disk
    for path, digest in vouched.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest
    assert not any(f["path"].startswith(("labels/", "annotations/")) for f in result.files)








@pytest.mark.parametrize("table", ["shapes", "coco"])
def test_coco_reads_back_in_pycocotools_and_supervision(tmp_path, table):
    from pycocotools.coco import COCO

    run = make_run(tmp_path, table)
    out = tmp_path / "out"
    result = export(run["uris"], str(out), "coco", categories=run["categories"],
                    input_uri=run["input"], model_version="m-1")
    assert (result.format, result.images, result.boxes, result.skipped_errors,
            result.renamed) == ("coco", 4, 6, 1, 0)
    check_files(result, out)
    assert [f["path"] for f in result.files] == ["annotations.json", "results.json"]

    coco = COCO(str(out / "annotations.json"))
    # Category ids are the run's label ids (gaps kept), every real class listed.
    real = [(i, n) for i, n in enumerate(run["categories"]) if n not in ("__background__", "N/A")]
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == real
    want = expected()
    by_name = {img["file_name"]: img for img in coco.dataset["images"]}
    assert sorted(by_name) == sorted(want)
    for rel, (w, h), _ in IMAGES:
        img = by_name[rel]
        assert (img["width"], img["height"]) == (w, h)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert_boxes([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns],
                     [SHAPES[run["ids"].index(a["category_id"]) + 1] for a in anns],
                     want[rel], 1e-3)
        assert [a["score"] for a in anns] == pytest.approx([s for _, _, s in want[rel]], abs=1e-4)
        assert all(a["iscrowd"] == 0 and a["area"] == pytest.approx(
            a["bbox"][2] * a["bbox"][3], abs=1e-2) for a in anns)

    results = coco.loadRes(str(out / "results.json"))
    assert len(results.dataset["annotations"]) == 6
    assert sorted(round(a["score"], 3) for a in results.dataset["annotations"]) == sorted(
        round(s, 3) for dets in want.values() for _, _, s in dets)

    ds = sv.DetectionDataset.from_coco(images_directory_path=run["input"],
                                       annotations_path=str(out / "annotations.json"))
    assert ds.classes == [n for _, n in real]
    for rel, _, _ in IMAGES:
        det = ds.annotations[str(Path(run["input"], rel).resolve())]
        names = [name_of(table, n) for _, n, _ in want[rel]]
        assert [ds.classes[c] for c in det.class_id] == names
        assert np.allclose(det.xyxy, np.array([b for b, _, _ in want[rel]]).reshape(-1, 4),
                           atol=0.5)


@pytest.mark.parametrize("table", ["shapes", "coco"])
def test_yolo_reads_back_in_supervision(tmp_path, table):
    run = make_run(tmp_path, table)
    out = tmp_path / "out"
    result = export(run["uris"], str(out), "yolo", categories=run["categories"],
                    input_uri=run["input"], model_version="m-1")
    assert (result.images, result.boxes, result.skipped_errors, result.renamed) == (4, 6, 1, 2)
    check_files(result, out)
    import yaml

    data = yaml.safe_load((out / "data.yaml").read_text())
    real = [n for n in run["categories"] if n not in ("__background__", "N/A")]
    # Contiguous 0-based indices over the exported classes, in label order.
    assert data["nc"] == len(real) and data["names"] == dict(enumerate(real))
    assert data["train"] == data["val"] == "images"

    names = read_names(out / "names.csv")
    assert sorted(storage.image_path(u) for u in names.values()) == sorted(
        str(Path(run["input"], rel)) for rel, _, _ in IMAGES)
    ds = sv.DetectionDataset.from_yolo(images_directory_path=images_dir(names, tmp_path / "im"),
                                       annotations_directory_path=str(out / "labels"),
                                       data_yaml_path=str(out / "data.yaml"))
    assert ds.classes == real
    want = expected()
    for name, uri in names.items():
        rel = os.path.relpath(storage.image_path(uri), run["input"])
        det = ds.annotations[str(tmp_path / "im" / name)]
        assert_boxes(det.xyxy, [ds.classes[c] for c in det.class_id],
                     [(b, name_of(table, n), s) for b, n, s in want[rel]], 0.5)
    assert (out / "labels" / "empty.txt").read_text() == ""  # an image with no objects


@pytest.mark.parametrize("table", ["shapes", "coco"])
def test_voc_reads_back_in_supervision(tmp_path, table):
    run = make_run(tmp_path, table)
    out = tmp_path / "out"
    result = export(run["uris"], str(out), "voc", categories=run["categories"],
                    input_uri=run["input"], model_version="m-1")
    assert (result.images, result.boxes, result.skipped_errors, result.renamed) == (4, 6, 1, 2)
    check_files(result, out)
    names = read_names(out / "names.csv")
    ds = sv.DetectionDataset.from_pascal_voc(
        images_directory_path=images_dir(names, tmp_path / "im"),
        annotations_directory_path=str(out / "annotations"))
    want = expected()
    for name, uri in names.items():
        rel = os.path.relpath(storage.image_path(uri), run["input"])
        det = ds.annotations[str(tmp_path / "im" / name)]
        assert_boxes(det.xyxy, [ds.classes[c] for c in det.class_id],
                     [(b, name_of(table, n), s) for b, n, s in want[rel]], 0.5)
        root = etree.parse(str(out / "annotations" / (os.path.splitext(name)[0] + ".xml")))
        w, h = next((size for r, size, _ in IMAGES if r == rel))
        assert (root.findtext("filename"), root.findtext("path")) == (name, uri)
        assert [root.findtext(f"size/{k}") for k in ("width", "height", "depth")] == [
            str(w), str(h), "3"]
        assert [o.findtext("pose") for o in root.findall("object")] == [
            "Unspecified"] * len(want[rel])


def validate_task(task: dict, model_version: str) -> None:
    """The JSON shape Label Studio imports: data.image, one prediction of rectangles."""
    assert set(task) == {"data", "predictions"} and isinstance(task["data"]["image"], str)
    (prediction,) = task["predictions"]
    assert set(prediction) == {"model_version", "score", "result"}
    assert prediction["model_version"] == model_version
    scores = [r["score"] for r in prediction["result"]]
    assert prediction["score"] == pytest.approx(np.mean(scores) if scores else 0, abs=1e-4)
    for r in prediction["result"]:
        assert set(r) == {"id", "type", "from_name", "to_name", "original_width",
                          "original_height", "image_rotation", "value", "score"}
        assert (r["type"], r["from_name"], r["to_name"], r["image_rotation"]) == (
            "rectanglelabels", "label", "image", 0)
        assert isinstance(r["id"], str) and len(r["id"]) == 10
        assert isinstance(r["original_width"], int) and isinstance(r["original_height"], int)
        v = r["value"]
        assert set(v) == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
        assert v["rotation"] == 0 and len(v["rectanglelabels"]) == 1
        assert 0 <= v["x"] <= v["x"] + v["width"] <= 100 + 1e-6
        assert 0 <= v["y"] <= v["y"] + v["height"] <= 100 + 1e-6
        assert 0 <= r["score"] <= 1


def test_label_studio_tasks_convert_with_label_studios_converter(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "out"
    result = export(run["uris"], str(out), "labelstudio", categories=run["categories"],
                    input_uri=run["input"], model_version="m-1", min_score=0.1)
    assert (result.images, result.boxes, result.skipped_errors) == (4, 5, 1)
    check_files(result, out)
    assert [f["path"] for f in result.files] == ["config.xml", "tasks.json"]
    tasks = json.loads((out / "tasks.json").read_text())
    for task in tasks:
        validate_task(task, "m-1")
    # Without image_root a local image is its file:// URI, which decodes back to the file.
    rels = [os.path.relpath(storage.image_path(t["data"]["image"]), run["input"]) for t in tasks]
    assert all(t["data"]["image"].startswith("file:///") for t in tasks)
    assert rels == ["a/cat.png", "a/dog.jpg", "b/cat.png", "b/empty.png"]
    ids = [r["id"] for t in tasks for r in t["predictions"][0]["result"]]
    assert len(set(ids)) == len(ids)

    names, got = label_studio_coco(tasks, out / "config.xml", tmp_path / "convert")
    assert sorted(names.values()) == sorted(SHAPES[1:])
    want = expected(min_score=0.1)
    for image, rel in zip(sorted(got["images"], key=lambda i: i["id"]), rels):
        anns = [a for a in got["annotations"] if a["image_id"] == image["id"]]
        assert_boxes([xyxy(a["bbox"]) for a in anns], [names[a["category_id"]] for a in anns],
                     want[rel], 0.5)

    from label_studio_converter import Converter

    converter = Converter(str(out / "config.xml"), str(tmp_path), download_resources=False)
    converter.convert_to_yolo(str(tmp_path / "convert" / "ls.json"), str(tmp_path / "ls-yolo"),
                              is_dir=False)
    classes = (tmp_path / "ls-yolo" / "classes.txt").read_text().split("\n")[:4]
    lines = (tmp_path / "ls-yolo" / "labels" / "dog.txt").read_text().split("\n")
    export(run["uris"], str(tmp_path / "yolo"), "yolo", categories=run["categories"],
           input_uri=run["input"], model_version="m-1", min_score=0.1)
    ours = [line.split() for line in (tmp_path / "yolo" / "labels" / "dog.txt").read_text()
            .split("\n") if line]
    theirs = [line.split() for line in lines if line]
    assert [classes[int(t[0])] for t in theirs] == [SHAPES[int(o[0]) + 1] for o in ours]
    assert np.allclose(np.array([t[1:] for t in theirs], float) * [100, 75, 100, 75],
                       np.array([o[1:] for o in ours], float) * [100, 75, 100, 75], atol=0.5)

    # image_root: the URL Label Studio serves the input folder at, with paths URL-quoted.
    result = export(run["uris"], str(tmp_path / "ls2"), "labelstudio",
                    categories=run["categories"], input_uri=run["input"], model_version="m-1",
                    image_root="/data/local-files/?d=in/")
    tasks = json.loads((tmp_path / "ls2" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [
        f"/data/local-files/?d=in/{rel}" for rel in ("a/cat.png", "a/dog.jpg", "b/cat.png",
                                                     "b/empty.png")]
    config = (tmp_path / "ls2" / "config.xml").read_text()
    assert '<Image name="image" value="$image"/>' in config
    assert '<RectangleLabels name="label" toName="image">' in config


def test_same_base_names_get_stable_unique_names(tmp_path):
    first = make_run(tmp_path / "one", order=(0, 1))
    second = make_run(tmp_path / "one", order=(1, 0))  # same run, shards the other way round
    mappings = []
    for i, run in enumerate((first, second)):
        out = tmp_path / f"out{i}"
        result = export(run["uris"], str(out), "yolo", categories=SHAPES,
                        input_uri=run["input"], model_version="m")
        assert result.renamed == 2
        mappings.append(read_names(out / "names.csv"))
    assert mappings[0] == mappings[1] and len(mappings[0]) == 4
    cats = {name: uri for name, uri in mappings[0].items() if name.startswith("cat")}
    assert len(cats) == 2
    for name, uri in cats.items():
        assert name == f"cat__{hashlib.sha256(uri.encode()).hexdigest()[:8]}.png"
    assert {"dog.jpg", "empty.png"} <= set(mappings[0])
    assert sorted(p.name for p in (tmp_path / "out0" / "labels").iterdir()) == sorted(
        os.path.splitext(n)[0] + ".txt" for n in mappings[0])


def test_filters_errors_and_yolo_scores(tmp_path):
    run = make_run(tmp_path)
    kw = dict(categories=SHAPES, input_uri=run["input"], model_version="m")

    result = export(run["uris"], str(tmp_path / "c"), "coco", min_score=0.5,
                    only=("circle", "square"), **kw)
    assert (result.images, result.boxes, result.skipped_errors) == (4, 2, 1)
    data = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["circle", "square"]
    assert sorted((a["category_id"], round(a["score"], 2)) for a in data["annotations"]) == [
        (1, 0.9), (2, 0.6)]
    assert BROKEN not in {i["file_name"] for i in data["images"]}

    result = export(run["uris"], str(tmp_path / "y"), "yolo", only=("star", "square"),
                    yolo_scores=True, **kw)
    data_yaml = (tmp_path / "y" / "data.yaml").read_text()
    assert "nc: 2" in data_yaml
    lines = (tmp_path / "y" / "labels" / "dog.txt").read_text().splitlines()
    assert [(line.split()[0], line.split()[5]) for line in lines] == [
        ("1", "0.800000"), ("0", "0.600000")]  # square 0, star 1
    assert all(len(line.split()) == 6 for line in lines)

    with pytest.raises(ConfigError, match=r"'hexagon'.*valid names are circle, square, "
                                          r"triangle, star"):
        export(run["uris"], str(tmp_path / "x"), "coco", only=("hexagon", "star"), **kw)
    with pytest.raises(ConfigError, match="unknown export format 'csv'"):
        export(run["uris"], str(tmp_path / "x"), "csv", **kw)
    with pytest.raises(ConfigError, match="label id 4 .* not in the label table"):
        export(run["uris"], str(tmp_path / "x"), "coco", categories=SHAPES[:3],
               input_uri=run["input"], model_version="m")
    # A failed export leaves no half-written JSON (nor its temporary file) behind.
    assert not [p for p in (tmp_path / "x").rglob("*") if p.is_file()]
    assert FORMATS == ("coco", "yolo", "voc", "labelstudio")


def test_name_that_is_not_utf8(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = os.path.join(os.fsencode(folder), b"caf\xe9 %1.png")
    Image.new("RGB", (20, 10)).save(path)
    uri = storage.local_image_uri(os.fsdecode(path))
    assert uri.startswith("file://")
    table = rows_to_table([detection_row(
        image_uri=uri, index=0, shard=0, width=20, height=10,
        boxes=np.array([[1, 1, 9, 9]], np.float32), scores=np.array([0.5], np.float32),
        labels=np.array([1]), categories=SHAPES, model="m", run_id="r")], DETECTION_SCHEMA)
    pq.write_table(table, tmp_path / "p.parquet")
    kw = dict(categories=SHAPES, input_uri=str(folder), model_version="m")
    export([str(tmp_path / "p.parquet")], str(tmp_path / "y"), "yolo", **kw)
    assert read_names(tmp_path / "y" / "names.csv") == {"caf%E9 %251.png": uri}
    assert (tmp_path / "y" / "labels" / "caf%E9 %251.txt").exists()
    export([str(tmp_path / "p.parquet")], str(tmp_path / "c"), "coco", **kw)
    (image,) = json.loads((tmp_path / "c" / "annotations.json").read_text())["images"]
    assert storage.image_path(f"file://{folder}/{image['file_name']}") == os.fsdecode(path)
    export([str(tmp_path / "p.parquet")], str(tmp_path / "l"), "labelstudio", **kw)
    (task,) = json.loads((tmp_path / "l" / "tasks.json").read_text())
    assert storage.image_path(task["data"]["image"]) == os.fsdecode(path)


def test_export_to_and_from_s3(moto_server, tmp_path):
    import s3fs
    from pycocotools.coco import COCO

    url = moto_server()
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(url)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=url)
        fs.mkdir("exports")
        # A run over S3 images: its Parquet files on S3 too (images need not be read).
        run = make_run(tmp_path, "coco")  # torchvision's label table, gaps and all
        for uri in run["uris"]:
            table = pq.read_table(uri)
            uris = [u.replace(run["input"], "s3://exports/in") for u in
                    table["image_uri"].to_pylist()]
            table = table.set_column(0, "image_uri", pa.array(uris, pa.string()))
            sink = io.BytesIO()
            pq.write_table(table, sink)
            fs.pipe_file(f"exports/run/{Path(uri).name}", sink.getvalue())
        shards = [f"s3://exports/run/{Path(u).name}" for u in run["uris"]]
        kw = dict(categories=COCO_CATEGORIES, input_uri="s3://exports/in", model_version="m-1")

        for fmt in FORMATS:
            result = export(shards, f"s3://exports/out/{fmt}", fmt, **kw)
            assert (result.images, result.skipped_errors) == (4, 1)
            vouched = listed(lambda path: fs.cat_file(f"exports/out/{fmt}/{path}"),  # noqa: B023
                             result.files)
            assert len(fs.find(f"exports/out/{fmt}")) == len(vouched)

        fs.get_file("exports/out/coco/annotations.json", str(tmp_path / "a.json"))
        coco = COCO(str(tmp_path / "a.json"))
        assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(expected())
        assert len(coco.loadRes(json.loads(fs.cat_file("exports/out/coco/results.json")))
                   .dataset["annotations"]) == 6
        tasks = json.loads(fs.cat_file("exports/out/labelstudio/tasks.json"))
        for task in tasks:
            validate_task(task, "m-1")
        rels = ("a/cat.png", "a/dog.jpg", "b/cat.png", "b/empty.png")
        assert [t["data"]["image"] for t in tasks] == [f"s3://exports/in/{rel}" for rel in rels]
        fs.get_file("exports/out/labelstudio/config.xml", str(tmp_path / "config.xml"))
        names, got = label_studio_coco(tasks, tmp_path / "config.xml", tmp_path / "convert")
        want = expected()
        for image, rel in zip(sorted(got["images"], key=lambda i: i["id"]), rels):
            anns = [a for a in got["annotations"] if a["image_id"] == image["id"]]
            assert_boxes([xyxy(a["bbox"]) for a in anns], [names[a["category_id"]] for a in anns],
                         [(b, name_of("coco", n), s) for b, n, s in want[rel]], 0.5)
        names = read_names_text(fs.cat_file("exports/out/yolo/names.csv").decode())
        assert len(names) == 4 and all(u.startswith("s3://exports/in/") for u in names.values())
        assert fs.exists("exports/out/voc/annotations/dog.xml")
    finally:
        storage.configure(None)
        s3fs.S3FileSystem.clear_instance_cache()




def test_many_rows_stream_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(3)
    shards = []
    for i in range(20):
        shards.append(tmp_path / f"part-{i:05d}.parquet")
        write_file(shards[-1], i * 1000, 1000, rng, per_image=(0, 3))
    tracemalloc.start()
    try:
        held = pq.read_table(shards[0]).to_pylist()
        one_file = tracemalloc.get_traced_memory()[0]
        del held
        peaks = {}
        for fmt in ("coco", "labelstudio"):  # the single large files
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            result = export([str(p) for p in shards], str(tmp_path / fmt), fmt,
                            categories=SHAPES, input_uri="/in", model_version="m")
            peaks[fmt] = tracemalloc.get_traced_memory()[1] - base
            assert result.images == 20_000
    finally:
        tracemalloc.stop()
    holding = 20 * one_file  # what the rows would take as Python objects
    print(f"holding {holding / 1e6:.1f} MB, export peaks", peaks)
    for fmt, peak in peaks.items():
        assert peak < holding / 5, (fmt, peak, holding)
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(data["images"]) == 20_000 and len(data["annotations"]) == result.boxes
