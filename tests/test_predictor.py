"""The Ray Data UDFs called directly (no Ray): decode rows and the Detector actor's batches."""

import pyarrow as pa
import pytest

from benchmarks.gpu_levers import matched_share
from detectflow.predictor import Detector, decode_batch, group_by_shape
from detectflow.schema import STAGED_SCHEMA

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _listing(uris):
    return pa.table({"image_uri": uris, "index": list(range(len(uris))),
                     "shard": [0] * len(uris)})


@pytest.fixture(scope="module")
def detector(small_weights):
    return Detector(SMALL, str(small_weights), 0.5, run_id="unit")


def test_group_by_shape_keeps_first_seen_order():
    assert group_by_shape([(2, 3), (4, 5), (2, 3), (1, 1)]) == [[0, 2], [1], [3]]


def test_decode_batch_keeps_every_row_and_records_failures(sample_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    uris = [str(sample_dir / "chelsea.jpg"), str(bad), str(tmp_path / "missing.jpg")]
    out = decode_batch(_listing(uris), max_side=200)
    rows = out.to_pylist()
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert (rows[0]["orig_width"], rows[0]["orig_height"]) == (451, 300)
    assert max(rows[0]["width"], rows[0]["height"]) == 200  # bounded on the CPU side
    assert len(rows[0]["pixels"]) == 3 * rows[0]["width"] * rows[0]["height"]
    assert rows[1]["error"].startswith("cannot decode") and rows[1]["pixels"] is None
    assert rows[2]["error"] == "file not found"


@pytest.mark.parametrize("count", [1, 3])
def test_detector_returns_rows_in_original_pixels(detector, sample_dir, count):
    uris = [str(p) for p in sorted(sample_dir.glob("*.jpg"))][:count]
    decoded = decode_batch(_listing(uris), max_side=4096)
    out = detector(decoded)
    assert out.schema == STAGED_SCHEMA and out.num_rows == count
    for row in out.to_pylist():
        assert row["error"] is None and row["model"] == SMALL and row["run_id"] == "unit"
        assert all(s >= 0.5 for s in row["scores"])
        for x1, y1, x2, y2 in row["boxes"]:
            assert 0 <= x1 <= x2 <= row["width"] and 0 <= y1 <= y2 <= row["height"]
    assert sum(len(r["boxes"]) for r in out.to_pylist()) > 0


def test_detector_boxes_follow_cpu_downscaling(small_weights, sample_dir):
    """A huge image is downscaled before inference, yet boxes come back in original pixels."""
    detector = Detector(SMALL, str(small_weights), 0.05, run_id="unit")
    uri = [str(sample_dir / "coffee.jpg")]
    full = detector(decode_batch(_listing(uri), max_side=4096)).to_pylist()[0]
    small = detector(decode_batch(_listing(uri), max_side=300)).to_pylist()[0]
    assert (small["width"], small["height"]) == (full["width"], full["height"]) == (600, 400)
    assert small["boxes"] and max(b[2] for b in small["boxes"]) > 300  # not in 300-px space


def test_detector_called_from_threads_at_once_gives_the_serial_rows(detector, sample_dir):
    """Ray Data runs ``gpu_streams`` batches at once in threads of one actor, sharing its model:
    concurrent calls must give exactly the rows that one call at a time gives."""
    from concurrent.futures import ThreadPoolExecutor

    uris = [str(p) for p in sorted(sample_dir.glob("*.jpg"))]
    batches = [decode_batch(_listing(uris[i::2]), max_side=4096) for i in range(2)] * 2
    serial = [detector(b).to_pylist() for b in batches]
    with ThreadPoolExecutor(len(batches)) as pool:
        concurrent = [t.to_pylist() for t in pool.map(detector, batches)]
    assert concurrent == serial and sum(len(r["boxes"]) for b in serial for r in b) > 0


def test_failed_and_empty_rows_pass_through(detector, sample_dir, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    decoded = decode_batch(_listing([str(empty), str(sample_dir / "rocket.jpg")]), 4096)
    strict = Detector.__new__(Detector)
    strict.__dict__.update(detector.__dict__, score_threshold=1.01)  # nothing can pass
    rows = strict(decoded).to_pylist()
    assert rows[0]["error"] == "empty file" and rows[0]["boxes"] == []
    assert rows[1]["error"] is None and rows[1]["boxes"] == [] and rows[1]["width"] == 640


def test_fp16_autocast_finds_the_fp32_boxes(detector, small_weights, sample_dir):
    """The precision lever (meant for GPUs, where it is fast) run on CPU, where autocast works
    too: the tolerance README states, on the bundled photos (measured 89% at IoU >= 0.9 with the
    offline calibrated weights; bf16, with 3 fewer mantissa bits, found 52%)."""
    uris = [str(p) for p in sorted(sample_dir.glob("*.jpg"))]
    decoded = decode_batch(_listing(uris), max_side=4096)
    fp32 = detector(decoded).to_pylist()
    fp16 = Detector(SMALL, str(small_weights), 0.5, run_id="unit", precision="fp16")(decoded)
    assert fp16.schema == STAGED_SCHEMA  # float32 boxes and scores whatever the precision
    share, total = matched_share(fp32, fp16.to_pylist(), min_iou=0.9)
    print(f"fp16 found {share:.1%} of {total} fp32 boxes at IoU >= 0.9")
    assert total > 50 and share >= 0.85


def test_gpu_decode_rows_equal_cpu_decode_rows(detector, sample_dir, tmp_path):
    """``gpu_decode``: decode tasks ship plain JPEGs encoded and the actor decodes them
    (``decode_jpeg`` on the actor's device: nvJPEG on a GPU, libjpeg here). Whatever is not a
    plain JPEG (PNG, EXIF-rotated, over ``max_side``, corrupt) is decoded on the CPU as before,
    and every row equals the CPU-decode path's row."""
    from PIL import Image

    jpgs = sorted(sample_dir.glob("*.jpg"))[:3]
    photo = Image.open(jpgs[0])
    photo.save(tmp_path / "as.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: nvJPEG would ignore it
    photo.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    (tmp_path / "truncated.jpg").write_bytes(jpgs[1].read_bytes()[:2000])
    uris = [str(p) for p in jpgs] + [str(tmp_path / n) for n in
                                     ("as.png", "rotated.jpg", "truncated.jpg")]
    shipped = decode_batch(_listing(uris), max_side=4096, ship_jpeg=True).to_pylist()
    assert [r["encoded"] is not None for r in shipped] == [True] * 3 + [False, False, True]
    assert all(r["pixels"] is None for r in shipped[:3]) and shipped[4]["pixels"] is not None
    assert shipped[4]["width"] == photo.height  # rotated on the CPU, as EXIF says
    small = decode_batch(_listing(uris[:1]), max_side=200, ship_jpeg=True).to_pylist()[0]
    assert small["encoded"] is None and max(small["width"], small["height"]) == 200

    via_cpu = detector(decode_batch(_listing(uris), max_side=4096)).to_pylist()
    via_actor = detector(decode_batch(_listing(uris), max_side=4096, ship_jpeg=True)).to_pylist()
    assert via_actor == via_cpu
    assert sum(len(r["boxes"]) for r in via_actor[:3]) > 0


def test_gpu_decode_batch_with_a_corrupt_jpeg_falls_back_per_image(detector, sample_dir):
    """One undecodable JPEG in a batch: the others still decode, it gets the CPU decoder's
    reason."""
    good = (sample_dir / "chelsea.jpg").read_bytes()
    out = detector.decode_jpegs([good, b"\xff\xd8\xff" + b"\x00" * 64, good])
    assert [type(x).__name__ for x in out] == ["Tensor", "str", "Tensor"]
    assert out[1].startswith("cannot decode") and out[0].shape == (3, 300, 451)


def test_model_input_shape_follows_torchvision_transform(detector):
    """The key images are batched by: the padded shape inside the model, checked against the
    model's own transform on real tensors."""
    import torch

    from detectflow.predictor import model_input_shape

    transform = detector.model.transform
    for h, w in [(480, 640), (375, 500), (300, 451), (1000, 333), (17, 4000), (640, 640)]:
        batched = transform([torch.rand(3, h, w)])[0].tensors
        assert model_input_shape(h, w, transform) == tuple(batched.shape[-2:]), (h, w)
    assert model_input_shape(375, 500, transform) == model_input_shape(480, 640, transform)
    assert model_input_shape(5, 7, None) == (5, 7)


def test_images_of_one_aspect_ratio_batch_together_with_per_image_results(detector, sample_dir):
    """A 451x300 photo and its 902x600 double share one model input shape: one forward call,
    and each gets the boxes it gets alone."""
    import torch
    from torchvision.transforms.v2 import functional as F

    from detectflow.imaging import decode

    small = torch.from_numpy(decode((sample_dir / "chelsea.jpg").read_bytes()))
    large = F.resize(small, [600, 902], antialias=True)
    calls = []
    forward = detector._forward
    detector._forward = lambda images: calls.append(len(images)) or forward(images)
    try:
        together = detector.predict([small, large])
    finally:
        del detector._forward
    assert calls == [2]
    for image, out in zip([small, large], together):
        alone = detector.predict([image])[0]
        assert torch.equal(alone["labels"], out["labels"])
        assert torch.allclose(alone["boxes"], out["boxes"], atol=1e-2)
