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
