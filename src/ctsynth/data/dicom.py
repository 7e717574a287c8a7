"""DICOM files as archives write them -> the grey [0, 1] image that ctsynth.data.preprocess pads and resizes.

    bytes (preamble + "DICM" + file meta + data set)
      -> read_dataset:   the header, its pixel count checked against the limit before any pixel is
                         decoded; a deflated data set is inflated once, with an output cap
      -> pixels:         decoded by pydicom (native, RLE) or GDCM (JPEG Lossless, JPEG-LS, JPEG 2000,
                         JPEG baseline/extended), then rescaled and windowed:
                           CT             Hounsfield units (RescaleSlope/Intercept), lung window, or
                                          the header's own window when `window="header"`
                           other grey     the header's window when present, else the stored range
                           RGB / YBR      grey as an RGB PNG becomes grey (PIL's "L" weights);
                                          PALETTE COLOR through its palette first
                           MONOCHROME1    inverted, so that bright means dense as in MONOCHROME2

Every way a header can be wrong ends in ImageDecodeError with a reason, never another exception:
a corrupt upload is a 400 in the service and an "unreadable" row in `prepare`.
"""

from __future__ import annotations

import io
import zlib
from typing import Literal

import numpy as np
from PIL import Image

from ctsynth.data.preprocess import DecodedImage, ImageDecodeError, lung_window

DicomWindow = Literal["lung", "header"]
DICOM_WINDOWS = ("lung", "header")
# A deflated data set may inflate to at most this many bytes per allowed pixel (3 samples of 16 bits)
# plus room for the header; past that it is refused, whatever its header claims.
INFLATED_BYTES_PER_PIXEL = 6
INFLATED_HEADER_ALLOWANCE = 1 << 20
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def inflate_capped(deflated: bytes, cap: int) -> bytes:
    """Raw-deflate `deflated`, producing at most `cap` bytes; ImageDecodeError past the cap."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated, cap)
    except zlib.error as exc:
        raise ImageDecodeError(f"DICOM deflated data set is corrupt: {exc}") from exc
    if inflater.unconsumed_tail:
        raise ImageDecodeError(f"DICOM deflated data set inflates to more than {cap} bytes (the cap for the pixel limit)")
    return inflated


def _inflate_once(data: bytes, max_pixels: int) -> bytes:
    """A Deflated Explicit VR Little Endian file rewritten as the same data set, inflated, in Explicit
    VR Little Endian: pydicom would inflate it itself, without any cap."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    stream = io.BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_SYNTAX:
        return data
    body = inflate_capped(data[stream.tell() :], max_pixels * INFLATED_BYTES_PER_PIXEL + INFLATED_HEADER_ALLOWANCE)
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return bytes(out.getvalue()) + body


def _number(dataset, keyword: str, default: float) -> float:
    """A numeric header value, the first of several; ImageDecodeError when it is not a number."""
    try:
        value = dataset.get(keyword, None)
        value = getattr(value, "value", value)
    except Exception as exc:  # pydicom parses values lazily: a broken element fails here
        raise ImageDecodeError(f"DICOM header element {keyword} could not be read ({exc.__class__.__name__}: {exc})") from exc
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return default
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"DICOM header value {keyword}={value!r} is not a number") from exc


def read_dataset(data: bytes, max_pixels: int):
    """The parsed data set, its pixels not yet decoded, after the checks on its header."""
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(_inflate_once(data, max_pixels)))
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types for broken headers
        raise ImageDecodeError(f"DICOM file could not be read ({exc.__class__.__name__}: {exc})") from exc
    try:
        has_pixels = "PixelData" in dataset or "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset
    except Exception as exc:
        raise ImageDecodeError(f"DICOM header could not be read ({exc.__class__.__name__}: {exc})") from exc
    if not has_pixels:
        raise ImageDecodeError("DICOM file has no pixel data (PixelData element missing)")
    frames = int(_number(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(f"DICOM file has {frames} frames; send one slice per request")
    # From the header, before decoding: compressed pixel data can expand to far more than its bytes.
    rows, columns = int(_number(dataset, "Rows", 0)), int(_number(dataset, "Columns", 0))
    samples = int(_number(dataset, "SamplesPerPixel", 1))
    if rows <= 0 or columns <= 0:
        raise ImageDecodeError(f"DICOM header gives an image of {columns}x{rows} pixels")
    if rows * columns > max_pixels:
        raise ImageDecodeError(f"image has {columns}x{rows} = {rows * columns} pixels; the limit is {max_pixels}")
    if samples not in (1, 3):
        raise ImageDecodeError(f"DICOM image has {samples} samples per pixel; expected 1 (grey) or 3 (colour)")
    return dataset


def _decode_pixels(dataset) -> np.ndarray:
    try:
        return dataset.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # no decoder for the transfer syntax, or broken pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ImageDecodeError(f"DICOM pixel data ({name}) could not be decoded ({exc.__class__.__name__}: {exc})") from exc


def _colour_to_grey(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 -> grey in [0, 1], exactly as an RGB PNG of the same pixels becomes grey."""
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.float32) / 255.0
    top = float(2 ** int(rgb.dtype.itemsize * 8) - 1) if np.issubdtype(rgb.dtype, np.integer) else max(float(rgb.max()), 1e-12)
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip((rgb.astype(np.float32) @ weights) / top, 0.0, 1.0)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return lung_window(values, center=center, width=max(width, 1.0))


def decode_dicom(data: bytes, max_pixels: int, window: DicomWindow = "lung") -> DecodedImage:
    """A single-slice DICOM file -> grey [0, 1] (see the module docstring for the intensity rules)."""
    if window not in DICOM_WINDOWS:
        raise ValueError(f"window must be one of {DICOM_WINDOWS}, got {window!r}")
    dataset = read_dataset(data, max_pixels)
    raw = _decode_pixels(dataset)
    try:
        photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip().upper()
        modality = str(dataset.get("Modality", "") or "").strip().upper()
    except Exception as exc:
        raise ImageDecodeError(f"DICOM header could not be read ({exc.__class__.__name__}: {exc})") from exc
    if raw.ndim == 2 and photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            raw = apply_color_lut(raw, dataset)  # 16-bit RGB from the header's palette
        except Exception as exc:
            raise ImageDecodeError(f"DICOM palette could not be applied ({exc.__class__.__name__}: {exc})") from exc
    if raw.ndim == 3 and raw.shape[-1] == 3:
        grey = _colour_to_grey(raw)
    elif raw.ndim == 2:
        stored = raw.astype(np.float32)
        slope, intercept = _number(dataset, "RescaleSlope", 1.0) or 1.0, _number(dataset, "RescaleIntercept", 0.0)
        values = stored * slope + intercept
        center, width = _number(dataset, "WindowCenter", np.nan), _number(dataset, "WindowWidth", np.nan)
        has_window = np.isfinite(center) and np.isfinite(width) and width > 0
        if modality == "CT" and not (window == "header" and has_window):
            grey = lung_window(values)  # Hounsfield units
        elif has_window:
            grey = _window(values, center, width)
        else:
            low, high = float(values.min()), float(values.max())
            grey = (values - low) / (high - low) if high > low else np.zeros_like(values)
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey
    else:
        raise ImageDecodeError(f"DICOM pixel data has shape {raw.shape}; expected one 2-D slice")
    height, width_px = grey.shape
    return DecodedImage(grey.astype(np.float32, copy=False), width=width_px, height=height, mode="DICOM", format="DICOM")
