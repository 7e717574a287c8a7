"""What train_gan and generate may delete: snapshots are never thrown away for a changed setting
(one rule with the trainer's resume check), outputs never land on the raw data or outside the
repository unless told, and a rerun removes only files the stage itself wrote."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_gan_train import CLASSES, options, tiny_config, write_two_class_set

from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.generate import OUTPUT_MARKER, generate_images
from ctsynth.gan.presets import GANConfig
from ctsynth.gan.train import GANTrainer, load_training_data, train_gan_models

REPO = Path(__file__).resolve().parents[1]


def _stage_module():
    from ctsynth.stages import train_gan

    return train_gan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_training_data(write_two_class_set(tmp_path_factory.mktemp("prepared")), CLASSES, 32)


def test_one_rule_for_resumable_changes():
    cfg = tiny_config()
    saved = cfg.to_dict()
    assert ckpt.incompatible_changes(saved, cfg) == []
    assert ckpt.incompatible_changes(saved | {"kimg": 99.0, "snap": 7.0, "num_bf16_res": 2}, cfg) == []
    assert ckpt.incompatible_changes(saved | {"gamma": 3.0, "channel_max": 32}, cfg) == ["channel_max", "gamma"]
    # A snapshot written before a field existed counts as that field's default ...
    older = {k: v for k, v in saved.items() if k != "mirror"}
    assert ckpt.incompatible_changes(older, cfg) == []
    assert ckpt.incompatible_changes(older, tiny_config(mirror=True)) == ["mirror"]
    # ... and a key the code no longer has counts as a change.
    assert ckpt.incompatible_changes(saved | {"retired_option": 1}, cfg) == ["retired_option"]
    assert {f.name for f in dataclasses.fields(GANConfig)} >= set(ckpt.RESUMABLE_CHANGES)


def test_stage_refuses_changed_settings_and_deletes_nothing(data, tmp_path):
    stage = _stage_module()
    out = tmp_path / "models" / "gan"
    trainer = GANTrainer(tiny_config(), data, options(out))
    trainer._train_step()
    snapshot = trainer.snapshot()
    before = sorted(p.name for p in out.rglob("*"))

    stage.refuse_incompatible_state(out, tiny_config(kimg=5.0))  # a longer run: fine
    with pytest.raises(SystemExit, match=r"\['gamma'\].*mv models/gan"):
        stage.refuse_incompatible_state(out, tiny_config(gamma=5.0))
    assert sorted(p.name for p in out.rglob("*")) == before
    torch.load(snapshot, weights_only=True)

    # The trainer applies the same rule when resuming.
    with pytest.raises(ValueError, match=r"\['gamma'\]"):
        GANTrainer(tiny_config(gamma=5.0), data, options(out)).load_state_dict(ckpt.load_checkpoint(snapshot))


def test_output_location_rules(tmp_path):
    root = tmp_path / "repo"
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    ok = ckpt.check_output_location(root / "models" / "gan", root=root, protected=[raw])
    assert ok == (root / "models" / "gan").resolve()
    for bad in (raw, root / "data", raw / "gan", root):
        with pytest.raises(ValueError):
            ckpt.check_output_location(bad, root=root, protected=[raw])
    with pytest.raises(ValueError, match="outside the repository"):
        ckpt.check_output_location(tmp_path / "elsewhere", root=root, protected=[raw])
    assert ckpt.check_output_location(tmp_path / "elsewhere", root=root, protected=[raw], allow_outside_repo=True)
    with pytest.raises(ValueError, match="raw data"):  # allowed outside, but never the raw data
        ckpt.check_output_location(raw.parent, root=root, protected=[raw], allow_outside_repo=True)


def test_training_refuses_a_foreign_folder_and_prunes_only_its_own_files(data, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not empty and holds no training run"):
        train_gan_models(tiny_config(kimg=0.004, snap=0.004), data, options(foreign), per_class=False)
    assert [p.name for p in foreign.iterdir()] == ["holiday.png"]

    out = tmp_path / "gan"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".notes.txt.swp.tmp").write_text("an editor's, not a snapshot temporary")
    (out / ".snapshot-000000004.pt.abc123.tmp").write_bytes(b"half")  # a killed writer's
    (out / ckpt.snapshot_name(0)).write_bytes(b"")  # an earlier run's (adopted, loads nothing)
    train_gan_models(tiny_config(kimg=0.012, snap=0.004), data, options(out, snap_keep=1, snapshot_kid=False), per_class=False)
    names = {p.name for p in out.iterdir()}
    assert {"notes.txt", ".notes.txt.swp.tmp", ckpt.TRAINING_MARKER, ckpt.FINAL_NETWORK} <= names
    assert ".snapshot-000000004.pt.abc123.tmp" not in names
    assert [p.name for p in ckpt.list_snapshots(out)] == [ckpt.snapshot_name(12)]


def test_generate_removes_only_what_it_wrote(data, tmp_path):
    gan = tmp_path / "gan"
    train_gan_models(tiny_config(kimg=0.004, snap=0.004), data, options(gan, snapshot_kid=False), per_class=False)
    foreign = tmp_path / "occupied"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by `generate`"):
        generate_images(gan, foreign, CLASSES, per_class=2, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    out = tmp_path / "synthetic"
    generate_images(gan, out, CLASSES, per_class=4, progress=False)
    assert (out / OUTPUT_MARKER).exists() and len(list(out.rglob("*.png"))) == 8
    (out / "normal" / "annotation.json").write_text("{}")  # someone else's file in our folder
    generate_images(gan, out, CLASSES, per_class=2, progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        f"{c}/seed0000-0000{i}.png" for c in CLASSES for i in range(2)
    ]
    assert (out / "normal" / "annotation.json").exists()
