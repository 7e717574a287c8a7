"""The embedded default data set: a deterministic chest-CT phantom in the Kaggle layout.

Each image is one simulated axial chest slice:

    patient anatomy (HU map)  ->  attenuation  ->  Radon transform  ->  Poisson photon noise
      ->  filtered back projection  ->  HU  ->  lung window  ->  crop/resize like a screenshot  ->  PNG

Anatomy varies per patient (body and lung size, fat, ribs, heart level, parenchymal density,
vessel tree). `squamous` slices carry a central / hilar mass with irregular, spiculated margins,
sometimes cavitated, often partly hidden against the mediastinum. Every slice (both classes)
carries benign look-alikes: vessel cross-sections that crowd the hilum, prominent hilar vessels
and small (sometimes calcified) granulomas. That overlap is what keeps a classifier below 100 %.

Determinism: each image's random generator is seeded from (seed, split, class, index) only, so
the files do not depend on the worker count or order, and PNGs carry no timestamps or metadata.
The acquisition is simulated on a GRID x GRID grid (scikit-image radon/iradon), which costs
~0.1 s per slice on one core; the whole default set takes well under a minute on two cores.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ctsynth.data.preprocess import lung_window

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Kaggle "Chest CT-Scan images" folder names: the train/valid folders add the TNM stage.
KAGGLE_FOLDERS: dict[str, dict[str, str]] = {
    "train": {"normal": "normal", "squamous": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa"},
    "valid": {"normal": "normal", "squamous": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa"},
    "test": {"normal": "normal", "squamous": "squamous.cell.carcinoma"},
}
# The real set's split sizes for the two classes of the study.
DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "train": {"normal": 148, "squamous": 155},
    "valid": {"normal": 13, "squamous": 15},
    "test": {"normal": 54, "squamous": 90},
}
CLASSES = ("normal", "squamous")

GRID = 176  # simulation grid (pixels); 400 mm field of view -> ~2.3 mm pixels
N_ANGLES = 120  # projections over 180 degrees
FOV_MM = 400.0
MU_WATER_PER_MM = 0.019  # linear attenuation of water at ~70 keV

HU_AIR = -1000.0
HU_LUNG = -860.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 45.0
HU_BONE = 700.0
HU_MARROW = 250.0


@dataclass(frozen=True)
class SliceSpec:
    """What one image is: where it goes and which random stream draws it."""

    split: str
    label: str
    index: int
    seed: int

    @property
    def folder(self) -> str:
        return KAGGLE_FOLDERS[self.split][self.label]

    @property
    def filename(self) -> str:
        return f"phantom_{self.index:04d}.png"

    def rng(self) -> np.random.Generator:
        # Stable integers only (no hash() of strings, which is salted per process).
        key = [self.seed, SPLITS.index(self.split), CLASSES.index(self.label), self.index]
        return np.random.default_rng(np.random.SeedSequence(key))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    # x to the right (patient's left), y down (posterior), both in [-1, 1].
    coords = (np.arange(GRID, dtype=np.float64) + 0.5) / GRID * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _irregular_blob(x, y, cx, cy, radius, rng, lobulation: float, spiculation: float) -> np.ndarray:
    """A lobulated, spiculated blob: r(theta) = radius * (1 + low-order lobes + thin spikes)."""
    theta = np.arctan2(y - cy, x - cx)
    rho = np.hypot(x - cx, y - cy)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += lobulation * rng.uniform(0.2, 1.0) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # Spicules: narrow angular bumps that reach out into the parenchyma.
    for _ in range(rng.integers(0, 9)):
        centre = rng.uniform(-np.pi, np.pi)
        width = rng.uniform(0.04, 0.12)
        delta = np.angle(np.exp(1j * (theta - centre)))
        boundary += spiculation * rng.uniform(0.3, 1.0) * np.exp(-0.5 * (delta / width) ** 2)
    return rho <= radius * boundary


def _smooth_field(rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((GRID, GRID)), sigma)
    return field / (field.std() + 1e-8)


def simulate_anatomy(rng: np.random.Generator, squamous: bool) -> np.ndarray:
    """One patient's axial slice as a HU map on the simulation grid."""
    x, y = _grid()
    hu = np.full((GRID, GRID), HU_AIR)

    # Body: fat envelope, muscle wall, thoracic cavity.
    body_ax = rng.uniform(0.74, 0.88)
    body_ay = body_ax * rng.uniform(0.62, 0.78)
    body_cy = rng.uniform(-0.04, 0.06)
    body = _ellipse(x, y, 0.0, body_cy, body_ax, body_ay)
    hu[body] = HU_FAT
    fat = rng.uniform(0.025, 0.09)
    wall = _ellipse(x, y, 0.0, body_cy, body_ax - fat, body_ay - fat)
    hu[wall] = HU_SOFT
    muscle = rng.uniform(0.035, 0.06)
    cav_ax, cav_ay = body_ax - fat - muscle, body_ay - fat - muscle
    cavity = _ellipse(x, y, 0.0, body_cy + 0.01, cav_ax, cav_ay)

    # Lungs: two deformed ellipses either side of the mediastinum.
    lungs = np.zeros_like(body)
    hila = []
    for side in (-1.0, 1.0):
        lcx = side * cav_ax * rng.uniform(0.45, 0.55)
        lcy = body_cy + rng.uniform(-0.02, 0.05)
        lax = cav_ax * rng.uniform(0.40, 0.50)
        lay = cav_ay * rng.uniform(0.82, 0.95)
        theta = np.arctan2(y - lcy, x - lcx)
        rho = np.sqrt(((x - lcx) / lax) ** 2 + ((y - lcy) / lay) ** 2)
        edge = 1.0
        for k in range(2, 5):
            edge = edge + rng.uniform(0.0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        lungs |= (rho <= edge) & cavity
        hila.append((lcx - side * lax * rng.uniform(0.55, 0.75), lcy + rng.uniform(-0.08, 0.04)))
    mediastinum_half_width = rng.uniform(0.10, 0.16)
    mediastinum = (np.abs(x - rng.uniform(-0.02, 0.04)) < mediastinum_half_width) & cavity
    heart_level = rng.random() < 0.55
    if heart_level:
        heart = _ellipse(x, y, rng.uniform(0.06, 0.16), body_cy - cav_ay * rng.uniform(0.1, 0.3),
                         rng.uniform(0.18, 0.26), rng.uniform(0.15, 0.22), rng.uniform(-0.6, -0.2))
        mediastinum |= heart & cavity
    lungs &= ~mediastinum

    # Parenchyma: density varies smoothly and rises towards the back (gravity).
    parenchyma = HU_LUNG + rng.uniform(-25, 25) + 18.0 * _smooth_field(rng, 6.0) + 45.0 * np.clip(y - body_cy, 0, None)
    hu[lungs] = parenchyma[lungs]
    hu[mediastinum & ~lungs] = HU_SOFT + 10.0 * _smooth_field(rng, 3.0)[mediastinum & ~lungs]
    # Mediastinal fat and the great vessels.
    hu[_ellipse(x, y, 0.0, body_cy - cav_ay * 0.55, 0.06, 0.05) & mediastinum] = HU_FAT
    aorta_r = rng.uniform(0.045, 0.065)
    aorta = _ellipse(x, y, rng.uniform(0.04, 0.1), body_cy + cav_ay * rng.uniform(0.35, 0.55), aorta_r, aorta_r)
    hu[aorta & cavity] = HU_BLOOD + rng.uniform(0, 120)  # with or without contrast
    # Spine (posterior midline), sternum, ribs.
    spine_cy = body_cy + body_ay - fat - rng.uniform(0.13, 0.17)
    vertebra = _ellipse(x, y, 0.0, spine_cy, 0.085, 0.075)
    hu[vertebra] = HU_MARROW
    hu[vertebra & ~_ellipse(x, y, 0.0, spine_cy, 0.07, 0.06)] = HU_BONE
    hu[_ellipse(x, y, 0.0, spine_cy + 0.11, 0.03, 0.025)] = 15.0  # spinal canal
    hu[_ellipse(x, y, 0.0, body_cy - body_ay + fat + 0.03, 0.05, 0.018)] = HU_BONE  # sternum
    for angle in np.linspace(0.0, 2 * np.pi, rng.integers(10, 15), endpoint=False) + rng.uniform(0, 0.3):
        if abs(np.sin(angle)) > 0.9:  # no ribs at the front and back midline
            continue
        rx = np.cos(angle) * (cav_ax + muscle * 0.5)
        ry = body_cy + np.sin(angle) * (cav_ay + muscle * 0.5)
        hu[_ellipse(x, y, rx, ry, 0.03, 0.015, angle + np.pi / 2)] = HU_BONE

    # Vessel tree: cross-sections and short in-plane segments, thick near the hilum.
    for hx, hy in hila:
        for _ in range(rng.integers(45, 85)):
            distance = rng.beta(1.2, 2.2)
            direction = rng.uniform(0, 2 * np.pi)
            vx = hx + distance * np.cos(direction) * cav_ax * 0.55
            vy = hy + distance * np.sin(direction) * cav_ay * 0.85
            radius = (0.018 * (1.0 - distance) ** 1.5 + 0.005) * rng.uniform(0.6, 1.3)
            length = radius * (rng.uniform(1.0, 4.0) if rng.random() < 0.4 else 1.0)
            vessel = _ellipse(x, y, vx, vy, length, radius, direction) & lungs
            hu[vessel] = HU_BLOOD + rng.uniform(-20, 20)
        # Prominent hilar vessels / lymph nodes: the benign look-alike of a central mass.
        if rng.random() < 0.35:
            for _ in range(rng.integers(1, 3)):
                r = rng.uniform(0.02, 0.045)
                node = _ellipse(x, y, hx + rng.normal(0, 0.05), hy + rng.normal(0, 0.06), r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
                hu[node & (lungs | mediastinum)] = HU_SOFT + rng.uniform(-10, 20)
    # Granulomas: small nodules, a third of them calcified.
    lung_points = np.argwhere(lungs)
    for _ in range(rng.poisson(1.6)):
        py, px = lung_points[rng.integers(len(lung_points))]
        r = rng.uniform(0.012, 0.035)
        nodule = _ellipse(x, y, x[py, px], y[py, px], r, r * rng.uniform(0.8, 1.0)) & lungs
        hu[nodule] = rng.uniform(200, 500) if rng.random() < 0.33 else HU_SOFT + rng.uniform(-15, 15)

    if squamous:
        hx, hy = hila[int(rng.integers(2))]
        side = np.sign(hx) if hx != 0 else 1.0
        radius = rng.uniform(0.07, 0.17)
        # Central: at the hilum, pushed partly into the lung (or hiding in the mediastinum).
        cx = hx + side * rng.uniform(0.05, 0.16)
        cy = hy + rng.normal(0.0, 0.06)
        mass = _irregular_blob(x, y, cx, cy, radius, rng, lobulation=rng.uniform(0.1, 0.45), spiculation=rng.uniform(0.1, 0.6))
        mass &= lungs | mediastinum
        hu[mass] = HU_SOFT + rng.uniform(-15, 10) + 12.0 * _smooth_field(rng, 1.5)[mass]
        if rng.random() < 0.3:  # cavitation: an eccentric air pocket inside the mass
            inner = _irregular_blob(x, y, cx + rng.normal(0, radius * 0.2), cy + rng.normal(0, radius * 0.2),
                                    radius * rng.uniform(0.3, 0.55), rng, lobulation=0.3, spiculation=0.0)
            hu[inner & mass] = HU_AIR + 50.0
    return hu


def acquire(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT acquisition: line integrals, Poisson photon noise, filtered back projection -> HU."""
    from skimage.transform import iradon, radon

    pixel_mm = FOV_MM / GRID
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0, None) * pixel_mm
    theta = np.linspace(0.0, 180.0, N_ANGLES, endpoint=False)
    sinogram = radon(mu, theta=theta, circle=True)
    photons = rng.uniform(2e3, 3e4)  # per detector bin; low dose -> visibly noisy slices
    counts = rng.poisson(photons * np.exp(-sinogram)).clip(1, None)
    noisy = -np.log(counts / photons)
    filter_name = ("ramp", "shepp-logan", "hann")[int(rng.integers(3))]  # reconstruction kernel varies
    recon = iradon(noisy, theta=theta, circle=True, filter_name=filter_name, output_size=GRID)
    return (recon / pixel_mm / MU_WATER_PER_MM - 1.0) * 1000.0


def render_screenshot(window: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Crop and resize like the Kaggle set's exported slices: widths 200-500, varied aspect, mixed modes."""
    rows = np.where(window.max(axis=1) > 0.02)[0]
    cols = np.where(window.max(axis=0) > 0.02)[0]
    top, bottom = (rows[0], rows[-1]) if len(rows) else (0, GRID - 1)
    left, right = (cols[0], cols[-1]) if len(cols) else (0, GRID - 1)
    margin_x = int(rng.integers(0, 14))
    margin_y = int(rng.integers(0, 20))
    box = (max(left - margin_x, 0), max(top - margin_y, 0), min(right + margin_x + 1, GRID), min(bottom + margin_y + 1, GRID))
    crop = Image.fromarray(np.clip(np.rint(window * 255.0), 0, 255).astype(np.uint8), mode="L").crop(box)
    aspect = crop.height / crop.width * rng.uniform(0.9, 1.12)
    width = int(rng.integers(200, 501))
    height = int(np.clip(round(width * aspect), 150, 400))
    image = crop.resize((width, height), Image.Resampling.BICUBIC)
    mode_draw = rng.random()
    if mode_draw < 0.35:
        return image
    if mode_draw < 0.85:
        return image.convert("RGB")
    return image.convert("RGBA")


def render_slice(spec: SliceSpec) -> Image.Image:
    """The full chain for one image; depends only on `spec`."""
    rng = spec.rng()
    hu = simulate_anatomy(rng, squamous=spec.label == "squamous")
    reconstructed = acquire(hu, rng)
    return render_screenshot(lung_window(reconstructed), rng)


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG: fixed compression, no text chunks, no timestamps."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _write_one(job: tuple[SliceSpec, str]) -> str:
    spec, out = job
    target = Path(out) / spec.split / spec.folder / spec.filename
    target.write_bytes(png_bytes(render_slice(spec)))
    return str(target)


def slice_specs(seed: int, counts: Mapping[str, Mapping[str, int]] = DEFAULT_COUNTS) -> list[SliceSpec]:
    return [
        SliceSpec(split=split, label=label, index=index, seed=seed)
        for split in SPLITS
        if split in counts
        for label in CLASSES
        for index in range(counts[split].get(label, 0))
    ]


def write_phantom_dataset(
    out: Path,
    seed: int = 0,
    workers: int = 2,
    counts: Mapping[str, Mapping[str, int]] | None = None,
) -> list[Path]:
    """Write the phantom set into `out` in the Kaggle layout; returns the written files.

    `counts` overrides the per-split, per-class sizes (tests use a few images per class).
    """
    out = Path(out)
    specs = slice_specs(seed, counts or DEFAULT_COUNTS)
    for spec in specs:
        (out / spec.split / spec.folder).mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(out)) for spec in specs]
    workers = max(1, min(workers, len(jobs)))
    log.info("writing %d phantom slices (seed %d) to %s with %d worker(s)", len(jobs), seed, out, workers)
    progress = dict(total=len(jobs), desc="phantom", unit="img", disable=None)
    if workers == 1:
        written = [_write_one(job) for job in tqdm(jobs, **progress)]
    else:
        # One BLAS/OpenMP thread per process: the workers are the parallelism.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            written = list(tqdm(pool.imap(_write_one, jobs, chunksize=4), **progress))
    return [Path(p) for p in written]
