"""A generated corpus of awkward and broken files: every valid image gets detections (in its
displayed orientation), every broken one becomes a row with a short reason, the run completes."""

import io
import json
import re
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.detect_objects import detect_objects

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("corpus")
    photo = Image.open(sample_dir / "chelsea.jpg").convert("RGB")  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: 300 x 451
    files = {
        "01 truncated.jpg": _save(photo, "JPEG")[:2000],
        "02 zero-byte.jpg": b"",
        "03 text.jpg": b"this is not an image\n",
        "04 alpha.png": _save(photo.convert("RGBA"), "PNG"),
        "05 gray.png": _save(photo.convert("L"), "PNG"),
        "06 sixteen-bit.png": _save(Image.fromarray(
            np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
        "07 cmyk.jpg": _save(photo.convert("CMYK"), "JPEG"),
        "08 palette.gif": _save(photo.convert("P"), "GIF"),
        "09 exif-rotated.jpg": _save(photo, "JPEG", exif=exif.tobytes()),
        "10 one-pixel.png": _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "11 huge.jpg": _save(photo.resize((12000, 9000)), "JPEG", quality=70),
        "12 chat noir été.jpg": _save(photo, "JPEG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def rows(corpus, ray_local, prefect_api, small_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus-out")
    state = detect_objects(input_uri=str(corpus), output_uri=str(out), model=SMALL,
                           weights=str(small_weights), score_threshold=0.3, run_id="corpus",
                           max_failure_fraction=0.5, num_actors=1, return_state=True)
    assert state.is_completed(), state.message
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    table = pq.read_table(out / "corpus" / "detections" / "part-00000.parquet")
    return {r["image_uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}, manifest


def test_every_file_appears_once(rows, corpus):
    by_name, manifest = rows
    assert sorted(by_name) == sorted(p.name for p in corpus.iterdir())
    assert manifest["counts"]["images"] == 12 and manifest["counts"]["failed"] == 3
    assert {f["image_uri"].rsplit("/", 1)[-1] for f in manifest["failures"]} == {
        "01 truncated.jpg", "02 zero-byte.jpg", "03 text.jpg"}


def test_broken_files_get_short_reasons(rows):
    by_name, _ = rows
    assert by_name["02 zero-byte.jpg"]["error"] == "empty file"
    for name in ("01 truncated.jpg", "03 text.jpg"):
        error = by_name[name]["error"]
        assert error.startswith("cannot decode") and len(error) <= 300 and "\n" not in error
        assert by_name[name]["boxes"] == []


def test_valid_images_get_detections_in_displayed_orientation(rows):
    by_name, _ = rows
    sizes = {"04 alpha.png": (451, 300), "05 gray.png": (451, 300),
             "06 sixteen-bit.png": (451, 300), "07 cmyk.jpg": (451, 300),
             "08 palette.gif": (451, 300), "09 exif-rotated.jpg": (300, 451),
             "10 one-pixel.png": (1, 1), "11 huge.jpg": (12000, 9000),
             "12 chat noir été.jpg": (451, 300)}
    for name, (width, height) in sizes.items():
        row = by_name[name]
        assert row["error"] is None, (name, row["error"])
        assert (row["width"], row["height"]) == (width, height), name
        for x1, y1, x2, y2 in row["boxes"]:
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, name
    assert by_name["12 chat noir été.jpg"]["boxes"]  # the plain photo does get boxes
    assert max(b[2] for b in by_name["11 huge.jpg"]["boxes"]) > 4096  # original pixels


def test_too_many_failures_mark_the_run_failed_after_writing(corpus, ray_local, prefect_api,
                                                             small_weights, tmp_path):
    state = detect_objects(input_uri=str(corpus), output_uri=str(tmp_path), model=SMALL,
                           weights=str(small_weights), run_id="strict", limit=4,
                           num_actors=1, return_state=True)
    assert state.is_failed()
    assert "3 of 4 images failed" in state.message and "max_failure_fraction=0.1" in state.message
    assert (tmp_path / "strict" / "manifest.json").exists()  # outputs written, then flagged
    assert not (tmp_path / "latest.json").exists()  # but consumers are not pointed at it


@pytest.fixture
def full_disk(tmp_path):
    """A real file system that fills up: a 300 KiB tmpfs (needs the right to mount, as root in
    a container has)."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_run_in_one_line_naming_the_stage_and_path(
        full_disk, sample_dir, ray_local, prefect_api, small_weights):
    state = detect_objects(input_uri=str(sample_dir), output_uri=str(full_disk / "out"),
                           model=SMALL, weights=str(small_weights), run_id="full",
                           num_actors=1, return_state=True)
    assert state.is_failed()
    # The listing and the staged detections fit; the drawn samples do not.
    assert re.fullmatch(
        rf"OutputError: validate_sample: cannot write {full_disk}/out/full/samples/[^ ]+\.png: "
        "no space left on device", state.message), state.message
    assert not list(full_disk.rglob("*.tmp-*")) and not (full_disk / "out/full/manifest.json").exists()
    assert list((full_disk / "out" / "full" / "_staging" / "detections").glob("*.parquet"))


def test_a_read_only_output_is_refused_before_anything_runs(full_disk, sample_dir, prefect_api,
                                                            small_weights):
    subprocess.run(["mount", "-o", "remount,ro", str(full_disk)], check=True)
    state = detect_objects(input_uri=str(sample_dir), output_uri=str(full_disk / "out"),
                           model=SMALL, weights=str(small_weights), run_id="ro",
                           return_state=True)
    assert state.is_failed()
    assert state.message == (f"OutputError: cannot write to {full_disk}/out: {full_disk} is not "
                             "a writable folder")


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_a_task_that_fails_on_a_users_mistake_logs_no_traceback(caplog):
    import logging

    import tasks  # noqa: F401 - installs the filter, as in every process that runs a task
    from detectflow.errors import OutputError

    logger = logging.getLogger("prefect.task_runs")
    for exc in (OutputError("write_parquet: cannot write x: no space left on device"),
                RuntimeError("a bug")):
        try:
            raise exc
        except Exception:
            logger.error("Task run failed with exception: %r", exc, exc_info=True)
    user, bug = caplog.records[-2:]
    assert user.exc_info is None and "no space left" in user.getMessage()
    assert bug.exc_info is not None  # an unexpected error keeps its traceback
