"""Fused bias + activation (+ gain + clamp) built with ninja through ``torch.utils.cpp_extension``.

The extension (``bias_act.cpp``, plus ``bias_act_cuda.cu`` when CUDA and ``nvcc`` exist) is
compiled on first use into a build folder that is reused across processes, so a test session or
CI job compiles once. Everything here degrades to the pure-PyTorch reference:

* ``CTSYNTH_FUSED_OPS=0`` turns the fused path off (``=1`` makes a failed build an error);
* a missing compiler or a failed build logs one warning and falls back;
* a build without CUDA kernels (no ``nvcc``) on a GPU machine: CUDA tensors use the reference,
  with one warning;
* the build folder is ``CTSYNTH_EXT_DIR`` or ``~/.cache/ctsynth/torch_extensions/<torch version>``.

Autograd: the backward of ``y = f(x + b)`` needs only ``y`` (see ``bias_act.cpp``), and it is
linear in the incoming gradient with a piecewise-constant slope, so its own backward -- the
double backward that R1 and path-length regularisation take -- is the same kernel again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["fused_ops_enabled", "load_extension", "fused_bias_act", "extension_status", "build_dir", "kernel_runs_on"]

log = logging.getLogger(__name__)

_ACT_CODES = {"linear": 0, "relu": 1, "lrelu": 2}
_SOURCES = Path(__file__).resolve().parent
_lock = threading.Lock()
_extension: Any = None
_extension_devices: frozenset[str] = frozenset()  # device types the loaded build has kernels for
_warned_devices: set[str] = set()
_status: str = "not loaded"


def fused_ops_enabled() -> bool:
    """False when ``CTSYNTH_FUSED_OPS=0`` (forces the reference implementation)."""
    return os.environ.get("CTSYNTH_FUSED_OPS", "auto").strip().lower() not in ("0", "false", "off", "no")


def fused_ops_required() -> bool:
    """True when ``CTSYNTH_FUSED_OPS=1``: a failed build is an error instead of a fallback."""
    return os.environ.get("CTSYNTH_FUSED_OPS", "auto").strip().lower() in ("1", "true", "on", "yes")


def build_dir() -> Path:
    """Where the compiled extension lives (shared by every process with the same torch)."""
    root = os.environ.get("CTSYNTH_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "ctsynth" / "torch_extensions"
    cuda = "cuda" if _want_cuda() else "cpu"
    return base / f"torch{torch.__version__.replace('+', '_')}-{cuda}"


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None and shutil.which("nvcc") is not None


def extension_status() -> str:
    """A line saying whether the fused op is in use and, if not, why."""
    return _status


def load_extension() -> Any | None:
    """The compiled module, or ``None`` (disabled, no compiler, or the build failed)."""
    global _extension, _extension_devices, _status
    if not fused_ops_enabled():
        _status = "disabled by CTSYNTH_FUSED_OPS=0"
        return None
    if _extension is not None or _status.startswith("failed"):
        return _extension
    with _lock:
        if _extension is not None or _status.startswith("failed"):
            return _extension
        try:
            from torch.utils.cpp_extension import load

            cuda = _want_cuda()
            sources = [str(_SOURCES / "bias_act.cpp")] + ([str(_SOURCES / "bias_act_cuda.cu")] if cuda else [])
            folder = build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            _extension = load(
                name="ctsynth_bias_act_" + ("cuda" if cuda else "cpu"),
                sources=sources,
                build_directory=str(folder),
                extra_cflags=["-O3"] + (["-DCTSYNTH_WITH_CUDA"] if cuda else []),
                extra_cuda_cflags=["-O3", "--use_fast_math"] if cuda else None,
                verbose=False,
            )
            _extension_devices = frozenset({"cpu", "cuda"} if cuda else {"cpu"})
            _status = f"fused bias_act loaded ({'cpu+cuda' if cuda else 'cpu'}) from {folder}"
            log.info(_status)
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            _status = f"failed to build the fused bias_act ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); using the reference"
            if fused_ops_required():
                raise
            log.warning(_status)
    return _extension


def kernel_runs_on(device_type: str) -> bool:
    """Whether the loaded build has a kernel for ``device_type``.

    A machine with a GPU, a C++ compiler and ninja but no CUDA toolkit (``nvcc``) builds a
    CPU-only extension; its CUDA tensors then go to the reference ops (one warning), instead of
    reaching a kernel that does not exist.
    """
    if device_type in _extension_devices:
        return True
    if device_type not in _warned_devices:
        _warned_devices.add(device_type)
        log.warning(
            "the fused bias_act was built without %s kernels (%s; no CUDA toolkit / nvcc at build time?): "
            "using the reference ops for %s tensors", device_type, _status, device_type,
        )
    return False


class _BiasActGrad(torch.autograd.Function):
    """``dx = dy * slope(y)``: linear in ``dy``; ``slope`` is piecewise constant, so no grad to ``y``."""

    @staticmethod
    def forward(ctx, dy, y, act, alpha, gain, clamp):  # type: ignore[override]
        ctx.save_for_backward(y)
        ctx.params = (act, alpha, gain, clamp)
        return _extension.grad(dy, y, act, alpha, gain, clamp)

    @staticmethod
    def backward(ctx, ddx):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return _BiasActGrad.apply(ddx, y, *ctx.params), None, None, None, None, None


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, dim, act, alpha, gain, clamp):  # type: ignore[override]
        y = _extension.forward(x, b, dim, act, alpha, gain, clamp)
        ctx.save_for_backward(y)
        ctx.params = (act, alpha, gain, clamp)
        ctx.dim = dim
        ctx.has_bias = b is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        dx = _BiasActGrad.apply(dy, y, *ctx.params) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dx.sum(dim=[d for d in range(dx.ndim) if d != ctx.dim])
        return dx, db, None, None, None, None, None


def fused_bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> torch.Tensor | None:
    """The fused op, or ``None`` when it cannot run here (caller then uses the reference).

    Needs ``gain > 0`` (the backward reads the activation's sign from ``y``).
    """
    if act not in _ACT_CODES or gain <= 0 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if x.device.type not in ("cpu", "cuda") or load_extension() is None:
        return None
    if not kernel_runs_on(x.device.type):
        return None
    dim = dim % x.ndim
    if b is not None:
        b = b.to(x.dtype)
    return _BiasAct.apply(x, b, dim, _ACT_CODES[act], float(alpha), float(gain), -1.0 if clamp is None else float(clamp))
