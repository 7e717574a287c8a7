"""Training precision chosen by measurement on the machine that trains, not by a CPU flag.

Whether bfloat16 pays depends on the machine: on a CPU with avx512_bf16 and no AMX (an Intel
Xeon of this project) bf16 matmuls run at half the float32 rate, on an AMD Zen 4 with the same
flag they are faster, and without native bf16 PyTorch emulates it (much slower). So at start-up
``choose_precision`` times a few real training steps of the run's own configuration in float32
and with the top resolutions in bfloat16, checks that bf16 keeps each step's gradients (parity),
and keeps bf16 only where it is faster *and* passes. The result is cached per machine (CPU model,
torch version, device, configuration shape), so later runs start at once.

Parity criterion: the error bf16 adds to a step's gradient must be a small fraction
(``BF16_NOISE_FRACTION``) of the noise each step already carries -- the difference between the
float32 gradients of two independent minibatches -- as the RMS over the loss phases that compute
in bf16 (``BF16_PHASES``; R1 always runs in float32, see ``loss.discriminator_reg``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctsynth.device import cpu_model
from ctsynth.gan.loss import PHASES
from ctsynth.gan.presets import GANConfig

__all__ = [
    "BF16_NOISE_FRACTION",
    "BF16_PHASES",
    "MIN_SPEEDUP",
    "PrecisionChoice",
    "bf16_gradient_error",
    "choose_precision",
    "decide",
    "phase_gradients",
]

log = logging.getLogger(__name__)

# bf16 may add at most 1/8 of the minibatch gradient noise. Measured on the tiny test config,
# RMS over BF16_PHASES and two draws, 2026-12-07 on an Intel Xeon with AMX: bf16 0.100 (0.100
# with oneDNN held to AVX-512 bf16, 0.065 with oneDNN held to AVX2); activations rounded to
# 2 mantissa bits instead of 7 (float8 e5m2, a deliberately broken path) 0.20-0.22
# (tests/test_gan_ops.py).
BF16_NOISE_FRACTION = 1 / 8
BF16_PHASES = ("Gmain", "Greg", "Dmain")
# bf16 must be at least this much faster (ratio of step times) to be kept: below it, timing
# noise on a shared machine could flip the choice from run to run.
MIN_SPEEDUP = 1.05
DEFAULT_BF16_RES = 2
_CACHE_VERSION = 2  # 2: R1 in float32, parity over BF16_PHASES
# Fields of GANConfig that change the work of a step (the cache key's "configuration shape").
_SHAPE_FIELDS = (
    "resolution", "img_channels", "c_dim", "z_dim", "w_dim", "map_layers", "channel_base", "channel_max",
    "batch", "mbstd", "pl_weight", "pl_interval", "gamma", "r1_interval", "style_mixing_prob", "augment",
    "d_architecture", "d_label_map_layers", "channels_last", "conv_clamp",
)


@dataclass(frozen=True)
class PrecisionChoice:
    """What was measured and what was chosen. ``num_bf16_res``: the value to train with."""

    num_bf16_res: int
    candidate_bf16_res: int
    fp32_step_s: float
    bf16_step_s: float | None  # None: no native bf16 here, not measured
    bf16_error: float | None  # the parity statistic (see module docstring); None: not measured
    reason: str
    key: str
    cached: bool = False

    @property
    def precision(self) -> str:
        return "bf16" if self.num_bf16_res > 0 else "fp32"

    def mlflow_params(self) -> dict[str, Any]:
        """Flat values for ``mlflow.log_params`` (None as the string "n/a")."""
        na = lambda v: "n/a" if v is None else v  # noqa: E731
        return {
            "precision": self.precision,
            "precision_num_bf16_res": self.num_bf16_res,
            "precision_fp32_step_s": round(self.fp32_step_s, 5),
            "precision_bf16_step_s": na(self.bf16_step_s and round(self.bf16_step_s, 5)),
            "precision_bf16_error": na(self.bf16_error and round(self.bf16_error, 5)),
            "precision_reason": self.reason[:250],
            "precision_cached": self.cached,
        }


def decide(fp32_s: float, bf16_s: float | None, bf16_error: float | None) -> tuple[bool, str]:
    """Keep bf16 only when it was measured, is at least ``MIN_SPEEDUP`` faster and passes parity."""
    if bf16_s is None or bf16_error is None:
        return False, "no native bfloat16 on this device: float32"
    speedup = fp32_s / bf16_s
    if not math.isfinite(bf16_error) or bf16_error >= BF16_NOISE_FRACTION:
        return False, f"bf16 fails parity (gradient error {bf16_error:.3f} of minibatch noise >= {BF16_NOISE_FRACTION:.3f}): float32"
    if speedup < MIN_SPEEDUP:
        return False, f"bf16 not faster here ({speedup:.2f}x float32's speed, needs {MIN_SPEEDUP:.2f}x): float32"
    return True, f"bf16 {speedup:.2f}x float32's speed, gradient error {bf16_error:.3f} of minibatch noise: bf16"


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def phase_gradients(
    trainer: Any, draw: int, phases: tuple[str, ...] = PHASES
) -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    """Loss and gradients of each phase of ``trainer`` (a ``GANTrainer``) for one set of draws.

    The real batch, z, labels, noise, style mixing and augmentation all come from ``draw``, and
    the path-length state is put back afterwards, so two calls with the same ``draw`` see the
    same inputs (on the same or another trainer) and different draws are independent minibatches.
    """
    loss_state = copy.deepcopy(trainer.loss.state_dict())
    trainer.data_generator.manual_seed(draw)
    real, real_c = trainer._real_batch()
    results = {}
    for phase in phases:
        module = trainer.G if phase.startswith("G") else trainer.D
        trainer.G.requires_grad_(phase.startswith("G"))
        trainer.D.requires_grad_(not phase.startswith("G"))
        torch.manual_seed(draw)
        z, c = trainer._gen_inputs()
        module.zero_grad(set_to_none=True)
        out = trainer.loss.compute(phase, real, real_c, z, c)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        results[phase] = (float(out.loss.detach()), grads)
    trainer.G.requires_grad_(False)
    trainer.D.requires_grad_(False)
    trainer.loss.load_state_dict(loss_state)
    return results


def bf16_gradient_error(fp32: Any, others: dict[str, Any], draws: tuple[int, ...] = (1, 50)) -> dict[str, float]:
    """For each trainer in ``others`` (same weights as ``fp32``): RMS over ``BF16_PHASES`` and
    draws of ``||g_other - g_fp32|| / ||g_fp32(draw) - g_fp32(draw + 1)||``."""

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.flatten().float() for g in grads.values()])

    squares: dict[str, list[float]] = {name: [] for name in others}
    for draw in draws:
        want, other_draw = phase_gradients(fp32, draw, BF16_PHASES), phase_gradients(fp32, draw + 1, BF16_PHASES)
        for name, trainer in others.items():
            got = phase_gradients(trainer, draw, BF16_PHASES)
            for phase in want:
                if got[phase][1].keys() != want[phase][1].keys():
                    raise ValueError(f"{name}: {phase} has gradients for other parameters than float32")
                noise = (flat(other_draw[phase][1]) - flat(want[phase][1])).norm()
                error = (flat(got[phase][1]) - flat(want[phase][1])).norm()
                squares[name].append(float(error / noise) ** 2)
    return {name: (sum(values) / len(values)) ** 0.5 for name, values in squares.items()}


def _trainer(cfg: GANConfig, device: str, out_dir: Path) -> Any:
    from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions  # train imports this module

    generator = torch.Generator().manual_seed(0)
    n = max(2 * cfg.batch, 8)
    images = torch.rand(n, cfg.img_channels, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1
    labels = torch.arange(n) % max(cfg.c_dim, 1)
    classes = [str(i) for i in range(max(cfg.c_dim, 1))]
    options = TrainOptions(out_dir=out_dir, classes=classes, mlflow=False, progress=False, device=device)
    return GANTrainer(cfg, TrainingData(images, labels), options)


def _step_seconds(trainer: Any, steps: int, warmup: int) -> float:
    """Median wall time of a training step (all phases due at that step), after ``warmup`` steps."""
    for _ in range(warmup):
        trainer._train_step()
    times = []
    for _ in range(steps):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        trainer._train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _measure(cfg: GANConfig, candidate: int, device: str, steps: int, warmup: int) -> tuple[float, float | None, float | None]:
    from ctsynth.gan.networks import bf16_supported

    # The lazy regularisers run every 4th / 16th step: time the same step indices in both arms.
    base = dataclasses.replace(cfg, fixed_p=cfg.fixed_p if cfg.fixed_p is not None else 0.2)
    with tempfile.TemporaryDirectory(prefix="ctsynth-precision-") as tmp:
        fp32 = _trainer(dataclasses.replace(base, num_bf16_res=0), device, Path(tmp) / "fp32")
        fp32_s = _step_seconds(fp32, steps, warmup)
        if not bf16_supported(torch.device(device).type):
            return fp32_s, None, None
        bf16 = _trainer(dataclasses.replace(base, num_bf16_res=candidate), device, Path(tmp) / "bf16")
        bf16_s = _step_seconds(bf16, steps, warmup)
        # Parity from the same starting weights.
        fp32 = _trainer(dataclasses.replace(base, num_bf16_res=0), device, Path(tmp) / "fp32b")
        bf16 = _trainer(dataclasses.replace(base, num_bf16_res=candidate), device, Path(tmp) / "bf16b")
        bf16.G.load_state_dict(fp32.G.state_dict())
        bf16.D.load_state_dict(fp32.D.state_dict())
        error = bf16_gradient_error(fp32, {"bf16": bf16})["bf16"]
    return fp32_s, bf16_s, error


def cache_key(cfg: GANConfig, candidate: int, device: str) -> str:
    """CPU (or GPU) model, torch version, threads, device and the configuration's shape."""
    hardware = cpu_model()
    if torch.device(device).type == "cuda":
        hardware += " / " + torch.cuda.get_device_name(torch.device(device))
    shape = {name: getattr(cfg, name) for name in _SHAPE_FIELDS} | {"candidate_bf16_res": candidate}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{hardware} | torch {torch.__version__} | {torch.get_num_threads()} threads | {device} | cfg {digest}"


def default_cache_path() -> Path:
    root = os.environ.get("CTSYNTH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "ctsynth") / "gan_precision.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable precision cache %s (%s); measuring again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def choose_precision(
    cfg: GANConfig,
    device: str = "cpu",
    candidate_bf16_res: int | None = None,
    steps: int = 3,
    warmup: int = 2,
    cache_path: Path | None = None,
    refresh: bool = False,
) -> PrecisionChoice:
    """Measure (or read from the cache) float32 vs bf16 for ``cfg`` on this machine and choose.

    ``candidate_bf16_res``: how many top resolutions bf16 would cover (default
    ``cfg.num_bf16_res`` if set, else 2). The trainer trains with ``choice.num_bf16_res`` and logs
    ``choice.mlflow_params()``. It builds its own ``GANTrainer``s, so call it before constructing
    the run's trainer (not from inside ``GANTrainer``) and before ``torch.distributed`` starts.
    """
    candidate = candidate_bf16_res or cfg.num_bf16_res or DEFAULT_BF16_RES
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The measurement trains single-process steps; inside a process group its trainers would
        # all-reduce with ranks that are not measuring. Choose first, then start the group.
        raise RuntimeError("choose_precision must run before torch.distributed is initialised (or on one "
                           "process outside the group); pass its num_bf16_res to every rank")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    path = cache_path or default_cache_path()
    key = cache_key(cfg, candidate, device)
    entries = _read_cache(path)
    if not refresh and key in entries:
        entry = entries[key]
        try:
            fp32_s, bf16_s, error = float(entry["fp32_step_s"]), entry["bf16_step_s"], entry["bf16_error"]
        except (KeyError, TypeError, ValueError):
            entry = None
        if entry is not None:
            use_bf16, reason = decide(fp32_s, bf16_s, error)
            return PrecisionChoice(candidate if use_bf16 else 0, candidate, fp32_s, bf16_s, error, reason, key, True)
    fp32_s, bf16_s, error = _measure(cfg, candidate, device, steps, warmup)
    use_bf16, reason = decide(fp32_s, bf16_s, error)
    log.info("precision: %s (float32 step %.4f s, bf16 step %s, key %s)", reason, fp32_s,
             "n/a" if bf16_s is None else f"{bf16_s:.4f} s", key)
    entries[key] = {"fp32_step_s": fp32_s, "bf16_step_s": bf16_s, "bf16_error": error, "measured": time.time()}
    try:
        _write_cache(path, entries)
    except OSError as exc:  # a read-only home must not stop training
        log.warning("could not write the precision cache %s: %s", path, exc)
    return PrecisionChoice(candidate if use_bf16 else 0, candidate, fp32_s, bf16_s, error, reason, key, False)
