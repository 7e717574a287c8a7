"""Low-level ops used by the StyleGAN2 networks.

``bias_act`` uses the fused C++/CUDA kernel (``fused``) when it builds and the reference
otherwise. ``upfirdn2d`` (and ``upsample2d`` / ``downsample2d``) is a linear operator whose
gradient is another ``upfirdn2d`` (zero-insertion and decimation swap, the filter flips, the
padding is mirrored), so it runs as one autograd node whose backward (and double backward) is
itself -- instead of dozens of slice / pad nodes whose backwards each allocate and fill a
full-size zero tensor -- and whose forward, never differentiated, uses the fastest kernels (a
depthwise convolution, or banded matrix products for single-channel images).
``CTSYNTH_FUSED_OPS=0`` forces the plain reference for both; ``=1`` makes a failed build of the
fused ``bias_act`` an error instead of a fallback.
Callers import from here, never from ``reference`` or ``fused`` directly, so that choice stays in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctsynth.gan.ops import reference
from ctsynth.gan.ops.fused import extension_status, fused_bias_act, fused_ops_enabled
from ctsynth.gan.ops.reference import ACTIVATIONS, parse_padding, setup_filter

__all__ = [
    "ACTIVATIONS",
    "bias_act",
    "downsample2d",
    "extension_status",
    "fused_ops_enabled",
    "parse_padding",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)``; arguments as ``reference.bias_act``.

    The fused kernel when it builds (one pass forward, one backward, on the CPU and on CUDA), else
    the reference. On the CPU the kernel makes a cpu64 training step a little faster than the
    reference's four PyTorch ops (measured ratios: docs/gan.md, "Speed").
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    default_alpha, default_gain = ACTIVATIONS[act]
    alpha = default_alpha if alpha is None else alpha
    gain = default_gain if gain is None else gain
    clamp = None if clamp is not None and clamp < 0 else clamp
    if fused_ops_enabled():
        y = fused_bias_act(x, b, dim, act, alpha, gain, clamp)
        if y is not None:
            return y
    if x.dtype in (torch.bfloat16, torch.float16):
        # As the kernel does: the arithmetic in float32 and one rounding at the end, instead of
        # four roundings (bias, activation, gain, clamp) in the low precision.
        y = reference.bias_act(x.float(), b.float() if b is not None else None, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return y.to(x.dtype)
    return reference.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _upfirdn2d_forward(
    x: torch.Tensor, f: torch.Tensor, up: int, down: int, padding: tuple[int, int, int, int], flip_filter: bool, gain: float
) -> torch.Tensor:
    """``reference.upfirdn2d`` for the forward pass only (never differentiated: the node's backward
    is another upfirdn2d), so it may use the fastest kernels instead of the reference's shifted
    slices, which exist to stay cheaply twice differentiable:

    * feature maps (many channels): one depthwise convolution, stride = decimation -- one pass
      instead of ~14, and only the kept outputs of a decimation are computed;
    * single-channel images (to_rgb skips, the augmentation's up/down chain) with a separable
      filter: two matrix products with the banded matrix of the 1-D up-pad-filter-down operator.
      Their padded size changes with every minibatch's transforms and oneDNN would build a new
      convolution kernel for each new shape (~0.1 s each, measured); a matrix product has none.

    Measured on a cpu64 step: docs/gan.md, "Speed".
    """
    batch, channels, height, width = x.shape
    px0, px1, py0, py1 = padding
    f = f.to(device=x.device, dtype=x.dtype)
    f = f * (gain ** (f.ndim / 2.0))  # gain split evenly over the separable passes
    if not flip_filter:  # both kernels correlate; a true convolution needs the flipped taps
        f = f.flip(list(range(f.ndim)))
    if channels == 1 and f.ndim == 1:
        along_w = _fir_matrix(width, f, up, down, px0, px1)
        along_h = _fir_matrix(height, f, up, down, py0, py1)
        return torch.matmul(along_h, torch.matmul(x, along_w.t()))
    if up > 1:  # zero insertion, exactly as the reference
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = torch.nn.functional.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    x = torch.nn.functional.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    if f.ndim == 1:
        f = torch.outer(f, f)
    weight = f.reshape(1, 1, *f.shape).expand(channels, 1, *f.shape).contiguous()
    return torch.nn.functional.conv2d(x, weight, stride=down, groups=channels)


def _fir_matrix(length: int, taps: torch.Tensor, up: int, down: int, pad0: int, pad1: int) -> torch.Tensor:
    """The 1-D operator "insert up-1 zeros, pad (pad0, pad1), correlate with taps, keep every
    down-th sample" as a matrix: ``y[j] = sum_k taps[k] z[j*down + k - pad0]`` where ``z[i*up]
    = x[i]``, so entry ``(j, i)`` is ``taps[i*up + pad0 - j*down]`` where that index exists."""
    n_taps = taps.shape[0]
    out_length = (length * up + pad0 + pad1 - n_taps) // down + 1
    if out_length < 1:
        raise ValueError(f"filter of {n_taps} taps is longer than the padded size {length * up + pad0 + pad1}")
    j = torch.arange(out_length, device=taps.device).reshape(-1, 1)
    i = torch.arange(length, device=taps.device).reshape(1, -1)
    k = i * up + pad0 - j * down
    inside = (k >= 0) & (k < n_taps)
    return torch.where(inside, taps[k.clamp(0, n_taps - 1)], torch.zeros((), dtype=taps.dtype, device=taps.device))


class _UpFirDn2d(torch.autograd.Function):
    """``reference.upfirdn2d`` as one node; backward = the adjoint upfirdn2d (itself differentiable)."""

    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):  # type: ignore[override]
        with torch.no_grad():
            y = _upfirdn2d_forward(x, f, up, down, padding, flip_filter, gain)
        ctx.save_for_backward(f)
        ctx.args = (x.shape[2], x.shape[3], y.shape[2], y.shape[3], up, down, padding, flip_filter, gain)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (f,) = ctx.saved_tensors
        in_h, in_w, out_h, out_w, up, down, (px0, px1, py0, py1), flip_filter, gain = ctx.args
        fw, fh = f.shape[-1], f.shape[0]
        # y[m] = sum_t g[t] u[m*down + t - p0] has the adjoint: zero-insert by `down`, pad
        # (fw - 1 - p0, X*up - Y*down + p0 - up + 1), correlate with the reversed taps, decimate by `up`.
        adjoint_padding = (
            fw - px0 - 1, in_w * up - out_w * down + px0 - up + 1,
            fh - py0 - 1, in_h * up - out_h * down + py0 - up + 1,
        )
        dx = _UpFirDn2d.apply(dy, f, down, up, adjoint_padding, not flip_filter, gain)
        return dx, None, None, None, None, None, None


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter, downsample; arguments and result as ``reference.upfirdn2d``."""
    if not fused_ops_enabled() or f is None or x.ndim != 4:
        return reference.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    return _UpFirDn2d.apply(x, f, int(up), int(down), parse_padding(padding), bool(flip_filter), float(gain))


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, gain: float = 1.0) -> torch.Tensor:
    """As ``reference.upsample2d`` (centred, mean-preserving), through ``upfirdn2d`` above."""
    return upfirdn2d(x, f, up=up, padding=reference.upsample_padding(f.shape[-1], up), gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, gain: float = 1.0) -> torch.Tensor:
    """As ``reference.downsample2d`` (centred), through ``upfirdn2d`` above."""
    return upfirdn2d(x, f, down=down, padding=reference.downsample_padding(f.shape[-1], down), gain=gain)
