"""The embedded phantom: deterministic bytes, the Kaggle layout and split sizes, varied sizes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ctsynth.data.phantom import DEFAULT_COUNTS, KAGGLE_FOLDERS, SliceSpec, simulate_anatomy, slice_specs, write_phantom_dataset
from _phantom_data import SMALL_COUNTS, small_raw

REPO = Path(__file__).resolve().parents[1]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    one = small_raw(tmp_path / "one", seed=3)
    write_phantom_dataset(tmp_path / "two", seed=3, workers=2, counts=SMALL_COUNTS)
    assert _tree_bytes(one) == _tree_bytes(tmp_path / "two")
    write_phantom_dataset(tmp_path / "other", seed=4, workers=1, counts={"train": {"normal": 1}})
    assert (tmp_path / "other/train/normal/phantom_0000.png").read_bytes() != (one / "train/normal/phantom_0000.png").read_bytes()


def test_layout_uses_kaggle_folder_names_and_counts(tmp_path):
    raw = small_raw(tmp_path / "raw")
    assert sorted(p.name for p in raw.iterdir()) == ["test", "train", "valid"]
    assert sorted(p.name for p in (raw / "train").iterdir()) == ["normal", "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa"]
    assert sorted(p.name for p in (raw / "test").iterdir()) == ["normal", "squamous.cell.carcinoma"]
    for split, per_class in SMALL_COUNTS.items():
        for label, n in per_class.items():
            assert len(list((raw / split / KAGGLE_FOLDERS[split][label]).glob("*.png"))) == n
    sizes = [Image.open(p).size for p in raw.rglob("*.png")]
    assert all(200 <= w <= 500 and 150 <= h <= 400 for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2  # sizes vary from image to image
    for path in raw.rglob("*.png"):
        image = Image.open(path)
        assert image.mode in ("L", "RGB", "RGBA")
        assert not image.info.get("tIME") and not image.text  # no timestamps, no metadata


def test_default_counts_are_the_real_split_sizes():
    assert DEFAULT_COUNTS == {"train": {"normal": 148, "squamous": 155}, "valid": {"normal": 13, "squamous": 15},
                              "test": {"normal": 54, "squamous": 90}}
    specs = slice_specs(0)
    assert len(specs) == 475 and len({(s.split, s.folder, s.filename) for s in specs}) == 475


def test_squamous_slices_carry_a_mass_and_anatomy_varies():
    # Same patient stream, with and without the mass: the mass adds soft tissue inside the lungs.
    normal = simulate_anatomy(SliceSpec("train", "normal", 0, 0).rng(), squamous=False)
    squamous = simulate_anatomy(SliceSpec("train", "normal", 0, 0).rng(), squamous=True)
    assert ((squamous > -300) & (normal < -500)).sum() > 30
    other = simulate_anatomy(SliceSpec("train", "normal", 1, 0).rng(), squamous=False)
    assert np.abs(other - normal).mean() > 50  # another patient, another anatomy


@pytest.mark.slow
def test_regenerated_default_matches_data_dvc_hash(tmp_path):
    """`ctsynth phantom --seed 0` must reproduce what data.dvc pins, as DVC itself hashes it."""
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert pinned["path"] == "data/raw"
    repo = tmp_path / "repo"
    write_phantom_dataset(repo / "data/raw", seed=0, workers=2)
    dvc = str(Path(shutil.which("dvc") or REPO / ".venv/bin/dvc"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "add", "-q", "data/raw"], cwd=repo, check=True)
    regenerated = yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]
    assert regenerated["md5"] == pinned["md5"], "the phantom no longer reproduces data.dvc: regenerate and `dvc add data/raw`"
    assert regenerated["nfiles"] == pinned["nfiles"] == 475
    # And the .dir manifest lists the same per-file md5s as a plain md5 of each file.
    listing = json.loads((repo / ".dvc/cache/files/md5" / pinned["md5"][:2] / pinned["md5"][2:]).read_text())
    entry = listing[0]
    assert hashlib.md5((repo / "data/raw" / entry["relpath"]).read_bytes()).hexdigest() == entry["md5"]
