"""Pure image transforms: decode, orientation, colour mode, bounded size, box rescaling.

Decoded images stay uint8 until they reach the model: shipping uint8 through Ray's object store
costs a quarter of the float32 tensors the reference recipe ships (twice).

Decoding is Pillow's (libjpeg-turbo, libpng, libwebp...) into numpy, without torch: the decode
tasks and the Prefect task workers never import torch, which costs seconds of CPU and hundreds
of MiB per process (benchmarks/RESULTS.md, Start-up); the pixels are the same as torchvision's
``decode_image``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage


MAX_PIXELS = 1_000_000_000  # larger images are recorded as failed rows, not decoded


class DecodeError(ValueError):
    """The bytes are not an image we can read; the message is the short reason stored per row."""


# EXIF orientation → the transpose that displays the image upright (as ImageOps.exif_transpose).
ORIENTATIONS = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def open_rgb(data: bytes) -> PILImage.Image:
    """Bytes → an RGB Pillow image at full size, EXIF orientation applied, pixels loaded.

    16-bit greys are scaled to 8 bits (``v * 255 / 65535``, as torchvision's ``to_dtype``);
    32-bit integer images by their maximum. Anything Pillow cannot read raises
    :class:`DecodeError` with a short reason.
    """
    return open_bounded(data, None)[0]


def open_bounded(data: bytes, max_side: int | None) -> tuple[PILImage.Image, tuple[int, int]]:
    """Bytes → (RGB image, (H, W) of the full image), as :func:`open_rgb` but with the longer
    side downscaled to at most ``max_side`` (``bounded_size`` of the full size, exactly).

    A giant image is never held at full size when the format lets us avoid it: a JPEG is
    decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``draft``, the largest reduction that keeps
    ``max_side``), and RGB or grey pixels are downscaled before they are rotated or converted,
    which would each copy the full image. The full size is the oriented one, for boxes.
    """
    from PIL import Image

    if not data:
        raise DecodeError("empty file")
    # Pillow refuses images over 2 x 89 MP as possible decompression bombs; scans and panoramas
    # get there. Read up to 1 gigapixel (3 GiB decoded), as torchvision's decoder did before it.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS // 2:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # before ``draft``, which changes it
            target = None
            if max_side is not None:
                target_h, target_w = bounded_size(height, width, max_side)
                target = (target_w, target_h)
                if target != img.size:  # JPEG and MPO; a no-op for formats without it
                    img.draft(None, target)  # each side stays >= its target
            img.load()
            transpose = ORIENTATIONS.get(img.getexif().get(EXIF_ORIENTATION, 1))
            if target and img.size != target and img.mode in ("RGB", "L"):
                img = img.resize(target, Image.Resampling.BILINEAR)
            if transpose:
                img = img.transpose(Image.Transpose[transpose])
                if transpose in ("TRANSPOSE", "ROTATE_270", "TRANSVERSE", "ROTATE_90"):
                    width, height = height, width  # the full size as displayed
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray(np.round(arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
            img = img if img.mode == "RGB" else img.convert("RGB")
            if max_side is not None:
                img = fit(img, bounded_size(height, width, max_side))
            return img, (height, width)
    except Exception as exc:
        name = type(exc).__name__
        reason = str(exc).split(" <_io.BytesIO")[0]  # no object addresses in stored reasons
        raise DecodeError(f"cannot decode image: {name}: {reason}"[:300]) from None


def to_chw(image: PILImage.Image) -> np.ndarray:
    """An RGB Pillow image → uint8 (3, H, W), the model's layout, as a strided view of one copy
    of the pixels (``tobytes()`` writes it out in C order without a second intermediate)."""
    return np.asarray(image).transpose(2, 0, 1)


def decode(data: bytes) -> np.ndarray:
    """Bytes → uint8 RGB array (3, H, W), C-contiguous, EXIF orientation applied
    (see :func:`open_rgb`, which always gives 3 channels)."""
    return np.ascontiguousarray(to_chw(open_rgb(data)))


JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def plain_jpeg_size(data: bytes, max_side: int) -> tuple[int, int] | None:
    """(H, W) when a device decoder can take these bytes as they are, else None.

    That is a baseline or progressive JPEG in RGB or greyscale (not CMYK), with no EXIF rotation
    (nvJPEG ignores EXIF) and no side over ``max_side`` (no resize needed before the model). Only
    the header is parsed; anything else goes through :func:`decode` on the CPU, so every image
    ends the same whichever side decodes it.
    """
    if not data.startswith(JPEG_MAGIC):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
            width, height = img.size
    except Exception:
        return None  # let the CPU decoder produce the reason
    if max(height, width) > max_side:
        return None
    return height, width


def bounded_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(H, W) scaled down so the longer side is at most ``max_side``; never scaled up."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def limit_size(image: PILImage.Image, max_side: int) -> PILImage.Image:
    """Downscale (antialiased bilinear) huge images on the CPU so an actor never receives a
    giant one.

    Images within the bound pass untouched, so results on ordinary photos equal a direct call of
    the model (which does its own resize).
    """
    return fit(image, bounded_size(image.height, image.width, max_side))


def fit(image: PILImage.Image, size_hw: tuple[int, int]) -> PILImage.Image:
    """``image`` resized (antialiased bilinear) to (H, W) ``size_hw``, or as it is if it has it."""
    from PIL import Image

    if (image.height, image.width) == tuple(size_hw):
        return image
    return image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)


def rescale_boxes(
    boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> np.ndarray:
    """Map xyxy boxes from an image of size ``from_hw`` to the same image at ``to_hw``, clipped."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if tuple(from_hw) == tuple(to_hw):
        out = boxes.copy()
    else:
        sy = to_hw[0] / from_hw[0]
        sx = to_hw[1] / from_hw[1]
        out = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, to_hw[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, to_hw[0])
    return out


def encode_png(image: PILImage.Image) -> bytes:
    """Lossless, at zlib level 1: several times faster than Pillow's default level for a few
    percent more bytes, and the samples sit on the path between detect and publish."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def thumbnail_jpeg(image: PILImage.Image, max_side: int = 320, quality: int = 80) -> bytes:
    """A small JPEG for embedding in Prefect artifacts (they live in the Prefect database)."""
    from PIL import Image

    new_h, new_w = bounded_size(image.height, image.width, max_side)
    small = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality)
    return out.getvalue()
