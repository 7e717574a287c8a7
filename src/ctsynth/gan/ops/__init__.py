"""Low-level ops used by the StyleGAN2 networks.

``bias_act`` uses the fused C++/CUDA kernel (``fused``) when it builds and the reference
otherwise. ``upfirdn2d`` (and ``upsample2d`` / ``downsample2d``) is a linear operator whose
gradient is another ``upfirdn2d`` (zero-insertion and decimation swap, the filter flips, the
padding is mirrored), so it runs as one autograd node whose forward is the reference maths
without autograd bookkeeping and whose backward (and double backward) is itself -- instead of
dozens of slice / pad nodes whose backwards each allocate and fill a full-size zero tensor.
``CTSYNTH_FUSED_OPS=0`` forces the plain reference for both; the fused ``bias_act`` runs on CUDA
tensors by default and on the CPU only with ``CTSYNTH_FUSED_OPS=1`` (measured slower there).
Callers import from here, never from ``reference`` or ``fused`` directly, so that choice stays in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctsynth.gan.ops import reference
from ctsynth.gan.ops.fused import extension_status, fused_bias_act, fused_ops_enabled, fused_ops_required
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

    The fused kernel on CUDA when it builds (one pass forward, one backward), else the reference.
    On the CPU the reference is the default: PyTorch's own vectorised elementwise ops made a
    cpu64 training step ~20 % faster than our C++ kernel (2-core AVX-512 VM, 2026-11-26;
    docs/gan.md, "The fused bias_act"). ``CTSYNTH_FUSED_OPS=1`` uses the kernel on the CPU too.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    default_alpha, default_gain = ACTIVATIONS[act]
    alpha = default_alpha if alpha is None else alpha
    gain = default_gain if gain is None else gain
    clamp = None if clamp is not None and clamp < 0 else clamp
    if fused_ops_enabled() and (x.is_cuda or fused_ops_required()):
        y = fused_bias_act(x, b, dim, act, alpha, gain, clamp)
        if y is not None:
            return y
    if x.dtype in (torch.bfloat16, torch.float16):
        # As the kernel does: the arithmetic in float32 and one rounding at the end, instead of
        # four roundings (bias, activation, gain, clamp) in the low precision.
        y = reference.bias_act(x.float(), b.float() if b is not None else None, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return y.to(x.dtype)
    return reference.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


class _UpFirDn2d(torch.autograd.Function):
    """``reference.upfirdn2d`` as one node; backward = the adjoint upfirdn2d (itself differentiable)."""

    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):  # type: ignore[override]
        with torch.no_grad():
            y = reference.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
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
