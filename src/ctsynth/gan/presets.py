"""StyleGAN2-ADA configuration presets (``docs/gan.md`` has the table).

``make_config(preset, resolution, gpus, **overrides)`` returns a ``GANConfig``
whose field names are the knobs a reader of the paper expects. Presets:

* ``auto``: the ADA paper's size-dependent defaults.
* ``stylegan2``: StyleGAN2 config F (the reference study's choice).
* ``paper256``: the ADA paper's 256x256 setting.
* ``cifar``: the ADA paper's CIFAR-10 setting (no style mixing, no path-length
  regularisation, a discriminator without residual connections: ``orig``).
* ``cpu64``: ours -- small enough to train on CPU for the embedded default data.
* ``bench64``: the fixed configuration of the speed benchmark (``benchmarks/gan_throughput.py``).
* ``tiny``: for tests (seconds on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["D_ARCHITECTURES", "GANConfig", "PRESETS", "make_config"]

# The discriminator architectures of networks.Discriminator (listed here so that importing the
# presets stays cheap: no torch).
D_ARCHITECTURES = ("resnet", "orig", "skip")


@dataclass
class GANConfig:
    """Everything that defines a StyleGAN2-ADA training run.

    Units: ``kimg`` (thousands of real images shown to D), ``snap`` (kimg
    between snapshots), ``ema_kimg`` (half-life of the generator EMA, in
    thousands of images), ``batch`` (global, over all GPUs).
    """

    resolution: int
    img_channels: int = 1
    c_dim: int = 0  # 0: unconditional; else the number of classes (one-hot labels)
    z_dim: int = 512
    w_dim: int = 512
    map_layers: int = 8
    mapping_lr_mul: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    batch: int = 32
    mbstd: int = 4  # minibatch-std group size
    lr: float = 0.002  # Adam lr for G and D (before the lazy-regularisation correction)
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8
    gamma: float = 10.0  # R1 weight
    ema_kimg: float = 10.0
    ema_rampup: float | None = None
    style_mixing_prob: float = 0.9
    pl_weight: float = 2.0
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    r1_interval: int = 16
    pl_interval: int = 4
    ada_target: float = 0.6
    ada_kimg: float = 500.0
    ada_interval: int = 4
    augment: str = "bgc"  # AugmentPipe spec; "none" disables augmentation
    fixed_p: float | None = None  # None: adaptive p; else a constant p
    mirror: bool = False  # dataset x-flips: each real image also shown mirrored (the ADA paper's small-set default)
    conv_clamp: float | None = 256.0
    d_architecture: str = "resnet"  # resnet (config F) | orig (no residual; ADA's CIFAR) | skip
    d_label_map_layers: int = 8  # conditional D: FC layers (lr_mul 0.01) from the label embedding to cmap
    # Speed only (same maths up to rounding; may change between resumes): the top N resolutions
    # of G and D in bfloat16 where the hardware supports it (0: all float32, the reference), and
    # channels-last (NHWC) feature maps.
    num_bf16_res: int = 0
    channels_last: bool = False
    kimg: float = 25000.0
    snap: float = 200.0
    seed: int = 0

    def __post_init__(self) -> None:
        log2 = math.log2(self.resolution) if self.resolution > 0 else -1
        if self.resolution < 4 or log2 != int(log2):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if self.batch < 1 or self.mbstd < 1:
            raise ValueError(f"batch ({self.batch}) and mbstd ({self.mbstd}) must be >= 1")
        if self.num_bf16_res < 0:
            raise ValueError(f"num_bf16_res must be >= 0, got {self.num_bf16_res}")
        if self.d_label_map_layers < 1:
            raise ValueError(f"d_label_map_layers must be >= 1, got {self.d_label_map_layers}")
        if self.d_architecture not in D_ARCHITECTURES:
            raise ValueError(f"d_architecture must be one of {D_ARCHITECTURES}, got {self.d_architecture!r}")
        if self.fixed_p is not None and not 0 <= self.fixed_p <= 1:
            raise ValueError(f"fixed_p must be in [0, 1] or None, got {self.fixed_p}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for MLflow params and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GANConfig":
        _check_keys(values)
        return cls(**values)


def _check_keys(values: dict[str, Any]) -> None:
    valid = {f.name for f in dataclasses.fields(GANConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown GAN config key(s) {unknown}; valid keys are {sorted(valid)}")


def _auto(resolution: int, gpus: int) -> dict[str, Any]:
    batch = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
    return {
        "batch": batch,
        "mbstd": min(batch // gpus, 4),
        "channel_base": 32768 if resolution >= 512 else 16384,
        "channel_max": 512,
        "map_layers": 2,
        "lr": 0.002 if resolution >= 1024 else 0.0025,
        "gamma": 0.0002 * resolution**2 / batch,
        "ema_kimg": batch * 10 / 32,
        "ema_rampup": 0.05,
    }


def _stylegan2(resolution: int, gpus: int) -> dict[str, Any]:
    return {
        "batch": 32, "mbstd": 4, "channel_base": 32768, "channel_max": 512, "map_layers": 8,
        "lr": 0.002, "gamma": 10.0, "ema_kimg": 10.0, "ema_rampup": None,
    }


def _paper256(resolution: int, gpus: int) -> dict[str, Any]:
    return {
        "batch": 64, "mbstd": 8, "channel_base": 16384, "channel_max": 512, "map_layers": 8,
        "lr": 0.0025, "gamma": 1.0, "ema_kimg": 20.0, "ema_rampup": None,
    }


def _cifar(resolution: int, gpus: int) -> dict[str, Any]:
    return {
        "batch": 64, "mbstd": 32, "channel_base": 32768, "channel_max": 512, "map_layers": 2,
        "lr": 0.0025, "gamma": 0.01, "ema_kimg": 500.0, "ema_rampup": 0.05,
        "style_mixing_prob": 0.0, "pl_weight": 0.0, "d_architecture": "orig",
    }


def _cpu64(resolution: int, gpus: int) -> dict[str, Any]:
    # The embedded default on 2 CPU cores: ~20 kimg in ~10 minutes must give chest slices. Chosen by
    # benchmarks/gan_convergence.py (docs/gan.md has the runs): channels 128 at 4-8 px down to 16
    # at 64 px (~3x cheaper per image than channel_base 2048, the same quality per kimg); no path
    # length or style mixing, as the ADA paper's CIFAR setting (cheaper steps; at this length they
    # made no visible difference); ADA's p allowed to move 5x faster than the paper's 500 kimg,
    # because D over-fits 300 images within a few kimg and p must be able to follow in 20 kimg
    # (with ada_kimg 500 the samples collapsed to one image); R1 gamma 1 instead of the auto
    # formula's 0.05, which let D run away at ~18 kimg and G fall apart into noise.
    batch = 16
    return {
        "batch": batch, "mbstd": 4, "channel_base": 1024, "channel_max": 128, "map_layers": 2,
        "z_dim": 256, "w_dim": 256, "lr": 0.0025, "gamma": 1.0,
        "ema_kimg": batch * 10 / 32, "ema_rampup": 0.05, "style_mixing_prob": 0.0, "pl_weight": 0.0,
        "ada_kimg": 100.0, "kimg": 20.0, "snap": 2.0,
        # NHWC feature maps: oneDNN's fast layout for the convs and the depthwise FIR (1.13-1.15x
        # per step in the interleaved lever run; docs/gan.md "Speed").
        "channels_last": True,
    }


def _bench64(resolution: int, gpus: int) -> dict[str, Any]:
    # The speed benchmark's own fixed configuration: conditional on 2 classes, ADA "bgc" at a fixed
    # p = 0.2 so every minibatch does the same augmentation work, full lazy schedule.
    batch = 16
    return {
        "batch": batch, "mbstd": 4, "channel_base": 8192, "channel_max": 256, "map_layers": 2,
        "z_dim": 256, "w_dim": 256, "c_dim": 2, "lr": 0.0025, "gamma": 0.0002 * resolution**2 / batch,
        "ema_kimg": batch * 10 / 32, "ema_rampup": 0.05, "style_mixing_prob": 0.9,
        "augment": "bgc", "fixed_p": 0.2, "pl_interval": 4, "r1_interval": 16,
    }


def _tiny(resolution: int, gpus: int) -> dict[str, Any]:
    batch = 4
    return {
        "batch": batch, "mbstd": 2, "channel_base": 1024, "channel_max": 64, "map_layers": 2,
        "z_dim": 64, "w_dim": 64, "lr": 0.0025, "gamma": 0.0002 * resolution**2 / batch,
        "ema_kimg": 1.0, "ema_rampup": 0.05, "style_mixing_prob": 0.9,
        "kimg": 1.0, "snap": 1.0,
    }


PRESETS = {
    "auto": _auto,
    "stylegan2": _stylegan2,
    "paper256": _paper256,
    "cifar": _cifar,
    "cpu64": _cpu64,
    "bench64": _bench64,
    "tiny": _tiny,
}


def make_config(preset: str, resolution: int, gpus: int = 1, **overrides: Any) -> GANConfig:
    """The preset's values for ``resolution`` and ``gpus``, then ``overrides`` on top.

    Raises ``ValueError`` for an unknown preset or override key, or a batch
    that does not split evenly over the GPUs.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown GAN preset {preset!r}; expected one of {sorted(PRESETS)}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    _check_keys(overrides)
    if "resolution" in overrides:
        raise ValueError("pass resolution as the positional argument, not as an override")
    values = PRESETS[preset](resolution, gpus) | overrides
    config = GANConfig(resolution=resolution, **values)
    if config.batch % gpus != 0:
        raise ValueError(f"batch {config.batch} is not divisible by gpus={gpus}")
    if config.batch // gpus % min(config.mbstd, config.batch // gpus) != 0:
        raise ValueError(f"per-GPU batch {config.batch // gpus} is not divisible by mbstd {config.mbstd}")
    return config
