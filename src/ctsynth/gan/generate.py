"""Synthetic images from a trained generator: seeded, truncated, written as PNG + manifest.csv.

Image i of class k always comes from the same latent: z is drawn from a generator seeded with
(seed, k, i), so asking for more images later keeps the first ones identical.

Truncation (psi < 1) pulls w towards a centre: for a conditional G the mean w of the class itself
(estimated from CENTRE_SAMPLES latents), so that psi -> 0 gives that class's average slice rather
than the average over all classes; for an unconditional G the tracked global mean w.

The network is the final one (`snapshot="final"`) or the snapshot with the lowest KID recorded by
the trainer (`"best"`). The output folder is claimed with a marker listing the files written;
a later run removes only those, and refuses a non-empty folder without the marker.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ctsynth.data.manifest import GENERATOR_RECORD
from ctsynth.device import record_device, resolve_device
from ctsynth.gan.checkpoint import FINAL_NETWORK, build_networks, check_network_format, load_checkpoint
from ctsynth.gan.grid import one_hot, to_uint8
from ctsynth.gan.networks import Generator
from ctsynth.gan.presets import GANConfig
from ctsynth.paths import file_md5

log = logging.getLogger(__name__)

QUALITY_LOG = "snapshot_quality.csv"  # written by the trainer, one row per snapshot
OUTPUT_MARKER = ".ctsynth-generate.json"
CENTRE_SAMPLES = 4096
CENTRE_SEED = 271828


@dataclass
class LoadedGenerator:
    G: Generator
    cfg: GANConfig
    classes: list[str]
    path: Path


def load_generator(path: Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """network-final.pt or a training snapshot -> its EMA generator, in eval mode."""
    state = load_checkpoint(path, map_location=device)
    check_network_format(state, path)
    cfg = GANConfig.from_dict(state["config"])
    G, _ = build_networks(cfg, device)
    G.load_state_dict(state["G_ema"])
    return LoadedGenerator(G.eval().requires_grad_(False), cfg, list(state["classes"]), Path(path))


def best_snapshot(model_dir: Path) -> Path | None:
    """The snapshot in `model_dir` with the lowest KID the trainer recorded (still on disk)."""
    log_path = Path(model_dir) / QUALITY_LOG
    if not log_path.exists():
        return None
    rows = pd.read_csv(log_path)
    rows = rows[[(Path(model_dir) / name).exists() for name in rows["snapshot"]]]
    if rows.empty:
        return None
    return Path(model_dir) / rows.sort_values(["kid", "kimg"], ascending=[True, False]).iloc[0]["snapshot"]


def _network_in(model_dir: Path, snapshot: str) -> Path:
    if snapshot == "best":
        best = best_snapshot(model_dir)
        if best is not None:
            return best
        log.warning("no snapshot KID recorded in %s: using %s", model_dir, FINAL_NETWORK)
    elif snapshot != "final":
        raise ValueError(f"snapshot must be 'best' or 'final', got {snapshot!r}")
    return Path(model_dir) / FINAL_NETWORK


def find_networks(gan_dir: Path, classes: list[str], snapshot: str = "final") -> dict[str, tuple[Path, int]]:
    """class -> (network file, class index inside it), for a conditional or per-class layout, or
    a single network file (conditional, or unconditional for one class)."""
    gan_dir = Path(gan_dir)
    if gan_dir.is_file():
        return {name: (gan_dir, i) for i, name in enumerate(classes)}
    if (gan_dir / FINAL_NETWORK).exists():
        path = _network_in(gan_dir, snapshot)
        return {name: (path, i) for i, name in enumerate(classes)}
    missing = [str(gan_dir / name / FINAL_NETWORK) for name in classes if not (gan_dir / name / FINAL_NETWORK).exists()]
    if missing:
        raise FileNotFoundError(
            f"no trained generator: expected {gan_dir / FINAL_NETWORK} (conditional) or {missing} "
            "(one per class); run `dvc repro train_gan` or `ctsynth train-gan` first"
        )
    return {name: (_network_in(gan_dir / name, snapshot), 0) for name in classes}


def latents(seed: int, class_id: int, start: int, count: int, z_dim: int) -> torch.Tensor:
    rows = [
        torch.randn(z_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + class_id * 100_003 + i))
        for i in range(start, start + count)
    ]
    return torch.stack(rows)


@torch.no_grad()
def class_centre(G: Generator, class_index: int, samples: int = CENTRE_SAMPLES) -> torch.Tensor:
    """The mean w of one class of a conditional G (num_ws x w_dim), from fixed latents."""
    device = next(G.parameters()).device
    z = torch.randn(samples, G.z_dim, generator=torch.Generator().manual_seed(CENTRE_SEED)).to(device)
    c = one_hot(torch.full((samples,), class_index, dtype=torch.long), G.c_dim).to(device)
    return torch.stack([G.mapping(zb, cb).mean(dim=0) for zb, cb in zip(z.split(512), c.split(512))]).mean(dim=0)


@torch.no_grad()
def synthesize(G: Generator, z: torch.Tensor, class_index: int, psi: float, noise_mode: str,
               centre: torch.Tensor | None = None) -> torch.Tensor:
    """Images of one class; truncation towards the class centre for a conditional G."""
    device = next(G.parameters()).device
    # Latents are drawn on the CPU (seeded per image), so the same seed gives the same z on any device.
    z = z.to(device)
    c = one_hot(torch.full((len(z),), class_index, dtype=torch.long), G.c_dim).to(device)
    if psi == 1 or not G.c_dim:
        return G(z, c, psi=psi, noise_mode=noise_mode)
    if centre is None:
        centre = class_centre(G, class_index)
    ws = centre.lerp(G.mapping(z, c), psi)  # centre + psi * (w - centre)
    return G.synthesis(ws, noise_mode=noise_mode)


def _planned_files(classes: list[str], per_class: int, seed: int) -> list[str]:
    return [f"{name}/seed{seed:04d}-{i:05d}.png" for name in classes for i in range(per_class)] + ["manifest.csv", GENERATOR_RECORD]


def claim_output_folder(out_dir: Path, planned: list[str]) -> None:
    """Remove what an earlier `generate` wrote here (listed in its marker), then record what this
    run will write. A non-empty folder without our marker is refused: its files are not ours."""
    out_dir = Path(out_dir)
    marker = out_dir / OUTPUT_MARKER
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder")
    if marker.exists():
        written = json.loads(marker.read_text()).get("files", [])
        root = out_dir.resolve()
        for relative in written:
            path = (out_dir / relative).resolve()
            if path.is_relative_to(root) and path.is_file():  # never follow a name out of the folder
                path.unlink()
        for folder in sorted({(out_dir / r).parent for r in written}, key=lambda p: len(p.parts), reverse=True):
            if folder != out_dir and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        others = [str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p != marker]
        if others:
            log.warning("%s holds %d file(s) generate did not write (kept): %s", out_dir, len(others), others[:5])
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"refusing to write into {out_dir}: it is not empty and was not written by `generate` "
            f"(no {OUTPUT_MARKER}); choose an empty or new folder, or empty this one yourself"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"written_by": "ctsynth generate", "files": planned}, indent=0))


@torch.no_grad()
def write_generator_record(out_dir: Path, networks: dict[str, tuple[Path, int]], snapshot: str) -> dict:
    """out_dir/generator.json: per class the network file, its md5 (DVC's hash of a file; the
    generator registry tags each version with it) and the snapshot setting. A classifier trained
    on these images copies the md5 into its MLflow run, the link from a model back to its GAN."""
    record = {
        "snapshot": snapshot,
        "classes": {name: {"network": Path(path).name, "network_md5": file_md5(path)} for name, (path, _) in networks.items()},
    }
    (out_dir / GENERATOR_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def generate_images(
    gan_dir: Path,
    out_dir: Path,
    classes: list[str],
    per_class: int,
    seed: int = 0,
    psi: float = 1.0,
    out_resolution: int | None = None,
    noise_mode: str = "const",
    batch: int = 32,
    progress: bool = True,
    snapshot: str = "final",
    device: str = "auto",
) -> pd.DataFrame:
    """Write out_dir/<class>/seed<S>-<i>.png and out_dir/manifest.csv; returns the manifest.
    `gan_dir`: a train_gan output folder (conditional or per class) or one network file.
    `device`: a ctsynth.device setting (auto = CUDA when available, else CPU)."""
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    record_device(device, torch_device)  # logged; tagged too when the caller has an MLflow run open
    networks = find_networks(gan_dir, classes, snapshot)
    claim_output_folder(out_dir, _planned_files(classes, per_class, seed))
    loaded: dict[Path, LoadedGenerator] = {}
    rows = []
    bar = tqdm(total=per_class * len(classes), unit="img", desc="generate", disable=not progress)
    for class_id, name in enumerate(classes):
        path, index_in_network = networks[name]
        if path not in loaded:
            loaded[path] = load_generator(path, torch_device)
        gen = loaded[path]
        if gen.cfg.c_dim and gen.classes[index_in_network] != name:
            raise ValueError(f"{path} was trained with classes {gen.classes}; cannot find {name!r} at {index_in_network}")
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed * 7919 + class_id)  # only matters for noise_mode="random"
        centre = class_centre(gen.G, index_in_network) if gen.cfg.c_dim and psi != 1 else None
        for start in range(0, per_class, batch):
            count = min(batch, per_class - start)
            z = latents(seed, class_id, start, count, gen.cfg.z_dim)
            images = to_uint8(synthesize(gen.G, z, index_in_network, psi, noise_mode, centre))
            for offset, pixels in enumerate(images):
                i = start + offset
                image = Image.fromarray(pixels, mode="L")
                if out_resolution and out_resolution != image.width:
                    image = image.resize((out_resolution, out_resolution), Image.Resampling.LANCZOS)
                relative = f"{name}/seed{seed:04d}-{i:05d}.png"
                image.save(out_dir / relative)
                rows.append({
                    "path": relative, "split": "synthetic", "label": name, "label_id": class_id,
                    "seed": seed, "index": i, "psi": psi, "network": str(path),
                    "width": image.width, "height": image.height, "mode": "L",
                    "mean": float(np.asarray(image, dtype=np.float32).mean() / 255.0),
                    "std": float(np.asarray(image, dtype=np.float32).std() / 255.0),
                })
            bar.update(count)
    bar.close()
    manifest = pd.DataFrame(rows)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    write_generator_record(out_dir, networks, snapshot)
    log.info("wrote %d synthetic images to %s", len(manifest), out_dir)
    return manifest
