"""Pictures of a GAN training run: losses, ADA p and r_t over time, real vs. synthetic per class."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ctsynth.gan.generate import LoadedGenerator, latents  # noqa: E402
from ctsynth.gan.grid import one_hot, tile, to_uint8  # noqa: E402


def _by_model(log: pd.DataFrame):
    """(prefix, rows) per trained model: one conditional model, or one per class."""
    if "model" not in log or log["model"].nunique() == 1:
        return [("", log)]
    return [(f"{name}: ", rows) for name, rows in log.groupby("model", sort=False)]


def plot_losses(log: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for prefix, rows in _by_model(log):
        for column, label in (("Loss/G/loss", "G: softplus(-D(G(z)))"), ("Loss/D/loss", "D: logistic")):
            if column in rows:
                axes[0].plot(rows["kimg"], rows[column], label=prefix + label)
        for column, label in (("Loss/r1_penalty", "R1 penalty"), ("Loss/pl_penalty", "path-length penalty")):
            if column in rows and rows[column].notna().any():
                axes[1].plot(rows["kimg"], rows[column], label=prefix + label)
    axes[0].set(xlabel="kimg", ylabel="loss", title="Adversarial losses")
    axes[0].legend()
    axes[1].set(xlabel="kimg", title="Regularisers", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ada(log: pd.DataFrame, path: Path, target: float) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    twin = ax.twinx()
    for prefix, rows in _by_model(log):
        ax.plot(rows["kimg"], rows["ADA/p"], label=prefix + "augmentation p")
        if "ADA/r_t" in rows and rows["ADA/r_t"].notna().any():
            twin.plot(rows["kimg"], rows["ADA/r_t"], alpha=0.6, linestyle=":", label=prefix + "r_t = E[sign D(real)]")
    twin.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    twin.set_ylabel("r_t (dashed: target)")
    ax.set(xlabel="kimg", ylabel="p", title="Adaptive discriminator augmentation")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def real_vs_synthetic_grid(
    data,  # ctsynth.gan.train.TrainingData (images N x 1 x R x R in [-1, 1], labels N)
    generators: dict[str, tuple[LoadedGenerator, int]],
    classes: list[str],
    path: Path,
    columns: int = 8,
    seed: int = 0,
) -> None:
    """Per class: a row of real training images above a row of synthetic ones, labelled."""
    rows = []
    rng = np.random.default_rng(seed)
    for class_id, name in enumerate(classes):
        real_idx = np.flatnonzero(data.labels.numpy() == class_id)
        pick = rng.choice(real_idx, size=min(columns, len(real_idx)), replace=False)
        real = to_uint8(data.images[pick])
        gen, index = generators[name]
        z = latents(seed, class_id, 0, columns, gen.cfg.z_dim)
        c = one_hot(torch.full((columns,), index, dtype=torch.long), gen.cfg.c_dim)
        fake = to_uint8(gen.G(z, c, noise_mode="const"))
        rows += [np.pad(real, ((0, columns - len(real)), (0, 0), (0, 0))), fake]
    grid = tile(np.stack(rows))
    label_width = 110
    canvas = Image.new("L", (grid.shape[1] + label_width, grid.shape[0]), 255)
    canvas.paste(Image.fromarray(grid), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    cell = (grid.shape[0] + 2) // len(rows)
    for r in range(len(rows)):
        kind = "real" if r % 2 == 0 else "synthetic"
        draw.text((4, r * cell + cell // 2 - 6), f"{classes[r // 2]}\n{kind}", fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // data.images.shape[-1])
    canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST).save(path)
