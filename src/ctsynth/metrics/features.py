"""The feature spaces the distribution metrics are computed in.

Default: `PixelPCAFeatures` = PCA of the images at 32 x 32 (24 components) + 9 radiological
intensity statistics. Why this and not the usual Inception-v3 pool features:

- It works at n ~ 150 per class. The Fréchet distance fits a d x d covariance; with d = 2048
  (Inception) and 150 images that covariance has rank <= 149 and the distance is dominated by
  estimation noise (the reference study logged FID values like 4.7e87). With d = 33 the
  covariance is estimated from ~5 samples per dimension, which is still noisy but finite, and the
  real-vs-real floor shows how noisy.
- It is offline and exactly reproducible: it depends only on the data, not on downloaded weights
  (forbidden here) nor on a random initialisation, whose values change with the torch version and
  would make numbers from two environments incomparable (the objection to random-weight CNN
  embeddings, which otherwise give usable KID).
- It measures what matters for chest CT: the leading principal components are the body outline,
  lung fields and mediastinum layout (eigen-images); the intensity statistics are fractions of
  the image in lung-window Hounsfield ranges (air, aerated lung, fat/soft tissue), the grey-level
  percentiles, and the mean gradient magnitude, which drops when a generator blurs the texture.

The space is fitted on one half of the real training images (the "reference" half), so that the
other real half and the synthetic images are both out of sample: the real-vs-real floor and the
synthetic number are computed the same way.

Optional: `InceptionFeatures` (2048-d pool features of torchvision's Inception-v3) only when its
weights file is already on disk — torch hub's checkpoints folder or an explicit path. It is never
downloaded; without the file the FID entry is null with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from tqdm import tqdm

from ctsynth.data.preprocess import LUNG_WINDOW_CENTER_HU, LUNG_WINDOW_WIDTH_HU

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_GLOB = "inception_v3_google-*.pth"
INCEPTION_INPUT_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hounsfield ranges read back from the lung-window grey level (preprocess.lung_window).
AIR_MAX_HU = -900.0
LUNG_MAX_HU = -500.0
SOFT_TISSUE_MIN_HU = -100.0

INTENSITY_FEATURE_NAMES = (
    "mean",
    "std",
    "p10",
    "p50",
    "p90",
    "fraction_air",
    "fraction_lung",
    "fraction_soft_tissue",
    "mean_gradient",
)


def _hu_to_unit(hu: float) -> float:
    return (hu - (LUNG_WINDOW_CENTER_HU - LUNG_WINDOW_WIDTH_HU / 2.0)) / LUNG_WINDOW_WIDTH_HU


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected model-input images N x 1 x H x W in [-1, 1]; got shape {images.shape}")
    return images


def intensity_statistics(images: np.ndarray) -> np.ndarray:
    """N x 9 radiological intensity statistics of model-input images (see INTENSITY_FEATURE_NAMES)."""
    unit = (_check_images(images)[:, 0].astype(np.float64) + 1.0) / 2.0  # back to lung-window [0, 1]
    flat = unit.reshape(len(unit), -1)
    air, lung, soft = _hu_to_unit(AIR_MAX_HU), _hu_to_unit(LUNG_MAX_HU), _hu_to_unit(SOFT_TISSUE_MIN_HU)
    grad_y, grad_x = np.gradient(unit, axis=(1, 2))
    percentiles = np.percentile(flat, [10, 50, 90], axis=1).T
    return np.column_stack(
        [
            flat.mean(axis=1),
            flat.std(axis=1),
            percentiles,
            (flat < air).mean(axis=1),
            ((flat >= air) & (flat < lung)).mean(axis=1),
            (flat >= soft).mean(axis=1),
            np.hypot(grad_x, grad_y).reshape(len(unit), -1).mean(axis=1),
        ]
    )


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average to size x size (anti-aliased), N x size*size."""
    tensor = torch.from_numpy(_check_images(images))
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="area")
    return tensor.reshape(len(tensor), -1).numpy().astype(np.float64)


@dataclass
class PixelPCAFeatures:
    """PCA of downsampled pixels + z-scored intensity statistics, fitted on real images."""

    pca: PCA
    pca_scale: float
    stats_mean: np.ndarray
    stats_std: np.ndarray
    resolution: int

    name = "pixel_pca"

    @classmethod
    def fit(cls, images: np.ndarray, components: int = 24, resolution: int = 32, seed: int = 0) -> "PixelPCAFeatures":
        pixels = downsample(images, resolution)
        n_components = min(components, len(pixels) - 1, pixels.shape[1])
        if n_components < 1:
            raise ValueError(f"cannot fit a PCA feature space on {len(pixels)} image(s)")
        if n_components < components:
            log.warning("PCA feature space: only %d images, using %d components instead of %d", len(pixels), n_components, components)
        pca = PCA(n_components=n_components, svd_solver="full", random_state=seed).fit(pixels)
        # One scale for all components keeps their relative variance (whitening would blow up the
        # noise components) while giving the block an average per-dimension variance of 1, the
        # same as each z-scored statistic, so neither block dominates the kernel or the distances.
        pca_scale = float(np.sqrt(pca.explained_variance_.mean())) or 1.0
        stats = intensity_statistics(images)
        stats_std = stats.std(axis=0)
        stats_std[stats_std < 1e-8] = 1.0  # a constant statistic contributes 0, not NaN
        return cls(pca, pca_scale, stats.mean(axis=0), stats_std, resolution)

    @property
    def dim(self) -> int:
        return int(self.pca.n_components_) + len(INTENSITY_FEATURE_NAMES)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        scores = self.pca.transform(downsample(images, self.resolution)) / self.pca_scale
        stats = (intensity_statistics(images) - self.stats_mean) / self.stats_std
        return np.hstack([scores, stats])


def find_inception_weights(explicit: str | None = None) -> tuple[Path | None, str]:
    """The Inception-v3 weights file if it is on disk, else None and why. Never downloads."""
    if explicit:
        path = Path(explicit)
        return (path, f"weights at {path}") if path.is_file() else (None, f"inception weights path {path} does not exist")
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(checkpoints.glob(INCEPTION_WEIGHTS_GLOB))
    if found:
        return found[-1], f"weights at {found[-1]}"
    return None, f"no {INCEPTION_WEIGHTS_GLOB} in {checkpoints} and no synthetic.inception_weights given (never downloaded)"


class InceptionFeatures:
    """2048-d average-pool features of torchvision's Inception-v3, from a local weights file."""

    name = "inception_v3"
    dim = 2048

    def __init__(self, weights_path: Path, batch_size: int = 32, device: str = "cpu"):
        from torchvision.models import inception_v3

        # init_weights=False: the random initialisation would be overwritten anyway, and it is slow.
        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc="inception features", unit="batch", leave=False):
            batch = torch.from_numpy(images[start : start + self.batch_size]).to(self.device)
            batch = ((batch + 1.0) / 2.0).repeat(1, 3, 1, 1)
            batch = F.interpolate(batch, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False)
            out.append(self.model((batch - mean) / std).cpu().numpy())
        return np.concatenate(out).astype(np.float64)
