"""bf16 + channels-last for inference-only work, used only where it is supported and harmless.

On CPUs with bf16 dot-product units (avx512_bf16 / AMX) oneDNN runs bf16 convolutions much faster
than fp32. We use it for feature extraction and evaluation only after checking, on the validation
images, that it changes the outputs by no more than a stated tolerance; otherwise fp32. The
decision and its numbers are logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """oneDNN has native bf16 kernels on this CPU (avx512_bf16 or AMX), not an emulation."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def inference_mode(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """no_grad, plus bf16 autocast (on `device_type`, where the tensors are) when precision == 'bf16'."""
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        else:
            yield


def prepare_for_inference(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """channels-last memory format for the bf16 path (oneDNN's preferred layout); fp32 left as is."""
    model.eval()
    if precision == "bf16":
        model.to(memory_format=torch.channels_last)
    else:
        model.to(memory_format=torch.contiguous_format)
    return model


def to_inference_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if precision == "bf16" and x.ndim == 4 else x


@dataclass(frozen=True)
class PrecisionDecision:
    precision: str  # "bf16" or "fp32"
    reason: str
    max_abs_diff: float | None = None
    label_changes: int | None = None


def choose_precision(
    requested: str,
    run: Callable[[str], torch.Tensor],
    what: str,
    tolerance: float,
    compare: str,
) -> PrecisionDecision:
    """Decide bf16 vs fp32 for `run(precision) -> outputs` on the validation images.

    compare="probabilities": outputs are N x C probabilities; bf16 passes when no arg-max label
    changes and max |p_bf16 - p_fp32| <= tolerance.
    compare="features": outputs are N x D features; bf16 passes when the largest per-image relative
    L2 error ||f_bf16 - f_fp32|| / ||f_fp32|| <= tolerance.
    """
    if requested == "fp32":
        decision = PrecisionDecision("fp32", "classifier.inference_precision=fp32")
    elif not cpu_supports_bf16():
        if requested == "bf16":
            raise RuntimeError("classifier.inference_precision=bf16 but this CPU has no native bf16 support (oneDNN)")
        decision = PrecisionDecision("fp32", "CPU has no native bf16 units")
    else:
        reference = run("fp32").float()
        candidate = run("bf16").float()
        if compare == "probabilities":
            diff = float((candidate - reference).abs().max()) if reference.numel() else 0.0
            flips = int((candidate.argmax(1) != reference.argmax(1)).sum())
            ok = flips == 0 and diff <= tolerance
            detail = f"max |dp| {diff:.2e}, {flips} label changes (tolerance {tolerance:g}, 0 changes)"
        elif compare == "features":
            norms = reference.norm(dim=1).clamp_min(1e-12)
            diff = float(((candidate - reference).norm(dim=1) / norms).max()) if reference.numel() else 0.0
            flips = None
            ok = diff <= tolerance
            detail = f"max relative feature error {diff:.2e} (tolerance {tolerance:g})"
        else:
            raise ValueError(f"compare must be 'probabilities' or 'features', not {compare!r}")
        if ok:
            decision = PrecisionDecision("bf16", f"bf16 check passed: {detail}", diff, flips)
        elif requested == "bf16":
            raise RuntimeError(f"{what}: bf16 was required but changes validation outputs: {detail}")
        else:
            decision = PrecisionDecision("fp32", f"bf16 check failed, using fp32: {detail}", diff, flips)
    log.info("%s precision: %s (%s)", what, decision.precision, decision.reason)
    return decision
