"""The one preprocessing path: every mode and format in, one grey square out; bad bytes -> clear errors."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from ctsynth.data.preprocess import ImageDecodeError, decode_image, lung_window, preprocess_bytes, square_resize


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int = 40, height: int = 24) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def test_grey_png_decodes_exactly():
    grey = _gradient()
    decoded = decode_image(_encode(Image.fromarray(grey, mode="L")))
    assert (decoded.width, decoded.height, decoded.mode, decoded.format) == (40, 24, "L", "PNG")
    np.testing.assert_array_equal(decoded.pixels, grey / np.float32(255.0))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_and_alpha_modes_of_a_grey_image_give_the_same_grey(mode):
    grey = Image.fromarray(_gradient(), mode="L")
    converted = grey.convert(mode)
    decoded = decode_image(_encode(converted))
    assert decoded.mode == mode
    np.testing.assert_allclose(decoded.pixels, np.asarray(grey) / 255.0, atol=1.5 / 255)


def test_transparent_pixels_become_air():
    la = Image.fromarray(np.stack([np.full((8, 8), 200, np.uint8), np.zeros((8, 8), np.uint8)], -1), mode="LA")
    assert decode_image(_encode(la)).pixels.max() == 0.0


def test_sixteen_bit_png_keeps_its_range():
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    image = Image.fromarray(values).convert("I;16") if Image.fromarray(values).mode != "I;16" else Image.fromarray(values)
    decoded = decode_image(_encode(image))
    assert decoded.mode.startswith("I")
    np.testing.assert_allclose(decoded.pixels, values / 65535.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes(mode):
    grey = Image.fromarray(_gradient(64, 48), mode="L")
    decoded = decode_image(_encode(grey.convert(mode), "JPEG", quality=95))
    assert (decoded.width, decoded.height, decoded.format) == (64, 48, "JPEG")
    assert decoded.mode == mode
    # CMYK JPEGs are stored inverted by some writers; the grey ramp must still be a ramp.
    column_means = decoded.pixels.mean(axis=0)
    assert abs(np.corrcoef(column_means, np.arange(64))[0, 1]) > 0.98


def test_dicom_ct_slice_is_rescaled_to_hu_and_lung_windowed():
    path = get_testdata_file("CT_small.dcm")
    data = open(path, "rb").read()
    dataset = pydicom.dcmread(path)
    expected_hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    decoded = decode_image(data)
    assert (decoded.mode, decoded.format, decoded.width, decoded.height) == ("DICOM", "DICOM", 128, 128)
    np.testing.assert_array_equal(decoded.pixels, lung_window(expected_hu))
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 1.0


def _truncated_png() -> bytes:
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), mode="L"))
    return data[: len(data) // 2]


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8), mode="L") for v in (0, 128, 255)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _multipage_tiff() -> bytes:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8), mode="L") for v in (0, 255)]
    return _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"", "empty file"),
        (lambda: b"\x00\x01garbage bytes that are no image" * 10, "not a PNG, JPEG or DICOM"),
        (_truncated_png, "truncated or corrupt"),
        (_animated_gif, "multi-frame"),
        (_multipage_tiff, "multi-frame"),
        (lambda: _encode(Image.new("L", (8, 8)), "BMP"), "unsupported image format BMP"),
    ],
    ids=["empty", "corrupt", "truncated_png", "animated_gif", "multipage_tiff", "bmp"],
)
def test_bad_bytes_raise_a_clear_error(make, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(make())


def test_square_resize_pads_with_black_and_keeps_uint8():
    wide = np.ones((10, 40), np.float32)
    square = square_resize(wide, 40)
    assert square.shape == (40, 40) and square.dtype == np.uint8
    assert square[:15].max() == 0 and square[15:25].min() == 255 and square[25:].max() == 0


@pytest.mark.parametrize("resolution", [32, 64])
def test_raw_file_and_its_prepared_png_give_the_same_model_input(resolution):
    sources = [
        _encode(Image.fromarray(_gradient(300, 180), mode="L").convert("RGB")),
        _encode(Image.fromarray(_gradient(200, 260), mode="L"), "JPEG", quality=90),
        open(get_testdata_file("CT_small.dcm"), "rb").read(),
    ]
    for data in sources:
        prepared_png = _encode(Image.fromarray(square_resize(decode_image(data).pixels, resolution), mode="L"))
        from_raw = preprocess_bytes(data, resolution)
        assert from_raw.shape == (1, resolution, resolution) and from_raw.dtype == np.float32
        np.testing.assert_array_equal(from_raw, preprocess_bytes(prepared_png, resolution))


def test_dicom_pixel_limit_is_checked_from_the_header_before_decoding():
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        data = f.read()
    with pytest.raises(ImageDecodeError, match="128x128 = 16384 pixels; the limit is 100"):
        decode_image(data, max_pixels=100)


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR promising width x height pixels, and almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        # over our limit but under PIL's own guard: our check, from the header
        (3000, 2000, "image has 3000x2000 = 6000000 pixels; the limit is 1000000"),
        # far over PIL's guard (2 x Image.MAX_IMAGE_PIXELS): PIL refuses to open it, we say so
        (100_000, 100_000, "far over the pixel limit of 1000000: .*10000000000 pixels"),
    ],
    ids=["over_our_limit", "decompression_bomb"],
)
def test_pixel_limit_is_checked_before_decoding(width, height, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(_png_header(width, height), max_pixels=1_000_000)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's process-wide guard is left as it is


def _square_resize_reference(grey: np.ndarray, resolution: int) -> np.ndarray:
    """The textbook definition: pad in float to a centred square, quantise, resize."""
    height, width = grey.shape
    side = max(height, width)
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = grey
    as_uint8 = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    if side == resolution:
        return as_uint8
    return np.asarray(Image.fromarray(as_uint8, mode="L").resize((resolution, resolution), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("shape", [(30, 47), (47, 30), (64, 64), (100, 7), (5, 200)])
def test_square_resize_equals_padding_in_float_then_resizing(shape):
    grey = np.random.default_rng(1).random(shape, dtype=np.float32)
    np.testing.assert_array_equal(square_resize(grey, 32), _square_resize_reference(grey, 32))


def test_square_padding_memory_is_bounded_by_the_pixel_limit():
    # 8000 x 100 passes a 1 M pixel limit (0.8 M pixels) but its square is 64 M pixels: padding it
    # in float32 with its temporaries allocated ~0.8 GB. It is scaled down to fit the limit first.
    import tracemalloc

    elongated = np.ones((100, 8000), dtype=np.float32)
    tracemalloc.start()
    try:
        out = square_resize(elongated, 32, max_pixels=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert peak < 16 * 1024 * 1024, f"square_resize of 8000 x 100 peaked at {peak / 1e6:.0f} MB"
    # the picture is still there: a white band, 100/8000 of the square, black above and below
    assert out.mean() == pytest.approx(255 * 100 / 8000, rel=0.3) and out[0].max() == 0 and out[-1].max() == 0


def test_header_pixels_reads_the_size_without_decoding():
    from ctsynth.data.preprocess import header_pixels

    assert header_pixels(_png_header(39_000, 1_000)) == 39_000_000  # ~100 bytes of PNG
    assert header_pixels(_encode(Image.new("L", (20, 10)))) == 200
    assert header_pixels(open(get_testdata_file("CT_small.dcm"), "rb").read()) is None
    assert header_pixels(b"not an image") is None
