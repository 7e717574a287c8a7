"""Low-level ops used by the StyleGAN2 networks.

Today these are the pure-PyTorch reference implementations. A later change adds
fused C++/CUDA kernels and picks them automatically when they build; callers
import from here, never from ``reference`` directly, so that switch is one place.
"""

from ctsynth.gan.ops.reference import (
    ACTIVATIONS,
    bias_act,
    downsample2d,
    parse_padding,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

__all__ = [
    "ACTIVATIONS",
    "bias_act",
    "downsample2d",
    "parse_padding",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]
