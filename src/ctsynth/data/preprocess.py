"""The one preprocessing path, shared by `prepare`, classifier training, ONNX export and serving.

    bytes (PNG / JPEG / DICOM, any mode)
      -> decode_image:      grey float image in [0, 1] + what the file was (size, mode);
                            DICOM through ctsynth.data.dicom (compressed syntaxes, colour, windows)
      -> square_resize:     quantise to uint8, pad to square with black (air), resize to N x N
      -> to_model_input:    float32 1 x N x N in [-1, 1]  (the ONNX model's `image` input)

`prepare` stores the uint8 result as PNG; everything downstream reads those PNGs back through
`preprocess_bytes`, which is idempotent on them, so a raw file and its prepared PNG give the same
model input bit for bit (tested).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# A lung window shows parenchyma, vessels and masses; bone and soft tissue saturate.
LUNG_WINDOW_CENTER_HU = -600.0
LUNG_WINDOW_WIDTH_HU = 1500.0
DEFAULT_MAX_PIXELS = 40_000_000  # a 6000 x 6000 scan is plausible; a 100k x 100k PNG is a bomb
DICOM_MAGIC_OFFSET = 128


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message says why, for a person to read."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32, H x W, in [0, 1]
    width: int
    height: int
    mode: str  # PIL mode, or "DICOM"
    format: str  # "PNG", "JPEG", "DICOM", ...


def is_dicom(data: bytes) -> bool:
    return len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def lung_window(hu: np.ndarray, center: float = LUNG_WINDOW_CENTER_HU, width: float = LUNG_WINDOW_WIDTH_HU) -> np.ndarray:
    low = center - width / 2.0
    return np.clip((hu.astype(np.float32) - low) / width, 0.0, 1.0)


def _pil_to_grey(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 grey in [0, 1]; transparency is composited onto black (air)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if array.max() > 255 else 255.0
        return np.clip(array / top, 0.0, 1.0)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        return (array - low) / (high - low) if high > low else np.zeros_like(array)
    if mode == "P":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    if image.mode in ("LA", "RGBA", "PA"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
    if image.mode != "L":
        image = image.convert("RGB").convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


def header_pixels(data: bytes) -> int | None:
    """The pixel count a PNG or JPEG header promises, read without decoding (tens of microseconds);
    None for DICOM and anything unreadable. Callers use it to decide where to decode."""
    if not data or is_dicom(data):
        return None
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # not an image, or PIL's bomb guard: decode_image says why
        return None
    return width * height


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, dicom_window: str = "lung") -> DecodedImage:
    """Decode PNG, JPEG (any mode, 8 or 16 bit) or a single-slice DICOM into grey [0, 1].
    `dicom_window`: "lung" (CT in the lung window) or "header" (the DICOM header's own window)."""
    if not data:
        raise ImageDecodeError("empty file: no bytes received")
    if is_dicom(data):
        from ctsynth.data.dicom import decode_dicom  # imports this module: loaded on first use

        return decode_dicom(data, max_pixels, window=dicom_window)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard, past 2 x Image.MAX_IMAGE_PIXELS
        raise ImageDecodeError(f"image is far over the pixel limit of {max_pixels}: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError(
            f"not a PNG, JPEG or DICOM image ({exc.__class__.__name__}: {exc}); a DICOM file starts with a 128-byte preamble and 'DICM'"
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    n_frames = getattr(image, "n_frames", 1)
    if n_frames > 1 or getattr(image, "is_animated", False):
        raise ImageDecodeError(f"image is animated or multi-frame ({n_frames} frames); send one still slice")
    if image.format not in ("PNG", "JPEG", "MPO"):
        raise ImageDecodeError(f"unsupported image format {image.format}; send PNG, JPEG or DICOM")
    try:
        # PIL's default (LOAD_TRUNCATED_IMAGES False) makes a cut-off file fail here.
        image.load()
    except Exception as exc:
        raise ImageDecodeError(f"image data is truncated or corrupt ({exc.__class__.__name__}: {exc})") from exc
    mode = image.mode
    grey = _pil_to_grey(image)
    return DecodedImage(grey, width=width, height=height, mode=mode, format=str(image.format))


def square_resize(grey: np.ndarray, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Pad to a centred square with black, then resize to resolution x resolution; uint8 out.

    Memory is bounded by what is allocated, not by width x height: the square canvas is uint8 (the
    quantisation commutes with black padding, so this is the same result as padding in float), and
    an image so elongated that its square would pass `max_pixels` (39000 x 1000 -> 1.5 G pixels) is
    first scaled down, keeping its aspect, until the square fits.
    """
    height, width = grey.shape
    scaled = grey.astype(np.float32, copy=False) * np.float32(255.0)
    np.rint(scaled, out=scaled)  # in place: one float32 temporary, not three
    np.clip(scaled, 0, 255, out=scaled)
    as_uint8 = scaled.astype(np.uint8)
    del scaled
    max_side = math.isqrt(max_pixels)
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        as_uint8 = np.asarray(Image.fromarray(as_uint8, mode="L").resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)
    side = max(height, width)
    canvas = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = as_uint8
    if side == resolution:
        return canvas
    resized = Image.fromarray(canvas, mode="L").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 H x W -> float32 1 x H x W in [-1, 1] (the GAN's and the classifier's scale)."""
    return (pixels.astype(np.float32) / 127.5 - 1.0)[None]


def preprocess_bytes(data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS, dicom_window: str = "lung") -> np.ndarray:
    """Any supported file's bytes -> the model input (float32 1 x N x N). THE preprocessing function."""
    decoded = decode_image(data, max_pixels=max_pixels, dicom_window=dicom_window)
    return to_model_input(square_resize(decoded.pixels, resolution, max_pixels=max_pixels))
