"""prepare: Kaggle folder names -> classes, every file decoded or reported, PNGs + manifest."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
from _phantom_data import RESOLUTION, SMALL_COUNTS, copy_tree, data_params, small_raw
from PIL import Image

from ctsynth.data.ingest import folder_class, prepare_dataset
from ctsynth.data.manifest import MANIFEST_COLUMNS, hamming, phash, read_manifest
from ctsynth.data.preprocess import decode_image


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return small_raw(tmp_path_factory.mktemp("raw") / "raw")


def test_prepare_writes_square_pngs_and_a_complete_manifest(raw, tmp_path):
    result = prepare_dataset(raw, tmp_path / "prepared", data_params())
    assert result.ok and not result.unreadable and not result.unknown_class
    assert result.counts == SMALL_COUNTS
    manifest = read_manifest(tmp_path / "prepared")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == sum(n for per_class in SMALL_COUNTS.values() for n in per_class.values())
    # The test split's short folder name and train's long one both map to `squamous`.
    test_squamous = manifest[manifest["source_path"].str.startswith("test/squamous.cell.carcinoma/")]
    train_squamous = manifest[manifest["source_path"].str.startswith("train/squamous.cell.carcinoma_left.hilum")]
    assert set(test_squamous["label"]) == set(train_squamous["label"]) == {"squamous"}
    assert set(test_squamous["label_id"]) == {1}
    for row in manifest.itertuples():
        image = Image.open(tmp_path / "prepared" / row.path)
        assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "L"
        assert row.path.startswith(f"{row.split}/{row.label}/")
        assert row.sha256 == hashlib.sha256((raw / row.source_path).read_bytes()).hexdigest()
        assert (row.width, row.height) == Image.open(raw / row.source_path).size
        pixels = decode_image((raw / row.source_path).read_bytes()).pixels.astype(np.float64)
        assert row.mean == pytest.approx(pixels.mean(), abs=1e-6) and row.std == pytest.approx(pixels.std(), abs=1e-6)
        assert row.phash == phash(np.asarray(image)) and len(row.phash) == 16


def test_prepare_is_deterministic(raw, tmp_path):
    prepare_dataset(raw, tmp_path / "a", data_params())
    prepare_dataset(raw, tmp_path / "b", data_params())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_folder_names_map_through_aliases():
    params = data_params()
    assert folder_class("squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", params) == "squamous"
    assert folder_class("squamous.cell.carcinoma", params) == "squamous"
    assert folder_class("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", params) == "adenocarcinoma"
    assert folder_class("nromal", params) is None


def test_other_known_classes_are_skipped_and_unknown_folders_reported(raw, tmp_path, caplog):
    broken = copy_tree(raw, tmp_path / "raw")
    (broken / "train/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib").mkdir()
    (broken / "train/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/a.png").write_bytes((raw / "train/normal/phantom_0000.png").read_bytes())
    (broken / "train/nromal").mkdir()
    (broken / "train/nromal/typo.png").write_bytes((raw / "train/normal/phantom_0001.png").read_bytes())
    with caplog.at_level(logging.INFO):
        result = prepare_dataset(broken, tmp_path / "prepared", data_params())
    assert result.ok  # not fatal: validate fails on these rows
    assert result.unknown_class == ["train/nromal/typo.png"]
    manifest = read_manifest(tmp_path / "prepared")
    assert not manifest["source_path"].str.contains("adenocarcinoma").any()
    row = manifest[manifest["source_path"] == "train/nromal/typo.png"].iloc[0]
    assert row["status"] == "unknown_class" and "'nromal'" in row["error"] and "normal" in row["error"]
    assert "adenocarcinoma" in caplog.text and "not in data.classes" in caplog.text


def test_unreadable_files_are_rows_not_crashes(raw, tmp_path):
    broken = copy_tree(raw, tmp_path / "raw")
    (broken / "valid/normal/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    (broken / "valid/normal/empty.jpg").write_bytes(b"")
    result = prepare_dataset(broken, tmp_path / "prepared", data_params())
    assert result.ok and sorted(result.unreadable) == ["valid/normal/corrupt.png", "valid/normal/empty.jpg"]
    manifest = read_manifest(tmp_path / "prepared").set_index("source_path")
    assert manifest.loc["valid/normal/empty.jpg", "error"].startswith("empty file")
    assert manifest.loc["valid/normal/corrupt.png", "status"] == "unreadable"
    assert manifest.loc["valid/normal/corrupt.png", "path"] == ""


def test_same_stem_in_one_folder_gets_unique_names(raw, tmp_path):
    broken = copy_tree(raw, tmp_path / "raw")
    image = Image.open(raw / "train/normal/phantom_0000.png").convert("L")
    image.save(broken / "train/normal/phantom_0000.jpg", quality=90)
    prepare_dataset(broken, tmp_path / "prepared", data_params())
    manifest = read_manifest(tmp_path / "prepared")
    names = manifest[manifest["source_path"].str.startswith("train/normal/phantom_0000.")]["path"]
    assert len(set(names)) == 2


def test_missing_raw_or_split_folder_is_fatal_with_a_clear_error(raw, tmp_path):
    result = prepare_dataset(tmp_path / "nowhere", tmp_path / "prepared", data_params())
    assert not result.ok and "does not exist" in result.errors[0]
    partial = copy_tree(raw, tmp_path / "raw")
    for child in (partial / "valid").rglob("*"):
        if child.is_file():
            child.unlink()
    for child in sorted((partial / "valid").iterdir()):
        child.rmdir()
    (partial / "valid").rmdir()
    result = prepare_dataset(partial, tmp_path / "prepared", data_params())
    assert not result.ok and "['valid']" in result.errors[0]


def test_phash_hamming():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    assert hamming(phash(image), phash(image)) == 0
    brighter = np.clip(image.astype(int) + 3, 0, 255).astype(np.uint8)
    assert hamming(phash(image), phash(brighter)) <= 2
    assert hamming(phash(image), phash(rng.integers(0, 255, (64, 64), dtype=np.uint8))) > 10
    assert hamming("ffffffffffffffff", "0000000000000000") == 64


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_prepare_refuses_to_write_into_or_around_the_raw_data(raw, tmp_path):
    repository = tmp_path / "repo"
    copy = copy_tree(raw, repository / "data" / "raw")
    before = _files(copy)
    for out in (copy, copy / "train", repository / "data", repository):  # is, inside, or contains the raw data
        result = prepare_dataset(copy, out, data_params(), repository=repository)
        assert not result.ok and "raw data" in result.errors[0], out
    outside = tmp_path / "elsewhere"
    result = prepare_dataset(copy, outside, data_params(), repository=repository)
    assert not result.ok and "outside the repository" in result.errors[0] and not outside.exists()
    assert _files(copy) == before  # nothing touched


def test_a_rerun_replaces_only_what_prepare_wrote(raw, tmp_path):
    out = tmp_path / "prepared"
    assert prepare_dataset(raw, out, data_params()).ok
    first = _files(out)
    # a file prepare did not write: the rerun refuses and deletes nothing
    (out / "train" / "normal" / "my_notes.txt").write_text("keep me")
    result = prepare_dataset(raw, out, data_params())
    assert not result.ok and "my_notes.txt" in result.errors[0] and "nothing was deleted" in result.errors[0]
    assert _files(out) == first | {"train/normal/my_notes.txt": b"keep me"}
    (out / "train" / "normal" / "my_notes.txt").unlink()
    # a PNG of the earlier run whose source is gone disappears; the rest is rewritten identically
    smaller = copy_tree(raw, tmp_path / "raw")
    removed_source = sorted((smaller / "train" / "normal").iterdir())[0]
    removed_source.unlink()
    assert prepare_dataset(smaller, out, data_params()).ok
    second = _files(out)
    assert len(second) == len(first) - 1 and all(first[name] == data for name, data in second.items() if name != "manifest.csv")


def test_a_manifest_pointing_outside_the_output_deletes_nothing(raw, tmp_path):
    out = tmp_path / "prepared"
    assert prepare_dataset(raw, out, data_params()).ok
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    manifest = read_manifest(out)
    manifest.loc[0, "path"] = "../victim.png"
    manifest.to_csv(out / "manifest.csv", index=False)
    result = prepare_dataset(raw, out, data_params())
    assert not result.ok and "outside" in result.errors[0]
    assert victim.read_bytes() == b"precious"
