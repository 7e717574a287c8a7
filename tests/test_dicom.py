"""DICOM as archives write it: compressed transfer syntaxes, colour, MONOCHROME1, header windows,
deflated data sets with a cap, and every file pydicom ships either decoding or refused with a reason."""

from __future__ import annotations

import io
import logging
import tracemalloc
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from _dicom_data import deflate_bomb

from ctsynth.data.dicom import DEFLATED_SYNTAX, decode_dicom, inflate_capped
from ctsynth.data.preprocess import ImageDecodeError, decode_image, is_dicom, lung_window, preprocess_bytes

log = logging.getLogger(__name__)

# The files pydicom ships inside its package; its get_testdata_file helpers may download more, so
# the folder is listed directly.
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _read(name: str) -> bytes:
    return (PYDICOM_FILES / name).read_bytes()


def _grey(name: str, **kwargs) -> np.ndarray:
    return decode_image(_read(name), **kwargs).pixels


def _edited(name: str, edit) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(_read(name)))
    edit(dataset)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "compressed",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels_as_the_uncompressed_file(compressed):
    np.testing.assert_array_equal(_grey(compressed), _grey("MR_small.dcm"))


def test_jpeg_lossless_process_14_colour_equals_its_rle_twin():
    # SC_rgb_jpeg_gdcm.dcm is JPEG Lossless (process 14, selection value 1), SC_rgb_rle.dcm the same image in RLE
    np.testing.assert_array_equal(_grey("SC_rgb_jpeg_gdcm.dcm"), _grey("SC_rgb_rle.dcm"))


def test_rgb_dicom_becomes_grey_as_the_same_rgb_png_does():
    rgb = pydicom.dcmread(PYDICOM_FILES / "SC_rgb_small_odd.dcm").pixel_array
    assert rgb.ndim == 3 and rgb.dtype == np.uint8
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    np.testing.assert_array_equal(_grey("SC_rgb_small_odd.dcm"), decode_image(buffer.getvalue()).pixels)


def test_ybr_coded_jpeg_is_turned_to_rgb_before_grey():
    rgb_coded, ybr_coded = _grey("SC_rgb_dcmtk_+eb+cr.dcm"), _grey("SC_rgb_dcmtk_+eb+cy+n1.dcm")
    assert rgb_coded.shape == ybr_coded.shape
    assert np.abs(rgb_coded - ybr_coded).mean() < 0.02  # two lossy encodings of one picture


def test_monochrome1_is_inverted():
    plain = _grey("MR_small.dcm")
    inverted = decode_image(_edited("MR_small.dcm", lambda d: setattr(d, "PhotometricInterpretation", "MONOCHROME1"))).pixels
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_ct_uses_the_lung_window_unless_the_header_window_is_asked_for():
    data = _edited("CT_small.dcm", lambda d: (setattr(d, "WindowCenter", 40), setattr(d, "WindowWidth", 400)))
    dataset = pydicom.dcmread(io.BytesIO(data))
    hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(decode_image(data).pixels, lung_window(hu))
    np.testing.assert_array_equal(decode_image(data, dicom_window="header").pixels, lung_window(hu, center=40, width=400))
    assert preprocess_bytes(data, 32, dicom_window="header").shape == (1, 32, 32)
    with pytest.raises(ValueError, match="window must be one of"):
        decode_dicom(data, 10**6, window="bone")


def test_a_header_value_that_is_no_number_is_a_named_refusal():
    # badVR.dcm: NumberOfFrames '1A'; before, int() raised ValueError out of the decoder (a 500)
    with pytest.raises(ImageDecodeError, match="NumberOfFrames='1A' is not a number"):
        decode_image(_read("badVR.dcm"))


def test_a_deflated_file_decodes():
    data = _read("image_dfl.dcm")
    assert pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID == DEFLATED_SYNTAX
    np.testing.assert_array_equal(decode_image(data).pixels.shape, pydicom.dcmread(io.BytesIO(data)).pixel_array.shape)


def test_a_deflate_bomb_is_refused_at_the_cap_without_inflating_it():
    bomb = deflate_bomb(256 << 20)  # 256 MB inflated from ~250 KB
    assert len(bomb) < 1 << 20 and is_dicom(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="inflates to more than"):
            decode_image(bomb, max_pixels=1_000_000)  # cap: 6 bytes a pixel + 1 MiB = 7 MB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak / 1e6:.0f} MB while refusing a deflate bomb"


def test_inflate_capped():
    payload = bytes(range(256)) * 100
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(payload) + deflater.flush()
    assert inflate_capped(deflated, len(payload)) == payload
    with pytest.raises(ImageDecodeError, match="more than 100 bytes"):
        inflate_capped(deflated, 100)
    with pytest.raises(ImageDecodeError, match="corrupt"):
        inflate_capped(b"\xff" * 64, 10_000)


def test_every_file_pydicom_ships_decodes_or_gets_a_named_reason():
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    assert len(files) > 100, f"pydicom's data folder has only {len(files)} files"
    outcome: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values these files are made of
        for path in files:
            data = path.read_bytes()
            kind = "dicom" if is_dicom(data) else "other"
            try:
                model_input = preprocess_bytes(data, 32)
            except ImageDecodeError as exc:
                outcome[f"{kind} refused"] += 1
                reasons[path.relative_to(PYDICOM_FILES).as_posix()] = str(exc)
                continue
            assert model_input.shape == (1, 32, 32) and np.isfinite(model_input).all(), path.name
            assert -1.0 <= model_input.min() and model_input.max() <= 1.0, path.name
            outcome[f"{kind} decoded"] += 1
    log.info("pydicom %s test files: %s", pydicom.__version__, dict(outcome))
    print(f"\npydicom {pydicom.__version__}: {len(files)} files: {dict(sorted(outcome.items()))}")
    # the transfer syntaxes CT archives use all decode (one file each)
    for name in ["MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "image_dfl.dcm", "examples_palette.dcm"]:
        assert name not in reasons, f"{name}: {reasons[name]}"
    assert outcome["other decoded"] == 0


def test_prepare_takes_the_pydicom_corpus_without_failing(tmp_path):
    """`prepare` (ctsynth.data.ingest, through decode_image and square_resize) on every DICOM file
    pydicom ships: each one prepared or an "unreadable" row with its reason; the stage goes on."""
    import shutil

    from ctsynth.config import DataParams
    from ctsynth.data.ingest import prepare_dataset
    from ctsynth.data.manifest import STATUS_OK

    raw = tmp_path / "raw"
    dicoms = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file() and is_dicom(p.read_bytes()))
    for split in ("train", "valid", "test"):
        (raw / split / "normal").mkdir(parents=True)
    for i, path in enumerate(dicoms):
        shutil.copyfile(path, raw / "train" / "normal" / f"{i:03d}_{path.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prepare_dataset(raw, tmp_path / "prepared", DataParams(resolution=16))
    assert result.ok, result.errors
    prepared, unreadable = result.counts["train"]["normal"], len(result.unreadable)
    assert prepared + unreadable == len(dicoms)
    expected_refused = 0
    for path in dicoms:
        try:
            preprocess_bytes(path.read_bytes(), 16)
        except ImageDecodeError:
            expected_refused += 1
    assert unreadable == expected_refused and prepared > 50
    assert all(row["error"] for row in result.rows if row["status"] != STATUS_OK)


@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb_jpeg_gdcm.dcm", "image_dfl.dcm", "MR_small_jpeg_ls_lossless.dcm", "examples_palette.dcm"])
def test_corrupted_files_decode_or_get_a_named_reason(name):
    """Bytes flipped in the header and pixel data, files cut short: ImageDecodeError or a result,
    never another exception (a broken header element used to escape as NotImplementedError)."""
    data = _read(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(80):
            corrupt = bytearray(data)
            for _ in range(int(rng.integers(1, 12))):
                corrupt[int(rng.integers(132, min(len(data), 2000) if i % 2 else len(data)))] = int(rng.integers(0, 256))
            if i % 7 == 0:
                corrupt = corrupt[: int(rng.integers(132, len(corrupt)))]
            try:
                model_input = preprocess_bytes(bytes(corrupt), 16, max_pixels=4_000_000)
            except ImageDecodeError:
                continue
            assert model_input.shape == (1, 16, 16) and np.isfinite(model_input).all()


def test_an_element_with_an_unknown_value_representation_is_a_named_refusal():
    data = _read("SC_rgb_jpeg_gdcm.dcm")
    samples_per_pixel = b"\x28\x00\x02\x00US"  # (0028,0002) US, explicit VR little endian
    assert data.count(samples_per_pixel) == 1
    broken = data.replace(samples_per_pixel, b"\x28\x00\x02\x00UM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageDecodeError, match="SamplesPerPixel could not be read"):
            decode_image(broken)
