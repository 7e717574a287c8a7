"""Adaptive discriminator augmentation (ADA, Karras et al. 2020b), pipeline "bgc".

Every image the discriminator sees -- real and generated, in every loss term --
goes through ``AugmentPipe``. Each transform is applied to each image
independently with probability ``p`` (strength-scaled), and all of them are
differentiable so G learns through them. If ``p`` stays below ~0.8 the
augmentations do not "leak" into generated images, because D cannot tell an
augmented distribution from the clean one's augmentation.

Geometric transforms ("blit" + "geom") are composed into one 3x3 matrix per
image and applied once: reflect pad, 2x upsample with an orthonormal wavelet
low-pass (symlet, 12 taps), bilinear resample (``affine_grid`` +
``bilinear_sample``), 2x downsample with the same wavelet reversed. Because the
wavelet is orthonormal the up/down pair is an exact round trip: an image whose
matrix is the identity, a flip, a quarter turn or a whole-pixel shift is
reproduced pixel for pixel, and D never sees a blurred copy of a real image. Colour transforms are composed
into one 4x4 matrix on (r, g, b, 1). Hue and saturation are skipped for
1-channel images (on grey they are the identity anyway).

``AdaptiveP`` adjusts ``p`` from the overfitting heuristic
``r_t = E[sign(D(x_real))]`` with target 0.6.

Double backward: R1 needs the gradient of ``||d D(aug(x)) / dx||^2`` with
respect to D's parameters, so the resampling must be twice differentiable in
its input. ``torch.nn.functional.grid_sample`` is only on recent PyTorch
(2.11 raises "derivative for aten::grid_sampler_2d_backward is not
implemented"; 2.14 has it), so the bilinear resample here is written with
``gather`` (backward: ``scatter_add``, whose backward is ``gather`` again) and
matches ``grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)``. Reflect padding and the FIR filters (convolutions) are
twice differentiable too. ``tests/test_gan_augment.py`` checks both with
``torch.autograd.gradgradcheck``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ctsynth.gan.ops import setup_filter, upfirdn2d

__all__ = ["AUGMENT_SPECS", "AugmentPipe", "AdaptiveP", "bilinear_sample", "wavelet_lowpass"]

logger = logging.getLogger(__name__)

# Strength multipliers per transform for each named pipeline (1 = apply with probability p).
_BLIT = {"xflip": 1.0, "rotate90": 1.0, "xint": 1.0}
_GEOM = {"scale": 1.0, "rotate": 1.0, "aniso": 1.0, "xfrac": 1.0}
_COLOR = {"brightness": 1.0, "contrast": 1.0, "lumaflip": 1.0, "hue": 1.0, "saturation": 1.0}
AUGMENT_SPECS: dict[str, dict[str, float]] = {
    "blit": _BLIT,
    "geom": _GEOM,
    "color": _COLOR,
    "bg": {**_BLIT, **_GEOM},
    "bgc": {**_BLIT, **_GEOM, **_COLOR},
}

# Distribution parameters (ADA paper, appendix B).
DEFAULT_RANGES: dict[str, float] = {
    "xint_max": 0.125,  # integer translation: uniform in +-0.125 of the image size
    "scale_std": 0.2,  # isotropic scale: 2**N(0, 0.2^2), i.e. lognormal with std 0.2 ln 2
    "rotate_max": 1.0,  # rotation: uniform in +-rotate_max * pi
    "aniso_std": 0.2,  # anisotropic scale: 2**N(0, 0.2^2)
    "xfrac_std": 0.125,  # fractional translation: N(0, 0.125^2) of the image size
    "brightness_std": 0.2,  # additive: N(0, 0.2^2)
    "contrast_std": 0.5,  # multiplicative: 2**N(0, 0.5^2)
    "hue_max": 1.0,  # rotation about the luma axis: uniform in +-hue_max * pi
    "saturation_std": 1.0,  # 2**N(0, 1)
}


@functools.lru_cache(maxsize=None)
def _symlet_taps(order: int) -> tuple[float, ...]:
    """Least-asymmetric orthonormal Daubechies low-pass ("symlet") with ``order`` vanishing moments.

    Daubechies' construction: ``H(w) = ((1 + e^-iw) / 2)^order * L(w)`` with
    ``|L(w)|^2 = P(sin^2(w/2))``, ``P(y) = sum_k C(order-1+k, k) y^k``. Each root ``y_k`` of P gives
    a reciprocal pair of roots ``z, 1/z`` of ``z + 1/z = 2 - 4 y_k``; any choice of one root per pair
    (conjugates chosen alike, so the taps are real) is a valid spectral factor. Of those, the symlet
    is the one whose phase is closest to linear (least shift of detail between frequencies).
    """
    roots_y = np.roots([math.comb(order - 1 + k, k) for k in range(order)][::-1])
    best: tuple[float, np.ndarray] | None = None
    w = np.linspace(0, 0.9 * math.pi, 256)
    for choice in itertools.product((0, 1), repeat=len(roots_y)):
        zeros = []
        for y, pick in zip(roots_y, choice):
            pair = sorted(np.roots([1, -(2 - 4 * y), 1]), key=abs)
            zeros.append(pair[pick])
        taps = np.poly(zeros)
        for _ in range(order):
            taps = np.convolve(taps, [0.5, 0.5])
        if np.abs(taps.imag).max() > 1e-9:  # conjugate roots chosen differently: complex taps
            continue
        taps = taps.real / taps.real.sum()
        phase = np.unwrap(np.angle(np.exp(-1j * np.outer(w, np.arange(len(taps)))) @ taps))
        design = np.stack([w, np.ones_like(w)], axis=1)
        residual = phase - design @ np.linalg.lstsq(design, phase, rcond=None)[0]
        if best is None or np.abs(residual).max() < best[0] - 1e-9:
            best = (float(np.abs(residual).max()), taps)
    assert best is not None
    return tuple(float(t) for t in best[1])


def wavelet_lowpass(order: int = 6) -> torch.Tensor:
    """The symlet low-pass of ``order`` (``2 * order`` taps), normalised to sum 1.

    Orthonormality (``sum_n h[n] h[n + 2m] = 0`` for ``m != 0``) is what makes the 2x resampling
    chain exact: upsampling with ``h`` and downsampling with the reversed ``h`` reconstructs the
    input, so an image with no transform drawn, or an integer shift, comes out unchanged.
    """
    if order < 1:
        raise ValueError(f"wavelet order must be >= 1, got {order}")
    return setup_filter(torch.tensor(_symlet_taps(order), dtype=torch.float64).float())


def bilinear_sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Twice-differentiable (in ``images``) bilinear sampling.

    Same result as ``F.grid_sample(images, grid, mode='bilinear',
    padding_mode='zeros', align_corners=False)``: ``grid`` is ``N x Ho x Wo x 2``
    in normalised ``[-1, 1]`` coordinates (x, y), where -1 and 1 are the outer
    edges of the border pixels. ``grid`` is treated as a constant (no gradient).
    """
    batch, channels, height, width = images.shape
    out_h, out_w = grid.shape[1], grid.shape[2]
    grid = grid.detach()
    x = ((grid[..., 0] + 1) * width - 1) / 2  # pixel-index coordinates
    y = ((grid[..., 1] + 1) * height - 1) / 2
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0).to(images.dtype), (y - y0).to(images.dtype)
    x0, y0 = x0.long(), y0.long()
    flat = images.reshape(batch, channels, height * width)
    out: torch.Tensor | None = None
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)  # zeros outside
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).reshape(batch, 1, out_h * out_w)
            values = flat.gather(2, index.expand(batch, channels, out_h * out_w)).reshape(batch, channels, out_h, out_w)
            term = values * (wx * wy * inside).unsqueeze(1)
            out = term if out is None else out + term
    assert out is not None
    return out


# ---------------------------------------------------------------------------
# Batched homogeneous matrices
# ---------------------------------------------------------------------------


def _matrix(rows: list[list[torch.Tensor | float]], batch: int, device: torch.device) -> torch.Tensor:
    """Stack scalars / per-sample vectors into a ``batch x n x n`` matrix."""
    elems = []
    for row in rows:
        for value in row:
            t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=device)
            elems.append(t.to(device=device, dtype=torch.float32).expand(batch))
    n = len(rows)
    return torch.stack(elems, dim=-1).reshape(batch, n, n)


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    b, d = tx.shape[0], tx.device
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], b, d)


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    b, d = sx.shape[0], sx.device
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], b, d)


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    b, d = theta.shape[0], theta.device
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], b, d)


def _translate3d(t: torch.Tensor) -> torch.Tensor:
    b, d = t.shape[0], t.device
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], b, d)


def _scale3d(s: torch.Tensor) -> torch.Tensor:
    b, d = s.shape[0], s.device
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], b, d)


def _rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation by ``theta`` about the unit ``axis`` (3,), as 4x4 homogeneous matrices."""
    b, d = theta.shape[0], theta.device
    vx, vy, vz = (float(a) for a in axis)
    c, s = torch.cos(theta), torch.sin(theta)
    cc = 1 - c
    return _matrix(
        [
            [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
            [0, 0, 0, 1],
        ],
        b,
        d,
    )


def _maps_pixel_centres_to_pixel_centres(g: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per matrix: is it a signed permutation of the axes plus a translation that takes the first
    pixel centre onto a pixel centre (then, the 2x2 part being integral, every centre is)."""
    linear = g[:, :2, :2]
    integral = ((linear - linear.round()).abs() < 1e-5).all(dim=(1, 2)) & (linear.round().abs().sum(dim=1) == 1).all(dim=1)
    first = torch.tensor([0.5 - width / 2, 0.5 - height / 2, 1.0], device=g.device)
    lands = (g @ first)[:, :2] - first[:2]
    on_centre = ((lands - lands.round()).abs() < 1e-4).all(dim=1)
    return integral & on_centre & (g[:, 2] == torch.tensor([0.0, 0.0, 1.0], device=g.device)).all(dim=1)


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


class AugmentPipe(nn.Module):
    """Differentiable ADA augmentation of ``N x C x H x W`` images in ``[-1, 1]``.

    Args:
        spec: one of ``AUGMENT_SPECS`` (``'bgc'`` is the paper's default).
        wavelet_order: vanishing moments of the symlet used for 2x up/down resampling
            (``2 * wavelet_order`` taps; 6 as in the ADA paper).
        **ranges: override entries of ``DEFAULT_RANGES``.

    ``p`` is a 0-d buffer (so it is saved in ``state_dict`` and moves with
    ``.to(device)``); ``AdaptiveP`` or a fixed value sets it. With ``p == 0``
    the forward pass returns its input unchanged.
    """

    def __init__(self, spec: str = "bgc", wavelet_order: int = 6, **ranges: float) -> None:
        super().__init__()
        if spec not in AUGMENT_SPECS:
            raise ValueError(f"unknown augment spec {spec!r}; expected one of {sorted(AUGMENT_SPECS)}")
        unknown = set(ranges) - set(DEFAULT_RANGES)
        if unknown:
            raise ValueError(f"unknown augmentation ranges {sorted(unknown)}; expected some of {sorted(DEFAULT_RANGES)}")
        self.spec = spec
        self.strengths = {name: 0.0 for name in AUGMENT_SPECS["bgc"]} | AUGMENT_SPECS[spec]
        self.ranges = DEFAULT_RANGES | {k: float(v) for k, v in ranges.items()}
        self.register_buffer("p", torch.zeros([]))
        self.register_buffer("lowpass", wavelet_lowpass(wavelet_order), persistent=False)
        # Offset of the filter's centre of mass from the centre of its taps, in original pixels
        # (2x samples / 2); see ``_warp``.
        taps = self.lowpass.double()
        centre_of_mass = float((torch.arange(len(taps), dtype=torch.float64) * taps).sum() / taps.sum())
        self.lowpass_shift = (centre_of_mass - (len(taps) - 1) / 2) / 2
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3.0)
        self.register_buffer("luma_axis", luma, persistent=False)

    # -- random parameters -------------------------------------------------

    def _gate(self, values: torch.Tensor, identity: float, strength: float, prob: torch.Tensor | None = None) -> torch.Tensor:
        """Keep each sample's random value with probability ``strength * p``, else the identity value."""
        prob = self.p * strength if prob is None else prob
        keep = torch.rand(values.shape[0], device=values.device) < prob
        keep = keep.reshape([-1] + [1] * (values.ndim - 1))
        return torch.where(keep, values, torch.full_like(values, identity))

    def _geometric_matrix(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``batch x 3 x 3`` matrices mapping output pixel coordinates to input coordinates.

        Coordinates are in pixels, centred on the image (pixel ``j`` at
        ``j + 0.5 - W/2``), so flips, 90-degree rotations and integer shifts map
        pixel centres onto pixel centres. All distributions are symmetric, so
        building the inverse transform directly has the same law as inverting it.
        """
        s, r = self.strengths, self.ranges
        g = torch.eye(3, device=device).repeat(batch, 1, 1)
        if s["xflip"] > 0:
            flip = self._gate(torch.randint(0, 2, (batch,), device=device).float(), 0.0, s["xflip"])
            g = g @ _scale2d(1 - 2 * flip, torch.ones_like(flip))
        if s["rotate90"] > 0:
            quarter = self._gate(torch.randint(0, 4, (batch,), device=device).float(), 0.0, s["rotate90"])
            g = g @ _rotate2d(-math.pi / 2 * quarter)
        if s["xint"] > 0:
            t = (torch.rand(batch, 2, device=device) * 2 - 1) * r["xint_max"]
            t = self._gate(t, 0.0, s["xint"])
            g = g @ _translate2d(torch.round(t[:, 0] * width), torch.round(t[:, 1] * height))
        if s["scale"] > 0:
            scale = self._gate(torch.exp2(torch.randn(batch, device=device) * r["scale_std"]), 1.0, s["scale"])
            g = g @ _scale2d(scale, scale)
        # Rotation is applied twice, before and after the anisotropic scale, each
        # time with p_rot = 1 - sqrt(1 - p): the chance of at least one rotation is p.
        p_rot = 1 - torch.sqrt(torch.clamp(1 - self.p * s["rotate"], 0, 1))
        if s["rotate"] > 0:
            theta = self._gate((torch.rand(batch, device=device) * 2 - 1) * math.pi * r["rotate_max"], 0.0, 1.0, p_rot)
            g = g @ _rotate2d(-theta)
        if s["aniso"] > 0:
            aniso = self._gate(torch.exp2(torch.randn(batch, device=device) * r["aniso_std"]), 1.0, s["aniso"])
            g = g @ _scale2d(aniso, 1 / aniso)
        if s["rotate"] > 0:
            theta = self._gate((torch.rand(batch, device=device) * 2 - 1) * math.pi * r["rotate_max"], 0.0, 1.0, p_rot)
            g = g @ _rotate2d(-theta)
        if s["xfrac"] > 0:
            t = self._gate(torch.randn(batch, 2, device=device) * r["xfrac_std"], 0.0, s["xfrac"])
            g = g @ _translate2d(t[:, 0] * width, t[:, 1] * height)
        return g

    def _color_matrix(self, batch: int, channels: int, device: torch.device) -> torch.Tensor:
        """``batch x 4 x 4`` matrices acting on ``(r, g, b, 1)``; applied left to right in list order."""
        s, r = self.strengths, self.ranges
        m = torch.eye(4, device=device).repeat(batch, 1, 1)
        v = self.luma_axis.to(device)
        vvt = torch.outer(v, v)
        if s["brightness"] > 0:
            b = self._gate(torch.randn(batch, device=device) * r["brightness_std"], 0.0, s["brightness"])
            m = _translate3d(b) @ m
        if s["contrast"] > 0:
            c = self._gate(torch.exp2(torch.randn(batch, device=device) * r["contrast_std"]), 1.0, s["contrast"])
            m = _scale3d(c) @ m
        if s["lumaflip"] > 0:
            flip = self._gate(torch.randint(0, 2, (batch,), device=device).float(), 0.0, s["lumaflip"])
            # Householder reflection through the plane orthogonal to the luma axis.
            m = (torch.eye(4, device=device) - 2 * vvt * flip.reshape(-1, 1, 1)) @ m
        if channels > 1 and s["hue"] > 0:
            theta = self._gate((torch.rand(batch, device=device) * 2 - 1) * math.pi * r["hue_max"], 0.0, s["hue"])
            m = _rotate3d(v[:3], theta) @ m
        if channels > 1 and s["saturation"] > 0:
            sat = self._gate(torch.exp2(torch.randn(batch, device=device) * r["saturation_std"]), 1.0, s["saturation"])
            m = (vvt + (torch.eye(4, device=device) - vvt) * sat.reshape(-1, 1, 1)) @ m
        return m

    # -- application --------------------------------------------------------

    def _resample(self, images: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Apply the per-image geometric matrices ``g`` (output -> input pixel coordinates).

        Images whose matrix maps pixel centres onto pixel centres (the identity, flips, quarter
        turns, whole-pixel shifts: every "blit" draw) are copied pixel by pixel from the
        reflect-padded input, with no filter at all. The others (a scale, rotation, anisotropy or
        fractional shift was drawn) go through the 2x wavelet supersampling in ``_warp``.
        """
        batch, channels, height, width = images.shape
        g = g.to(torch.float32)  # geometry in float32 whatever the image dtype
        exact = _maps_pixel_centres_to_pixel_centres(g, height, width)
        if exact.all() and torch.equal(g, torch.eye(3, device=g.device).expand_as(g)):
            return images
        taps = self.lowpass.shape[0]
        # Reflect padding that covers where the corners of the (larger) 2x grid of _warp land,
        # plus the upsampling filter's support; at most size - 1 (reflect's limit).
        cx, cy = width / 2 + (taps - 2) / 4, height / 2 + (taps - 2) / 4
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=g.device).T
        src = (g @ corners)[:, :2]  # N x 2 x 4
        lo, hi = src.amin(dim=(0, 2)), src.amax(dim=(0, 2))
        need = torch.stack([-width / 2 - lo[0], hi[0] - width / 2, -height / 2 - lo[1], hi[1] - height / 2])
        px0, px1, py0, py1 = (need + taps / 4 + 1).ceil().clamp(min=0).tolist()
        px0, px1 = int(min(px0, width - 1)), int(min(px1, width - 1))
        py0, py1 = int(min(py0, height - 1)), int(min(py1, height - 1))
        padded = F.pad(images, [px0, px1, py0, py1], mode="reflect")
        # Centred pixel coordinates -> the padded image's normalised [-1, 1] coordinates.
        padded_w, padded_h = width + px0 + px1, height + py0 + py1
        to_normalised = torch.tensor(
            [[2 / padded_w, 0, (px0 - px1) / padded_w], [0, 2 / padded_h, (py0 - py1) / padded_h], [0, 0, 1]],
            device=g.device,
        )

        parts, order = [], []
        copy_idx, warp_idx = exact.nonzero().flatten(), (~exact).nonzero().flatten()
        if len(copy_idx):
            to_pixels = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=g.device))
            theta = (to_normalised @ g[copy_idx] @ to_pixels)[:, :2].to(images.dtype)
            grid = F.affine_grid(theta, [len(copy_idx), channels, height, width], align_corners=False)
            parts.append(bilinear_sample(padded[copy_idx], grid))
            order.append(copy_idx)
        if len(warp_idx):
            parts.append(self._warp(padded[warp_idx], g[warp_idx], to_normalised, height, width))
            order.append(warp_idx)
        if len(order) == 1:
            return parts[0]
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def _warp(
        self, padded: torch.Tensor, g: torch.Tensor, to_normalised: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """2x upsample with the symlet, bilinear resample by ``g``, 2x downsample with it reversed.

        The symlet is not symmetric: its centre of mass sits ``shift`` pixels off the centre of
        its taps, so the upsampled image is displaced by ``shift`` and the reversed filter of the
        downsample displaces back. For the identity that cancels exactly; for a rotation it would
        not (the displacement would rotate), so ``g`` is conjugated by that translation: the
        resample undoes the upsample's displacement and pre-applies the downsample's.
        """
        batch, channels = padded.shape[:2]
        f = self.lowpass
        taps = f.shape[0]
        # The 2x grid covers the image plus a margin of (taps-2)/4 pixels, so that the final
        # unpadded downsample yields exactly H x W, centred.
        grid_h, grid_w = 2 * height + taps - 2, 2 * width + taps - 2
        x = upfirdn2d(padded, f, up=2, padding=(taps // 2, taps // 2 - 1, taps // 2, taps // 2 - 1), gain=4)
        to_pixels = torch.diag(torch.tensor([grid_w / 4, grid_h / 4, 1.0], device=g.device))
        shift = self.lowpass_shift
        centred = _translate2d(-shift * torch.ones(1, device=g.device), -shift * torch.ones(1, device=g.device))
        uncentred = _translate2d(shift * torch.ones(1, device=g.device), shift * torch.ones(1, device=g.device))
        theta = (to_normalised @ uncentred @ g @ centred @ to_pixels)[:, :2].to(x.dtype)
        grid = F.affine_grid(theta, [batch, channels, grid_h, grid_w], align_corners=False)
        x = bilinear_sample(x, grid)
        return upfirdn2d(x, f, down=2, flip_filter=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected N x C x H x W images, got shape {tuple(images.shape)}")
        if float(self.p) <= 0:
            return images
        batch, channels, height, width = images.shape
        device = images.device
        x = images

        if any(self.strengths[k] > 0 for k in list(_BLIT) + list(_GEOM)):
            g = self._geometric_matrix(batch, height, width, device)
            x = self._resample(x, g)

        if any(self.strengths[k] > 0 for k in _COLOR):
            if channels not in (1, 3):
                raise ValueError(f"colour augmentation supports 1 or 3 channels, got {channels}")
            m = self._color_matrix(batch, channels, device).to(x.dtype)
            if channels == 3:
                flat = x.reshape(batch, 3, height * width)
                x = (m[:, :3, :3] @ flat + m[:, :3, 3:]).reshape(batch, 3, height, width)
            else:
                # A grey pixel is (v, v, v); its output luma is the mean of the rgb rows.
                gain = m[:, :3, :3].sum(dim=2).mean(dim=1).reshape(batch, 1, 1, 1)
                offset = m[:, :3, 3].mean(dim=1).reshape(batch, 1, 1, 1)
                x = x * gain + offset
        return x

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, p={float(self.p):.4f}"


# ---------------------------------------------------------------------------
# Adaptive p
# ---------------------------------------------------------------------------


class AdaptiveP:
    """Adjusts ``pipe.p`` from the sign of D's outputs on real images.

    ``r_t = E[sign(D(x_real))]`` over ``interval`` minibatches measures D's
    overfitting (1: every real image confidently real). Every ``interval``
    minibatches: ``p <- max(0, p + sign(r_t - target) * batch * interval /
    (ada_kimg * 1000))``, so p can move from 0 to 1 in ``ada_kimg`` thousand
    images.

    ``reduce`` (optional) sums a tensor across processes in place (e.g.
    ``torch.distributed.all_reduce``) so every rank sees the same ``r_t``;
    ``batch_size`` passed to ``accumulate`` must then be the global batch.
    """

    def __init__(
        self,
        pipe: AugmentPipe,
        target: float = 0.6,
        ada_kimg: float = 500,
        interval: int = 4,
        reduce: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.pipe = pipe
        self.target = target
        self.ada_kimg = ada_kimg
        self.interval = interval
        self.reduce = reduce
        self.sign_sum = 0.0
        self.count = 0
        self.minibatches = 0
        self.images = 0  # images seen since the last update (for the step size)
        self.last_rt: float | None = None
        self._pending: torch.Tensor | None = None  # device-side (sign_sum, count) since last fold

    @property
    def p(self) -> float:
        return float(self.pipe.p)

    def accumulate(self, real_logits: torch.Tensor, batch_size: int | None = None) -> float | None:
        """Record one minibatch of ``D(x_real)``; returns ``r_t`` when ``p`` was updated, else None.

        The sign sums stay on the device between updates, so only every
        ``interval``-th call synchronises with it.
        """
        logits = real_logits.detach().flatten()
        stats = torch.stack([torch.sign(logits).sum(), torch.ones_like(logits).sum()]).double()
        self._pending = stats if self._pending is None else self._pending + stats
        self.minibatches += 1
        self.images += int(batch_size) if batch_size is not None else logits.numel()
        if self.minibatches % self.interval != 0:
            return None
        return self.update()

    def _fold_pending(self) -> None:
        """Move device-side sums into the Python accumulators (reduced across processes)."""
        if self._pending is None:
            return
        stats = self._pending
        self._pending = None
        if self.reduce is not None:
            self.reduce(stats)
        sign_sum, count = stats.tolist()
        self.sign_sum += sign_sum
        self.count += int(round(count))

    def update(self) -> float:
        """Apply the p update from the accumulated signs and reset the accumulators."""
        self._fold_pending()
        if self.count == 0:
            raise RuntimeError("AdaptiveP.update called with no accumulated logits")
        r_t = self.sign_sum / self.count
        direction = float(math.copysign(1.0, r_t - self.target)) if r_t != self.target else 0.0
        step = direction * self.images / (self.ada_kimg * 1000)
        new_p = max(self.p + step, 0.0)
        self.pipe.p.copy_(torch.as_tensor(new_p, dtype=self.pipe.p.dtype))
        logger.debug("ADA: r_t=%.4f p=%.6f", r_t, new_p)
        self.sign_sum, self.count, self.images = 0.0, 0, 0
        self.last_rt = r_t
        return r_t

    def state_dict(self) -> dict[str, Any]:
        """p and the accumulators. Safe to call on one rank only: with a ``reduce``
        (multi-process) the signs not yet reduced are left out rather than
        all-reduced here (that would hang if the other ranks do not call too), so
        a resume loses at most ``interval - 1`` minibatches of signs."""
        if self.reduce is None:
            self._fold_pending()
        return {
            "p": self.p,
            "sign_sum": self.sign_sum,
            "count": self.count,
            "minibatches": self.minibatches,
            "images": self.images,
            "last_rt": self.last_rt,
            "target": self.target,
            "ada_kimg": self.ada_kimg,
            "interval": self.interval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore p and the accumulators (hyper-parameters stay as constructed)."""
        self.pipe.p.copy_(torch.as_tensor(float(state["p"]), dtype=self.pipe.p.dtype))
        self.sign_sum = float(state["sign_sum"])
        self.count = int(state["count"])
        self.minibatches = int(state["minibatches"])
        self.images = int(state["images"])
        self.last_rt = state.get("last_rt")
        self._pending = None
