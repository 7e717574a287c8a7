"""Synthetic images from a trained generator: seeded, truncated, written as PNG + manifest.csv.

Image i of class k always comes from the same latent: z is drawn from a generator seeded with
(seed, k, i), so asking for more images later keeps the first ones identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ctsynth.gan.checkpoint import FINAL_NETWORK, load_checkpoint
from ctsynth.gan.networks import Generator
from ctsynth.gan.presets import GANConfig
from ctsynth.gan.train import NETWORK_FORMAT, build_networks, one_hot, to_uint8

log = logging.getLogger(__name__)


@dataclass
class LoadedGenerator:
    G: Generator
    cfg: GANConfig
    classes: list[str]
    path: Path


def load_generator(path: Path, device: str = "cpu") -> LoadedGenerator:
    """network-final.pt or a training snapshot -> its EMA generator, in eval mode."""
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != NETWORK_FORMAT:
        raise ValueError(f"{path} is not a ctsynth StyleGAN2-ADA network (format {state.get('format')!r})")
    cfg = GANConfig.from_dict(state["config"])
    G, _ = build_networks(cfg, device)
    G.load_state_dict(state["G_ema"])
    return LoadedGenerator(G.eval().requires_grad_(False), cfg, list(state["classes"]), Path(path))


def find_networks(gan_dir: Path, classes: list[str]) -> dict[str, tuple[Path, int]]:
    """class -> (network file, class index inside it), for a conditional or per-class layout."""
    gan_dir = Path(gan_dir)
    if (gan_dir / FINAL_NETWORK).exists():
        return {name: (gan_dir / FINAL_NETWORK, i) for i, name in enumerate(classes)}
    found = {name: (gan_dir / name / FINAL_NETWORK, 0) for name in classes}
    missing = [str(path) for path, _ in found.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"no trained generator: expected {gan_dir / FINAL_NETWORK} (conditional) or {missing} "
            "(one per class); run `dvc repro train_gan` or `ctsynth train-gan` first"
        )
    return found


def latents(seed: int, class_id: int, start: int, count: int, z_dim: int) -> torch.Tensor:
    rows = [
        torch.randn(z_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + class_id * 100_003 + i))
        for i in range(start, start + count)
    ]
    return torch.stack(rows)


@torch.no_grad()
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
) -> pd.DataFrame:
    """Write out_dir/<class>/seed<S>-<i>.png and out_dir/manifest.csv; returns the manifest."""
    out_dir = Path(out_dir)
    networks = find_networks(gan_dir, classes)
    loaded: dict[Path, LoadedGenerator] = {}
    rows = []
    bar = tqdm(total=per_class * len(classes), unit="img", desc="generate", disable=not progress)
    for class_id, name in enumerate(classes):
        path, index_in_network = networks[name]
        if path not in loaded:
            loaded[path] = load_generator(path)
        gen = loaded[path]
        if gen.cfg.c_dim and gen.classes[index_in_network] != name:
            raise ValueError(f"{path} was trained with classes {gen.classes}; cannot find {name!r} at {index_in_network}")
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed * 7919 + class_id)  # only matters for noise_mode="random"
        for start in range(0, per_class, batch):
            count = min(batch, per_class - start)
            z = latents(seed, class_id, start, count, gen.cfg.z_dim)
            c = one_hot(torch.full((count,), index_in_network, dtype=torch.long), gen.cfg.c_dim)
            images = to_uint8(gen.G(z, c, psi=psi, noise_mode=noise_mode))
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
    log.info("wrote %d synthetic images to %s", len(manifest), out_dir)
    return manifest
