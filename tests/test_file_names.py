"""File names that are bytes, not text, and the entries a listing skips on purpose: every image
gets one row that leads back to its file, and every skip is counted where a person looks."""

import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest
import s3fs
from test_config_listing_storage import TREE, TREE_SKIPPED

from detectflow import storage
from detectflow.cli import format_summary
from detectflow.listing import iter_images
from flows.detect_objects import detect_objects

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
# (name as bytes, which bundled photo it holds): Latin-1, bytes that no encoding decodes, a "%"
# next to them, a folder that is not UTF-8, and names that are valid UTF-8 (kept as paths).
NAMES = [
    (b"caf\xe9.jpg", "coffee.jpg"),
    (b"\xff\xfe%41.jpg", "rocket.jpg"),
    (b"d\xe9j\xe0/vu.jpg", "astronaut.jpg"),
    (b"chelsea.jpg", "chelsea.jpg"),
    (b"100% na\xc3\xafve.jpg", "motorcycle.jpg"),
]


def _write(path: bytes, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_image_uris_are_lossless_and_map_back_to_the_bytes_name(tmp_path):
    root = os.fsencode(tmp_path)
    for name, _ in NAMES:
        _write(root + b"/" + name, name)
    uris = [u for u, *_ in iter_images(str(tmp_path), (".jpg",))]
    assert [os.fsencode(storage.image_path(u)) for u in uris] == sorted(
        root + b"/" + name for name, _ in NAMES)
    assert [storage.read_image(u) for u in uris] == sorted(name for name, _ in NAMES)
    by_name = {os.fsencode(storage.image_path(u))[len(root) + 1:]: u for u in uris}
    assert by_name[b"caf\xe9.jpg"] == storage.FILE_URI + str(tmp_path) + "/caf%E9.jpg"
    assert by_name[b"\xff\xfe%41.jpg"].endswith("/%FF%FE%2541.jpg")
    assert by_name[b"100% na\xc3\xafve.jpg"] == str(tmp_path) + "/100% naïve.jpg"
    assert all(u.encode("utf-8") for u in uris)  # Parquet strings must be UTF-8
    assert storage.image_path("s3://bucket/a%E9.jpg") == "s3://bucket/a%E9.jpg"


def test_s3_follows_the_local_skip_rule(s3):
    """Keys under a folder can sort before its marker (``a.jpg`` < ``manifest.json``,
    ``0.jpg`` < ``_staging/``): the folder is asked about once, when its first image is listed."""
    storage.configure(s3)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=s3)
        fs.mkdir("detectflow-tree")
        for name in TREE:
            fs.pipe_file(f"detectflow-tree/in/{name}", b"xyz")
        skipped = Counter()
        listed = [u for u, *_ in iter_images("s3://detectflow-tree/in", (".jpg", ".png"),
                                            skipped)]
        assert listed == sorted(f"s3://detectflow-tree/in/{n}" for n, what in TREE.items()
                                if what == "listed")
        assert skipped == Counter(TREE_SKIPPED)
        # The input itself is never skipped, even an output prefix.
        assert [u for u, *_ in iter_images("s3://detectflow-tree/in/results", (".jpg",))] == [
            "s3://detectflow-tree/in/results/loose.jpg"]
    finally:
        storage.configure(None)


@pytest.fixture(scope="module")
def odd_run(ray_local, prefect_api, sample_dir, small_weights, tmp_path_factory):
    """One run over names that are not UTF-8, next to a hidden photo, a dangling link and a
    published run of another output prefix."""
    inp = tmp_path_factory.mktemp("odd") / "in"
    root = os.fsencode(inp)
    for name, photo in NAMES:
        _write(root + b"/" + name, (sample_dir / photo).read_bytes())
    photo = (sample_dir / "chelsea.jpg").read_bytes()
    for name in (b".hidden.jpg", b".thumbs/a.jpg", b"old/run-1/samples/000000-a.png"):
        _write(root + b"/" + name, photo)
    _write(root + b"/old/run-1/manifest.json", b"{}")
    _write(root + b"/old/latest.json", b"{}")
    os.symlink(b"/nowhere/x.jpg", root + b"/dead.jpg")
    out = inp.parent / "out"
    state = detect_objects(input_uri=str(inp), output_uri=str(out), model=SMALL,
                           weights=str(small_weights), score_threshold=0.3, run_id="odd",
                           sample_size=len(NAMES), num_actors=1, return_state=True)
    assert state.is_completed(), state.message
    return {"root": root, "dir": out / "odd", "result": state.result()}


def test_every_file_one_row_that_leads_back_to_its_bytes_name(odd_run):
    manifest = json.loads((odd_run["dir"] / "manifest.json").read_text())
    rows = [r for f in manifest["output"]["files"]
            for r in pq.read_table(odd_run["dir"] / f["path"]).to_pylist()]
    names = [os.fsencode(storage.image_path(r["image_uri"])) for r in rows]
    assert sorted(names) == sorted(odd_run["root"] + b"/" + n for n, _ in NAMES)
    assert all(r["error"] is None and r["width"] for r in rows)
    assert manifest["counts"] == {**manifest["counts"], "images": len(NAMES), "failed": 0}
    # The samples read the images through the same URIs: every row was drawn.
    assert len(manifest["output"]["samples"]) == len(NAMES)


def test_skips_are_counted_in_the_manifest_and_the_summary(odd_run):
    result = odd_run["result"]
    assert result["input"]["count"] == len(NAMES)
    assert result["input"]["skipped"] == {"hidden": 2, "broken_link": 1, "unreadable": 0,
                                          "run_output": 1}
    lines = format_summary(result).splitlines()
    assert "skipped: 2 hidden, 1 broken link, 1 run output" in lines
