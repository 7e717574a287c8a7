"""Pure-PyTorch reference implementations of the two low-level StyleGAN2 ops.

These are the ground truth: a later fused C++/CUDA version must agree with them
(a test compares the two). They are written for clarity first, but avoid Python
loops over the batch so they stay usable as the fallback on every device.

* ``upfirdn2d``: upsample by zero insertion, pad, filter with a FIR kernel,
  downsample by decimation -- the one primitive behind every resampling step.
* ``bias_act``: add a per-channel bias, apply an activation, scale by a gain,
  clamp -- the epilogue of every layer.

Both are ordinary autograd graphs, so they support double backward (needed by
R1 and path-length regularisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "setup_filter",
    "parse_padding",
    "upfirdn2d",
    "upsample2d",
    "downsample2d",
    "bias_act",
]

# name -> (default negative slope, default gain). The gain keeps the signal's
# second moment roughly unchanged for unit-variance zero-mean input
# (He et al. 2015): sqrt(2) for (leaky) ReLU, 1 for linear.
ACTIVATIONS: dict[str, tuple[float, float]] = {
    "linear": (0.0, 1.0),
    "relu": (0.0, math.sqrt(2.0)),
    "lrelu": (0.2, math.sqrt(2.0)),
}


def setup_filter(
    taps: Sequence[float] | torch.Tensor = (1, 3, 3, 1),
    normalize: bool = True,
    separable: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build a FIR filter tensor.

    Returns a 1-D tensor (separable: applied along x then y) or its 2-D outer
    product. ``normalize`` makes the taps sum to 1 (in 2-D too), so that
    filtering keeps a constant image constant; ``upfirdn2d``'s ``gain``
    then compensates for zero insertion when upsampling.
    """
    f = torch.as_tensor(taps, dtype=torch.float32, device=device)
    if f.ndim != 1:
        raise ValueError(f"expected 1-D taps, got shape {tuple(f.shape)}")
    if normalize:
        f = f / f.sum()
    if not separable:
        f = torch.outer(f, f)
    return f


def parse_padding(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Padding as ``(x0, x1, y0, y1)``; an int pads all four sides alike."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    if len(padding) != 4:
        raise ValueError(f"padding must have 1, 2 or 4 entries, got {padding}")
    return padding  # type: ignore[return-value]


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample a batch of images.

    Args:
        x: ``N x C x H x W``.
        f: 1-D (separable) or 2-D filter, or ``None`` for the identity.
        up: zero-insertion factor (``up - 1`` zeros after every sample).
        down: decimation factor (keep every ``down``-th sample).
        padding: ``(x0, x1, y0, y1)`` applied after upsampling; negative
            values crop.
        flip_filter: ``False`` computes a true convolution (the filter is
            flipped, as in signal processing); ``True`` a correlation.
            Irrelevant for symmetric filters.
        gain: overall scale of the filter. Upsampling by ``u`` in 2-D needs
            ``gain = u**2`` to keep the mean intensity, because zero insertion
            leaves only one non-zero sample in ``u**2``.

    Returns:
        ``N x C x H' x W'`` with ``H' = (H*up + y0 + y1 - fh) // down + 1``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W input, got shape {tuple(x.shape)}")
    if f is None:
        f = torch.ones([1], dtype=torch.float32, device=x.device)
    px0, px1, py0, py1 = parse_padding(padding)
    batch, channels, height, width = x.shape

    # 1. Zero insertion: every sample is followed by (up - 1) zeros in each axis.
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)

    # 2. Pad with zeros (positive) or crop (negative).
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]

    # 3. The same FIR filter on every channel; conv2d-style correlation, so flip the
    # taps for a true convolution. A separable filter is applied as a weighted sum
    # of shifted slices (a few elementwise kernels) instead of a depthwise conv:
    # PyTorch's conv double backward (needed by R1 and path length) either loops
    # over the groups of a depthwise conv or picks very slow kernels for a
    # one-channel conv over N*C images -- measured at 13-17 s per R1 step at 256 px
    # on an H200. Slices and sums are twice differentiable at elementwise cost.
    f = f.to(device=x.device, dtype=x.dtype)
    f = f * (gain ** (f.ndim / 2.0))  # gain split evenly over the separable passes
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 1:
        x = _fir_along(x, f, dim=3)
        x = _fir_along(x, f, dim=2)
    else:
        x = x.reshape(batch * channels, 1, x.shape[2], x.shape[3])
        x = F.conv2d(x, f.reshape(1, 1, *f.shape))
        x = x.reshape(batch, channels, x.shape[2], x.shape[3])

    # 4. Decimation.
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def _fir_along(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Valid correlation of ``x`` with 1-D ``taps`` along ``dim``: ``y[j] = sum_k taps[k] x[j + k]``."""
    length = x.shape[dim] - taps.shape[0] + 1
    if length < 1:
        raise ValueError(f"filter of {taps.shape[0]} taps is longer than the padded size {x.shape[dim]}")
    y = x.narrow(dim, 0, length) * taps[0]
    for k in range(1, taps.shape[0]):
        y = y + x.narrow(dim, k, length) * taps[k]
    return y


def upsample_padding(filter_taps: int, up: int) -> tuple[int, int, int, int]:
    """Padding that keeps a ``up``-times upsampled, ``filter_taps``-filtered image centred."""
    p0, p1 = (filter_taps + up - 1) // 2, (filter_taps - up) // 2
    return (p0, p1, p0, p1)


def downsample_padding(filter_taps: int, down: int) -> tuple[int, int, int, int]:
    """Padding that keeps a ``filter_taps``-filtered, ``down``-times decimated image centred."""
    p0, p1 = (filter_taps - down + 1) // 2, (filter_taps - down) // 2
    return (p0, p1, p0, p1)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Upsample by ``up`` with filter ``f``, centred, keeping the mean intensity.

    The padding ``((fw + up - 1) // 2, (fw - up) // 2)`` makes output sample
    ``j`` sit at input coordinate ``(j + 0.5) / up - 0.5``: the image does not
    shift when it grows.
    """
    return upfirdn2d(x, f, up=up, padding=upsample_padding(f.shape[-1], up), gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, gain: float = 1.0) -> torch.Tensor:
    """Low-pass filter and decimate by ``down``, centred (output ``i`` at input ``down*i + (down-1)/2``)."""
    return upfirdn2d(x, f, down=down, padding=downsample_padding(f.shape[-1], down), gain=gain)


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)``.

    Args:
        x: any shape.
        b: 1-D bias broadcast along ``dim`` (``None``: no bias).
        act: ``'linear'``, ``'relu'`` or ``'lrelu'``.
        alpha: negative slope for ``lrelu`` (default 0.2).
        gain: output scale (default: the activation's variance-preserving
            gain, ``sqrt(2)`` for (leaky) ReLU).
        clamp: clamp the output to ``[-clamp, clamp]`` (``None``: no clamp).
            StyleGAN2-ADA clamps conv outputs at 256 so that rare large
            activations cannot overflow in reduced precision.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    default_alpha, default_gain = ACTIVATIONS[act]
    alpha = default_alpha if alpha is None else alpha
    gain = default_gain if gain is None else gain
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, negative_slope=alpha)
    elif act == "relu":
        x = F.relu(x)
    if gain != 1.0:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x
