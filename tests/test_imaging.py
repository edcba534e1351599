"""Pure transforms: decoding, orientation, size bounding, box rescaling."""

import io

import numpy as np
import pytest
from PIL import Image

from detectflow import imaging


def _jpeg(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_jpeg_gives_uint8_rgb_chw():
    data = _jpeg(np.full((30, 40, 3), 200, np.uint8))
    image = imaging.decode(data)
    assert image.dtype == np.uint8 and tuple(image.shape) == (3, 30, 40)
    assert image.flags["C_CONTIGUOUS"] and abs(int(image.mean()) - 200) <= 2


def test_decode_applies_exif_orientation():
    # 30 rows x 40 columns stored; orientation 6 means "rotate 90° clockwise to display".
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(np.zeros((30, 40, 3), np.uint8), exif=exif.tobytes())
    assert tuple(imaging.decode(data).shape) == (3, 40, 30)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_decode_converts_modes_to_rgb(mode):
    image = Image.new("RGB", (16, 12), (10, 120, 240)).convert(mode) if mode != "I;16" else (
        Image.fromarray(np.full((12, 16), 40000, np.uint16))
    )
    data = _png(image) if mode != "CMYK" else _jpeg(np.asarray(Image.new("RGB", (16, 12))))
    if mode == "CMYK":
        buf = io.BytesIO()
        Image.new("CMYK", (16, 12), (0, 50, 100, 0)).save(buf, format="JPEG")
        data = buf.getvalue()
    decoded = imaging.decode(data)
    assert decoded.dtype == np.uint8 and tuple(decoded.shape) == (3, 12, 16)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"this is text, not a JPEG", "cannot decode"),
     (_jpeg(np.zeros((64, 64, 3), np.uint8))[:40], "cannot decode")],
)
def test_decode_rejects_bad_bytes_with_short_reason(data, reason):
    with pytest.raises(imaging.DecodeError, match=reason):
        imaging.decode(data)


def test_bounded_size_keeps_aspect_and_never_upscales():
    assert imaging.bounded_size(300, 400, 1000) == (300, 400)
    assert imaging.bounded_size(9000, 12000, 4000) == (3000, 4000)
    assert imaging.bounded_size(1, 5000, 100) == (1, 100)


def test_limit_size_only_touches_large_images():
    small = Image.new("RGB", (30, 20))
    assert imaging.limit_size(small, 30) is small
    big = imaging.limit_size(Image.new("RGB", (300, 200), (200, 10, 10)), 30)
    assert big.size == (30, 20) and tuple(imaging.to_chw(big)[:, 10, 15]) == (200, 10, 10)


def test_rescale_boxes_maps_back_to_original_pixels_and_clips():
    boxes = np.array([[10, 5, 20, 15], [0, 0, 30, 20]], np.float32)
    out = imaging.rescale_boxes(boxes, (20, 30), (200, 300))
    np.testing.assert_allclose(out, [[100, 50, 200, 150], [0, 0, 300, 200]])
    clipped = imaging.rescale_boxes(np.array([[-3, -1, 35, 25]], np.float32), (20, 30), (20, 30))
    np.testing.assert_allclose(clipped, [[0, 0, 30, 20]])
    assert imaging.rescale_boxes(np.zeros((0, 4)), (5, 5), (10, 10)).shape == (0, 4)


def test_drawn_sample_is_the_oriented_original_with_red_boxes(tmp_path):
    from detectflow.sample import draw

    # 60 rows x 100 columns stored, EXIF orientation 6: displayed (and detected) as 100 x 60.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(np.full((60, 100, 3), 128, np.uint8), exif=exif.tobytes()))
    row = {"image_uri": str(path), "boxes": [[10.0, 20.0, 50.0, 90.0]], "scores": [0.87],
           "label_names": ["cat"]}
    picture = np.asarray(draw(row))
    assert picture.shape == (100, 60, 3)  # H x W as the pipeline decodes it
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    assert red[20:91, 10].all() and red[90, 10:51].all()  # the box's left and bottom edges
    assert not red[:, 55:].any()  # nothing right of the box
    assert abs(int(picture[60, 30].mean()) - 128) <= 3  # inside the box: the photo as it was
    png = imaging.encode_png(draw({**row, "boxes": []}))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))),
                          np.asarray(imaging.open_rgb(path.read_bytes())))
    thumb = Image.open(io.BytesIO(imaging.thumbnail_jpeg(draw(row), max_side=50)))
    assert thumb.format == "JPEG" and thumb.size == (30, 50)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) and holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_images_up_to_a_gigapixel_are_read_larger_ones_refused():
    # 200 MP is past Pillow's own bomb limit (179 MP) but ours reads it: what fails is the
    # missing pixel data, not the size.
    with pytest.raises(imaging.DecodeError) as read:
        imaging.decode(_png_header_only(20_000, 10_000))
    assert "DecompressionBomb" not in str(read.value)
    with pytest.raises(imaging.DecodeError, match="DecompressionBombError"):
        imaging.decode(_png_header_only(40_000, 30_000))


# A large photo-like JPEG: colour gradients (never white) and one white rectangle whose edges
# locate boxes. 3000 rows x 4000 columns stored; the rectangle is rows 600:1200, cols 2000:3000.
BIG_HW, RECT = (3000, 4000), (2000, 600, 3000, 1200)  # RECT as a box: x1, y1, x2, y2


@pytest.fixture(scope="module")
def big_jpegs() -> dict[str, bytes]:
    h, w = BIG_HW
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    pixels[..., 1] = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    pixels[..., 2] = 128
    x1, y1, x2, y2 = RECT
    pixels[y1:y2, x1:x2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: 4000 rows x 3000 columns
    return {"plain": _jpeg(pixels, quality=90),
            "rotated": _jpeg(pixels, quality=90, exif=exif.tobytes())}


def _white_box(image: np.ndarray) -> np.ndarray:
    """The white rectangle's xyxy box in an (H, W, 3) image."""
    rows, cols = np.nonzero((image > 230).all(axis=-1))
    return np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float32)


def test_large_jpeg_is_decoded_reduced_by_libjpeg(big_jpegs):
    image, full_hw = imaging.open_bounded(big_jpegs["plain"], 512)
    assert full_hw == BIG_HW and image.size == (512, 384)
    # The pixels are those of libjpeg's 1/4-scale decode, downscaled: the full image never was.
    drafted = Image.open(io.BytesIO(big_jpegs["plain"]))
    drafted.draft(None, (512, 384))
    assert drafted.size == (1000, 750)
    expected = drafted.convert("RGB").resize((512, 384), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # ... and they match a full decode then downscale, up to rounding.
    full = imaging.limit_size(imaging.open_rgb(big_jpegs["plain"]), 512)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(full, np.int16)).mean() < 1.0


def test_decode_one_gives_full_oriented_size_and_boxes_map_back(tmp_path, big_jpegs):
    from detectflow.predictor import decode_one

    for name, data in big_jpegs.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        row = decode_one(str(path), 512)
        assert row["error"] is None
        small_hw, full_hw = (row["height"], row["width"]), (row["orig_height"], row["orig_width"])
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(3, *small_hw).transpose(1, 2, 0)
        if name == "plain":
            assert small_hw == (384, 512) and full_hw == BIG_HW
            truth = np.array([RECT], np.float32)
        else:  # stored rows become displayed columns, counted from the right
            assert small_hw == (512, 384) and full_hw == BIG_HW[::-1]
            x1, y1, x2, y2 = RECT
            truth = np.array([[BIG_HW[0] - y2, x1, BIG_HW[0] - y1, x2]], np.float32)
        # A box found in the decoded pixels lands on the rectangle in original pixels, within
        # the ~8 original pixels one decoded pixel covers.
        found = imaging.rescale_boxes(_white_box(pixels), small_hw, full_hw)
        np.testing.assert_allclose(found, truth, atol=12)


def test_large_png_is_downscaled_before_rotation_and_matches_the_full_path():
    exif = Image.Exif()
    exif[0x0112] = 8
    pixels = np.zeros((900, 1200, 3), np.uint8)
    pixels[100:300, 600:1000] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif.tobytes())
    image, full_hw = imaging.open_bounded(buf.getvalue(), 300)
    assert full_hw == (1200, 900) and image.size == (225, 300)
    full = imaging.limit_size(imaging.open_rgb(buf.getvalue()), 300)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(full, np.int16)).max() <= 2


def test_drawn_sample_of_a_large_image_is_bounded_with_boxes_scaled(tmp_path, big_jpegs):
    from detectflow.sample import SAMPLE_MAX_SIDE, draw

    path = tmp_path / "big.jpg"
    path.write_bytes(big_jpegs["plain"])
    row = {"image_uri": str(path), "boxes": [[float(v) for v in RECT]], "scores": [0.9],
           "label_names": ["kite"]}
    picture = np.asarray(draw(row))
    assert max(picture.shape[:2]) == SAMPLE_MAX_SIDE and picture.shape == (1536, 2048, 3)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    x1, y1, x2, y2 = (round(v * 2048 / 4000) for v in RECT)  # 1024, 307, 1536, 614
    assert red[y1 + 5 : y2 - 5, x1].all() and red[y2, x1 + 5 : x2 - 5].all()
    assert not red[:, x2 + 10 :].any() and not red[: y1 - 10].any()
