"""Pure image transforms: decode, orientation, colour mode, bounded size, box rescaling.

Decoded images stay uint8 until they reach the model: shipping uint8 through Ray's object store
costs a quarter of the float32 tensors the reference recipe ships (twice).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F


class DecodeError(ValueError):
    """The bytes are not an image we can read; the message is the short reason stored per row."""


def _decode_with_pil(data: bytes) -> torch.Tensor:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32)
                arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
                img = Image.fromarray(arr)
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}"[:300]) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode(data: bytes) -> torch.Tensor:
    """Bytes → uint8 RGB tensor (3, H, W), EXIF orientation applied.

    torchvision's native decoders are fast; Pillow covers what they reject (CMYK, 16-bit, odd
    palettes). Anything neither can read raises :class:`DecodeError` with a short reason.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if image.dtype != torch.uint8:
            image = F.to_dtype(image, torch.uint8, scale=True)
    except Exception:
        image = _decode_with_pil(data)
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise DecodeError(f"unexpected decoded shape {tuple(image.shape)}")
    return image


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


def limit_size(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """Downscale (antialiased) huge images on the CPU so an actor never receives a giant one.

    Images within the bound pass untouched, so results on ordinary photos equal a direct call of
    the model (which does its own resize).
    """
    height, width = image.shape[-2:]
    new_h, new_w = bounded_size(height, width, max_side)
    if (new_h, new_w) == (height, width):
        return image
    return F.resize(image, [new_h, new_w], antialias=True)


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


def encode_png(image: torch.Tensor) -> bytes:
    from torchvision.io import encode_png as _encode

    return _encode(image.contiguous()).numpy().tobytes()


def thumbnail_jpeg(image: torch.Tensor, max_side: int = 320, quality: int = 80) -> bytes:
    """A small JPEG for embedding in Prefect artifacts (they live in the Prefect database)."""
    from torchvision.io import encode_jpeg

    h, w = image.shape[-2:]
    new_h, new_w = bounded_size(h, w, max_side)
    small = F.resize(image, [new_h, new_w], antialias=True) if (new_h, new_w) != (h, w) else image
    return encode_jpeg(small.contiguous(), quality=quality).numpy().tobytes()
