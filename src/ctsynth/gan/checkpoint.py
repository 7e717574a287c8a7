"""Training snapshots that survive SIGKILL and load with `torch.load(weights_only=True)`, the rule
for which setting changes a resumed run may make, and what a stage may write or delete.

A snapshot is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes), so
loading one never executes code. It is written to a temporary file in the same folder, flushed to
disk, then renamed over the final name: a rename is atomic on POSIX, so a reader sees either the
previous snapshot or the complete new one, never half a file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ctsynth.gan.networks import Discriminator, Generator
from ctsynth.gan.presets import GANConfig

log = logging.getLogger(__name__)

NETWORK_FORMAT = "ctsynth-stylegan2-ada/1"
SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d{9})\.pt$")
FINAL_NETWORK = "network-final.pt"
TRAINING_MARKER = ".ctsynth-train-gan"  # this folder is a training run's: its snapshots may be pruned
# A half-written file of atomic_torch_save: ".<final name>.<random>.tmp".
TEMPORARY_PATTERN = re.compile(r"^\.(snapshot-\d{9}\.pt|network-final\.pt)\..+\.tmp$")
# Config keys a resumed run may change: length, snapshot spacing and speed-only settings.
RESUMABLE_CHANGES = ("kimg", "snap", "num_bf16_res", "channels_last")


# ---------------------------------------------------------------------------
# The network file format
# ---------------------------------------------------------------------------


def check_network_format(state: dict[str, Any], path: Path | str) -> None:
    """Refuse a file that is not one of our snapshots / final networks (before using any key)."""
    if not isinstance(state, dict) or state.get("format") != NETWORK_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a ctsynth StyleGAN2-ADA network (format {found!r}, expected {NETWORK_FORMAT!r})")


def build_networks(cfg: GANConfig, device: str | torch.device) -> tuple[Generator, Discriminator]:
    G = Generator(
        z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
        img_channels=cfg.img_channels, channel_base=cfg.channel_base, channel_max=cfg.channel_max,
        map_layers=cfg.map_layers, mapping_lr_mul=cfg.mapping_lr_mul, conv_clamp=cfg.conv_clamp,
        num_bf16_res=cfg.num_bf16_res, channels_last=cfg.channels_last,
    )
    D = Discriminator(
        c_dim=cfg.c_dim, img_resolution=cfg.resolution, img_channels=cfg.img_channels,
        channel_base=cfg.channel_base, channel_max=cfg.channel_max, mbstd_group_size=cfg.mbstd,
        conv_clamp=cfg.conv_clamp, num_bf16_res=cfg.num_bf16_res, channels_last=cfg.channels_last,
        architecture=cfg.d_architecture, label_map_layers=cfg.d_label_map_layers,
    )
    return G.to(device), D.to(device)


def incompatible_changes(saved_config: dict[str, Any], cfg: GANConfig) -> list[str]:
    """The settings in which a snapshot differs from `cfg`, other than RESUMABLE_CHANGES.

    The one rule for both the trainer (may it resume?) and the `train_gan` stage (may it keep
    training in this folder?). A key the snapshot lacks (written before the field existed) counts
    as the field's default, so adding a field with a default does not invalidate old snapshots; a
    key the code no longer knows counts as changed.
    """
    fields = {f.name: f for f in dataclasses.fields(GANConfig)}
    current = cfg.to_dict()
    changed = sorted(k for k in saved_config if k not in fields)
    for name, field in fields.items():
        if name in RESUMABLE_CHANGES:
            continue
        if name in saved_config:
            saved = saved_config[name]
        elif field.default is not dataclasses.MISSING:
            saved = field.default
        else:
            changed.append(name)
            continue
        if isinstance(saved, list):
            saved = tuple(saved)
        if saved != current[name]:
            changed.append(name)
    return sorted(changed)


def snapshot_name(cur_nimg: int) -> str:
    return f"snapshot-{cur_nimg:09d}.pt"


def atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def list_snapshots(folder: Path) -> list[Path]:
    """Snapshots in `folder`, oldest first (by image counter, which is in the name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if SNAPSHOT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(SNAPSHOT_PATTERN.match(p.name).group(1)))


def newest_loadable_snapshot(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest snapshot that loads; a damaged file (e.g. a disk error) is skipped, not fatal."""
    for path in reversed(list_snapshots(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # torch raises several types for damaged zip archives
            log.warning("snapshot %s could not be loaded (%s); trying an older one", path, exc)
    return None


def prune_snapshots(folder: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` snapshots (and `protect`, the best one so far); the disk of a long
    run does not fill up. Only files named like our snapshots are ever removed."""
    if keep <= 0:
        return
    for path in list_snapshots(folder)[:-keep]:
        if protect is not None and path.name == Path(protect).name:
            continue
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: Path) -> None:
    """Remove half-written temporaries that atomic_torch_save left when its process was killed
    (only names it makes; anything else in the folder is not ours)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if TEMPORARY_PATTERN.match(path.name):
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Where a stage may write (and so delete)
# ---------------------------------------------------------------------------


def check_output_location(out: Path, *, root: Path, protected: list[Path], allow_outside_repo: bool = False) -> Path:
    """Refuse an output folder that is, contains or lies inside a protected folder (the raw data),
    or (unless `allow_outside_repo`) lies outside the repository `root`. Returns it resolved."""
    out, root = Path(out).resolve(), Path(root).resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if out == folder or folder.is_relative_to(out) or out.is_relative_to(folder):
            raise ValueError(
                f"refusing to write into {out}: it is, contains or lies inside the raw data {folder}; "
                "choose another output folder"
            )
    if not allow_outside_repo and (out == root or not out.is_relative_to(root)):
        raise ValueError(
            f"refusing to write into {out}: outside the repository {root} (or the repository itself); "
            "set the allow_outside_repo option if this is really wanted"
        )
    return out


def claim_training_folder(folder: Path) -> None:
    """Mark `folder` as a training run's, refusing a non-empty folder that is not one: the
    trainer prunes snapshots there and must never be pointed at someone else's files. A folder
    of an earlier version (snapshots or a final network, no marker yet) is adopted."""
    folder = Path(folder)
    marker = folder / TRAINING_MARKER
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    if folder.is_dir() and not marker.exists():
        ours = bool(list_snapshots(folder)) or (folder / FINAL_NETWORK).exists()
        if any(folder.iterdir()) and not ours:
            raise ValueError(
                f"refusing to train into {folder}: it is not empty and holds no training run "
                f"(no {TRAINING_MARKER}, no snapshots); choose an empty or new folder"
            )
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
