"""Reading exports back with the tools' own readers, shared by the synthetic export tests and
the whole-flow runs: names.csv, an image folder laid out from it, and Label Studio's converter."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from detectflow import storage


def read_names_text(text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["name", "image_uri"]
    return {name: uri for name, uri in rows[1:]}


def read_names(path: Path) -> dict[str, str]:
    return read_names_text(path.read_text())


def images_dir(names: dict[str, str], folder: Path) -> str:
    """What a user builds from names.csv: each image under its export name."""
    folder.mkdir()
    for name, uri in names.items():
        shutil.copy(storage.image_path(uri), folder / name)
    return str(folder)


def assert_boxes(got_xyxy, got_names, want, tol):
    """``want``: [(xyxy, class name, score)] in the export's order."""
    assert list(got_names) == [n for _, n, _ in want]
    assert np.allclose(np.asarray(got_xyxy, float).reshape(-1, 4),
                       np.array([b for b, _, _ in want], float).reshape(-1, 4), atol=tol)


def label_studio_coco(tasks: list[dict], config_xml: Path, work: Path) -> tuple[dict, dict]:
    """Label Studio's converter run on the tasks: (category id -> name, its COCO JSON).
    The converter reads annotations, so each prediction is presented as the annotation a
    reviewer makes by accepting it, as Label Studio itself does."""
    from label_studio_converter import Converter

    as_annotated = [{"id": i + 1, "data": t["data"],
                     "annotations": [{"id": i + 1, "result": t["predictions"][0]["result"]}]}
                    for i, t in enumerate(tasks)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "ls.json").write_text(json.dumps(as_annotated))
    converter = Converter(str(config_xml), str(work), download_resources=False)
    assert {"COCO", "YOLO", "VOC"} <= set(converter.supported_formats)
    converter.convert_to_coco(str(work / "ls.json"), str(work / "ls-coco"), is_dir=False)
    got = json.loads((work / "ls-coco" / "result.json").read_text())
    assert len(got["images"]) == len(tasks)
    return {c["id"]: c["name"] for c in got["categories"]}, got


def xyxy(bbox: list[float]) -> list[float]:
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
