"""Image grids and the label encoding shared by training, generation and reports.

Kept apart from the training loop so that `generate` and the report pictures do not import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctsynth.gan.presets import GANConfig

GRID_COLUMNS = 8
GRID_SEED = 1234


def one_hot(labels: torch.Tensor, c_dim: int) -> torch.Tensor | None:
    """Class ids -> G's / D's conditioning input (None for an unconditional network)."""
    if c_dim == 0:
        return None
    return torch.nn.functional.one_hot(labels, c_dim).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 1 x R x R in [-1, 1] -> N x R x R uint8."""
    return ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def tile(rows: np.ndarray, gap: int = 2) -> np.ndarray:
    """rows x cols x R x R uint8 -> one image with a small white gap between cells."""
    n_rows, n_cols, h, w = rows.shape
    canvas = np.full((n_rows * (h + gap) - gap, n_cols * (w + gap) - gap), 255, dtype=np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = rows[r, c]
    return canvas


@torch.no_grad()
def fixed_seed_grid(G: torch.nn.Module, cfg: GANConfig, n_classes: int, columns: int = GRID_COLUMNS) -> np.ndarray:
    """One row per class (one row for an unconditional G), same seeds at every snapshot."""
    device = next(G.parameters()).device
    rows = []
    generator = torch.Generator().manual_seed(GRID_SEED)
    z = torch.randn(columns, cfg.z_dim, generator=generator).to(device)
    for class_id in range(n_classes if cfg.c_dim else 1):
        c = one_hot(torch.full((columns,), class_id, dtype=torch.long), cfg.c_dim)
        images = G(z, c.to(device) if c is not None else None, noise_mode="const")
        rows.append(to_uint8(images))
    return tile(np.stack(rows))


def save_image_grid(grid: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="L").save(path)
