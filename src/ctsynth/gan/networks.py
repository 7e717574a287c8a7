"""StyleGAN2 generator and discriminator (config "F" of Karras et al. 2020; D also "orig" / "skip").

Written from the papers ("Analyzing and Improving the Image Quality of
StyleGAN", "Training Generative Adversarial Networks with Limited Data"). The file reads top to bottom: building blocks, then the
generator (mapping -> synthesis), then the discriminator.

Conventions that hold everywhere:

* Equalised learning rate: every weight is stored as ``N(0, 1) / lr_mul`` and
  scaled at run time by ``lr_mul / sqrt(fan_in)``; biases by ``lr_mul``. Adam's
  update size is then the same for every layer, whatever its fan-in.
* Leaky ReLU (slope 0.2) is followed by a gain of ``sqrt(2)`` so activations
  keep unit second moment; conv outputs are clamped to ``+-conv_clamp``.
* Resampling uses the normalised separable FIR filter ``[1, 3, 3, 1]`` with
  centred padding, so images never shift by half a pixel between resolutions.
* Images are ``N x C x H x W`` in ``[-1, 1]`` (roughly; G is not squashed).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ctsynth.gan.presets import D_ARCHITECTURES
from ctsynth.gan.ops import ACTIVATIONS, bias_act, downsample2d, setup_filter, upfirdn2d, upsample2d

__all__ = [
    "normalize_2nd_moment",
    "FullyConnected",
    "Conv2dLayer",
    "modulated_conv2d",
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "Generator",
    "DiscriminatorBlock",
    "MinibatchStdLayer",
    "DiscriminatorEpilogue",
    "Discriminator",
    "D_ARCHITECTURES",
    "channels_at",
    "bf16_supported",
]

DEFAULT_RESAMPLE_FILTER: tuple[int, ...] = (1, 3, 3, 1)
SQRT_HALF = math.sqrt(0.5)


@functools.lru_cache(maxsize=None)
def bf16_supported(device_type: str) -> bool:
    """Whether bfloat16 convolutions run natively here (CPU: oneDNN with avx512_bf16 / AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def block_dtype(use_reduced_precision: bool, device: torch.device) -> torch.dtype:
    """bfloat16 for a reduced-precision block where the hardware supports it, else float32.

    The CPU counterpart of the reference's fp16 layers on GPU: only the highest resolutions,
    where the big convolutions are, and always with the +-conv_clamp activation clamp.
    """
    if use_reduced_precision and bf16_supported(device.type):
        return torch.bfloat16
    return torch.float32


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at a resolution: ``min(channel_base // resolution, channel_max)``."""
    return min(channel_base // resolution, channel_max)


def _check_resolution(resolution: int) -> int:
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution < 4 or 2**log2 != resolution:
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    return log2


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` so that its mean square along ``dim`` is 1 (pixel norm of z / label embeddings)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ---------------------------------------------------------------------------
# Equalised-learning-rate layers
# ---------------------------------------------------------------------------


class FullyConnected(nn.Module):
    """Dense layer with equalised learning rate and a fused bias + activation.

    ``lr_mul`` (0.01 in the mapping network) slows a layer down relative to the
    rest without touching the optimiser: the stored parameter is ``1/lr_mul``
    times larger and the run-time scale ``lr_mul`` times smaller, so Adam's
    (scale-invariant) step moves the effective weight ``lr_mul`` times less.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_mul: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.lr_mul = lr_mul
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        # Stored so that the effective initial bias (parameter * lr_mul) is bias_init.
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.activation}, lr_mul={self.lr_mul}"


class Conv2dLayer(nn.Module):
    """Plain (non-modulated) conv with equalised learning rate, optional FIR downsampling.

    Used by the discriminator. Downsampling is "blur, then strided conv": the
    FIR low-pass removes what a stride-2 conv would otherwise alias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        down: int = 1,
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        if self.down > 1:
            # Total padding fw - down + k - 1 makes output i centred on input down*i + (down-1)/2.
            total = self.resample_filter.shape[-1] - self.down + self.kernel_size - 1
            p0, p1 = (total + 1) // 2, total // 2
            x = upfirdn2d(x, self.resample_filter, padding=(p0, p1, p0, p1))
            x = F.conv2d(x, w, stride=self.down)
        else:
            x = F.conv2d(x, w, padding=self.kernel_size // 2)
        act_gain = bias_act_gain(self.activation) * gain
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=act_gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"act={self.activation}, down={self.down}"
        )


def bias_act_gain(activation: str) -> float:
    """The variance-preserving gain of an activation (``sqrt(2)`` for lrelu)."""
    return ACTIVATIONS[activation][1]


# ---------------------------------------------------------------------------
# Modulated convolution (weight demodulation, StyleGAN2 Sec. 2.2)
# ---------------------------------------------------------------------------


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    eps: float = 1e-8,
    fused: bool = True,
) -> torch.Tensor:
    """Conv whose weights are scaled per sample by ``styles`` (one scale per input channel).

    ``w'_{n,o,i,k} = w_{o,i,k} * s_{n,i}``; with ``demodulate``,
    ``w''_{n,o,i,k} = w'_{n,o,i,k} / sqrt(sum_{i,k} w'^2 + eps)``, which makes
    each output channel unit-variance for unit-variance i.i.d. input. This
    replaces AdaIN's data-dependent normalisation with a statistical one.

    Every sample has its own weights, so the batch is folded into the channel
    axis and run as ONE grouped conv (``groups = N``): no Python loop.

    With ``up=2`` the conv is a stride-2 transposed conv followed by the FIR
    filter (gain 4). This is the same as "zero-insert, FIR, conv" up to the
    (learned, so immaterial) flip of the kernel, at a quarter of the cost.

    ``fused=False`` computes the identical result the other way the paper
    describes: scale the input activations by the styles, run ONE ordinary
    batched conv with the shared weight, scale the outputs by the demodulation
    coefficients. Use it when gradients flow (training): PyTorch's double
    backward of a grouped conv loops over the groups (here: the batch), and the
    weight gradient of a shared weight is one conv instead of N.

    Args:
        x: ``N x I x H x W``.
        weight: ``O x I x kh x kw`` (any equalised-lr gain already applied or
            irrelevant because of demodulation).
        styles: ``N x I``.
    """
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    if up > 1 and resample_filter is None:
        raise ValueError("modulated_conv2d with up > 1 needs a resample_filter")
    if not fused:
        return _modulated_conv2d_unfused(x, weight, styles, demodulate, up, padding, resample_filter, eps)
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, in_channels, 1, 1)  # N O I kh kw
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + eps).rsqrt()  # N O
        w = w * dcoefs.reshape(batch, out_channels, 1, 1, 1)
    w = w.to(x.dtype)

    x = x.reshape(1, batch * in_channels, height, width)
    if up == 1:
        x = F.conv2d(x, w.reshape(batch * out_channels, in_channels, kh, kw), padding=padding, groups=batch)
    else:
        # conv_transpose2d wants weights as (in, out/groups, kh, kw).
        w_t = w.transpose(1, 2).reshape(batch * in_channels, out_channels, kh, kw)
        x = F.conv_transpose2d(x, w_t, stride=up, groups=batch)
        x = _upsample_after_transposed_conv(x, resample_filter, up, kh)
    return x.reshape(batch, out_channels, x.shape[2], x.shape[3])


def _upsample_after_transposed_conv(x: torch.Tensor, f: torch.Tensor, up: int, kernel_size: int) -> torch.Tensor:
    """FIR after a stride-``up`` transposed conv: output ``(H-1)*up + k`` becomes ``H*up``, centred."""
    total = up + f.shape[-1] - kernel_size - 1
    p0, p1 = (total + 1) // 2, total // 2
    return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=up * up)


def _modulated_conv2d_unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool,
    up: int,
    padding: int,
    resample_filter: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``modulated_conv2d`` as scale-inputs, shared conv, scale-outputs (see its docstring)."""
    batch, in_channels = styles.shape
    x = x * styles.to(x.dtype).reshape(batch, in_channels, 1, 1)
    w = weight.to(x.dtype)
    if up == 1:
        x = F.conv2d(x, w, padding=padding)
    else:
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=up)
        x = _upsample_after_transposed_conv(x, resample_filter, up, weight.shape[-1])
    if demodulate:
        # sum_{i,k} (w_{o,i,k} s_{n,i})^2 = sum_i s_{n,i}^2 sum_k w_{o,i,k}^2
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).T + eps).rsqrt()  # N O
        x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
    return x


def use_fused_modconv(grouped: bool = False) -> bool:
    """Grouped (fused) modulated conv for inference, the batched unfused form when
    gradients are tracked (see ``modulated_conv2d``); both compute the same thing.
    ``grouped=True`` always uses the grouped form (the reference path in benchmarks)."""
    return grouped or not torch.is_grad_enabled()


# ---------------------------------------------------------------------------
# Generator: mapping network
# ---------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """z (and label c) -> intermediate latent w, broadcast to ``num_ws`` style inputs.

    Also used, with ``z_dim = 0``, as the discriminator's label embedding (cmap).
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        lr_mul: float = 0.01,
        w_avg_beta: float | None = 0.995,
    ) -> None:
        super().__init__()
        if z_dim == 0 and c_dim == 0:
            raise ValueError("MappingNetwork needs z_dim > 0 or c_dim > 0")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = (w_dim if c_dim > 0 else 0) if embed_features is None else embed_features
        layer_features = w_dim if layer_features is None else layer_features
        if num_layers == 0 and z_dim + embed_features != w_dim:
            raise ValueError("with num_layers=0 the normalised input must already have w_dim features")

        self.embed = FullyConnected(c_dim, embed_features) if c_dim > 0 else None
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        self.layers = nn.ModuleList(
            FullyConnected(features[i], features[i + 1], activation=activation, lr_mul=lr_mul)
            for i in range(num_layers)
        )
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))
        else:
            self.w_avg = None

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None,
        psi: float = 1.0,
        cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        """Returns ``N x num_ws x w_dim`` (or ``N x w_dim`` when ``num_ws`` is None).

        Args:
            psi: truncation ``w = w_avg + psi (w - w_avg)``; 1 disables it.
            cutoff: truncate only the first ``cutoff`` style inputs (coarse layers).
            update_emas: update ``w_avg`` (only during G training steps).
        """
        parts = []
        if self.z_dim > 0:
            if z is None:
                raise ValueError("this mapping network needs z")
            parts.append(normalize_2nd_moment(z))
        if self.embed is not None:
            if c is None or c.shape[-1] != self.c_dim:
                raise ValueError(f"expected labels with {self.c_dim} columns, got {None if c is None else tuple(c.shape)}")
            parts.append(normalize_2nd_moment(self.embed(c.to(self.embed.weight.dtype))))  # labels may be int
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)

        if update_emas and self.w_avg is not None:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if psi != 1.0:
            if self.w_avg is None:
                raise ValueError("truncation needs w_avg tracking (w_avg_beta is None)")
            if cutoff is None:
                x = self.w_avg.lerp(x, psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :cutoff], psi), x[:, cutoff:]], dim=1)
        return x


# ---------------------------------------------------------------------------
# Generator: synthesis network
# ---------------------------------------------------------------------------


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling x2) + noise + bias + lrelu."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.grouped_modconv = False  # True: always the grouped form (see use_fused_modconv)
        # Style affine: bias init 1 so that styles start around 1 (identity modulation).
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if use_noise:
            # A fixed noise image for noise_mode='const' (reproducible renders).
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(
            x, self.weight, styles, demodulate=True, up=self.up, padding=self.padding,
            resample_filter=self.resample_filter, fused=use_fused_modconv(self.grouped_modconv),
        )
        if self.use_noise and noise_mode != "none":
            if noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            elif noise_mode == "const":
                noise = self.noise_const.to(x.dtype)
            else:
                raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
            x = x + noise * self.noise_strength.to(x.dtype)
        act_gain = bias_act_gain(self.activation) * gain
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=act_gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated (not demodulated) 1x1 conv to image channels.

    Not demodulated because its output is the image itself: the style should
    be able to set the output scale.
    """

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1, conv_clamp: float | None = None
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.grouped_modconv = False  # True: always the grouped form (see use_fused_modconv)
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # equalised lr folded into the styles
        x = modulated_conv2d(
            x, self.weight, styles, demodulate=False, padding=self.padding,
            fused=use_fused_modconv(self.grouped_modconv),
        )
        return bias_act(x, self.bias, act="linear", clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const | upsampling conv) -> conv -> toRGB.

    The 4x4 block starts from a learned constant and has a single conv; every
    later block has two (the first upsamples). Style inputs consumed:
    ``num_conv`` for the convs and one for toRGB, which shares its w with the
    next block's first conv (hence ``num_ws = 2 log2(R) - 2``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
            self.num_conv = 1
        else:
            self.const = None
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim, resolution, up=2,
                resample_filter=resample_filter, conv_clamp=conv_clamp,
            )
            self.num_conv = 2
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim, resolution, resample_filter=resample_filter, conv_clamp=conv_clamp
        )
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb = 1
        # Set by SynthesisNetwork: bfloat16 features where supported, channels-last layout.
        self.use_bf16 = False
        self.channels_last = False

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws``: ``N x (num_conv + 1) x w_dim``. Returns the features and the running image.

        The features may be bfloat16 (``use_bf16``); the image always stays float32.
        """
        dtype = block_dtype(self.use_bf16, ws.device)
        layout = memory_format(self.channels_last)
        if self.const is not None:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1).contiguous(memory_format=layout)
        else:
            x = self.conv0(x.to(dtype=dtype, memory_format=layout), ws[:, 0], noise_mode=noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode=noise_mode)
        y = self.torgb(x, ws[:, self.num_conv]).to(torch.float32)
        # Skip architecture: the image so far is upsampled and the new toRGB output added.
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws -> image, one SynthesisBlock per resolution 4, 8, ..., img_resolution."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        conv_clamp: float | None = 256,
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        num_bf16_res: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        self.channels = {r: channels_at(r, channel_base, channel_max) for r in self.block_resolutions}
        self.blocks = nn.ModuleDict()
        for res in self.block_resolutions:
            in_channels = self.channels[res // 2] if res > 4 else 0
            self.blocks[f"b{res}"] = SynthesisBlock(
                in_channels, self.channels[res], w_dim, res, img_channels,
                resample_filter=resample_filter, conv_clamp=conv_clamp,
            )
        self.num_ws = sum(block.num_conv for block in self.blocks.values()) + 1
        set_speed_options(self, num_bf16_res, channels_last)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"expected ws of shape N x {self.num_ws} x {self.w_dim}, got {tuple(ws.shape)}")
        x = img = None
        index = 0
        for block in self.blocks.values():
            block_ws = ws.narrow(1, index, block.num_conv + block.num_torgb)
            x, img = block(x, img, block_ws, noise_mode=noise_mode)
            index += block.num_conv
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: ``MappingNetwork`` then skip ``SynthesisNetwork``.

    ``c_dim = 0`` means unconditional (pass ``c=None`` or an ``N x 0`` tensor).
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        map_layers: int = 8,
        mapping_lr_mul: float = 0.01,
        w_avg_beta: float = 0.995,
        conv_clamp: float | None = 256,
        num_bf16_res: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(
            w_dim, img_resolution, img_channels, channel_base=channel_base, channel_max=channel_max,
            conv_clamp=conv_clamp, num_bf16_res=num_bf16_res, channels_last=channels_last,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim, c_dim, w_dim, num_ws=self.num_ws, num_layers=map_layers, lr_mul=mapping_lr_mul,
            w_avg_beta=w_avg_beta,
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        psi: float = 1.0,
        cutoff: int | None = None,
        noise_mode: str = "random",
        update_emas: bool = False,
    ) -> torch.Tensor:
        ws = self.mapping(z, c, psi=psi, cutoff=cutoff, update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode)

    def mapping_with_mixing(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None,
        mixing_prob: float,
        update_emas: bool = False,
    ) -> torch.Tensor:
        """Style-mixing regularisation: with probability ``mixing_prob`` a second latent takes over
        from one crossover layer onwards (uniform in ``1 .. num_ws - 1``).

        Both draws are made once per minibatch, as in the StyleGAN2 setup: the whole minibatch is
        mixed or not, at the same layer, so the network cannot rely on adjacent styles being
        correlated. The draws stay on the device (no synchronisation).
        """
        ws = self.mapping(z, c, update_emas=update_emas)
        if mixing_prob <= 0:
            return ws
        crossover = torch.randint(1, self.num_ws, (), device=z.device)
        crossover = torch.where(torch.rand((), device=z.device) < mixing_prob, crossover, self.num_ws)
        ws2 = self.mapping(torch.randn_like(z), c, update_emas=False)
        take_second = torch.arange(self.num_ws, device=z.device) >= crossover
        return torch.where(take_second.reshape(1, -1, 1), ws2, ws)


# ---------------------------------------------------------------------------
# Discriminator (resnet, orig or skip)
# ---------------------------------------------------------------------------


class DiscriminatorBlock(nn.Module):
    """conv3x3 -> conv3x3 (down x2); ``resnet`` adds a 1x1 (down x2) skip and scales the sum by sqrt(1/2).

    ``orig`` and ``skip`` have no residual branch (``skip`` feeds the image in through fromRGB at
    every resolution instead, see ``Discriminator``).
    """

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
        architecture: str = "resnet",
    ) -> None:
        super().__init__()
        self.conv0 = Conv2dLayer(in_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(
            tmp_channels, out_channels, 3, activation="lrelu", down=2,
            resample_filter=resample_filter, conv_clamp=conv_clamp,
        )
        self.skip = (
            Conv2dLayer(in_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter)
            if architecture == "resnet" else None
        )
        # Set by Discriminator: bfloat16 features where supported, channels-last layout.
        self.use_bf16 = False
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=block_dtype(self.use_bf16, x.device), memory_format=memory_format(self.channels_last))
        if self.skip is None:
            return self.conv1(self.conv0(x))
        # The sqrt(1/2) gains keep the sum's variance equal to its parts'.
        y = self.skip(x, gain=SQRT_HALF)
        x = self.conv1(self.conv0(x), gain=SQRT_HALF)
        return x + y


class MinibatchStdLayer(nn.Module):
    """Append the std of features across a group of samples as extra channel(s).

    Lets D see batch-level variety and so penalise mode collapse. Samples
    ``n`` and ``n + N/G`` share a group; the batch must be divisible by the
    group size ``G = min(group_size, N)``.
    """

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        group = min(self.group_size, batch) if self.group_size > 0 else batch
        if batch % group != 0:
            raise ValueError(f"batch {batch} is not divisible by the minibatch-std group size {group}")
        f = self.num_channels
        y = x.reshape(group, -1, f, channels // f, height, width)  # G, N/G, F, C/F, H, W
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # std over the group
        y = y.mean(dim=[2, 3, 4])  # N/G, F: average over channels and pixels
        y = y.reshape(-1, f, 1, 1).repeat(group, 1, height, width)  # N, F, H, W
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std -> conv3x3 -> FC -> output FC (-> label projection)."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int = 4,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(
            in_channels + mbstd_num_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.fc = FullyConnected(in_channels * resolution * resolution, in_channels, activation="lrelu")
        self.out = FullyConnected(in_channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            # Projection discriminator: score = <features, embed(c)> / sqrt(cmap_dim).
            x = (x * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return x


class Discriminator(nn.Module):
    """StyleGAN2 discriminator; returns one logit per image (``N x 1``).

    ``architecture`` (StyleGAN2 paper, figure 7): ``resnet`` (config F, the default) has a
    residual 1x1 branch in every block; ``orig`` is the plain chain fromRGB -> blocks (the ADA
    paper's CIFAR-10 setting); ``skip`` downsamples the image alongside the features and adds
    fromRGB of it at the input of every lower resolution (and of the 4x4 head).

    ``c_dim = 0`` means unconditional. Conditional: the label goes through a
    small mapping network (``label_map_layers`` FC layers, lr_mul 0.01) to
    ``cmap`` and the output is its projection onto the final features.
    """

    def __init__(
        self,
        c_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
        cmap_dim: int | None = None,
        label_map_layers: int = 8,
        conv_clamp: float | None = 256,
        resample_filter: Sequence[int] = DEFAULT_RESAMPLE_FILTER,
        num_bf16_res: int = 0,
        channels_last: bool = False,
        architecture: str = "resnet",
    ) -> None:
        super().__init__()
        if architecture not in D_ARCHITECTURES:
            raise ValueError(f"unknown discriminator architecture {architecture!r}; expected one of {D_ARCHITECTURES}")
        log2 = _check_resolution(img_resolution)
        self.architecture = architecture
        self.c_dim = c_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        self.channels = {r: channels_at(r, channel_base, channel_max) for r in self.block_resolutions + [4]}
        if cmap_dim is None:
            cmap_dim = self.channels[4]
        if c_dim == 0:
            cmap_dim = 0

        self.fromrgb = Conv2dLayer(img_channels, self.channels[img_resolution], 1, activation="lrelu", conv_clamp=conv_clamp)
        self.blocks = nn.ModuleDict()
        for res in self.block_resolutions:
            self.blocks[f"b{res}"] = DiscriminatorBlock(
                self.channels[res], self.channels[res], self.channels[res // 2],
                resample_filter=resample_filter, conv_clamp=conv_clamp, architecture=architecture,
            )
            self.blocks[f"b{res}"].resolution_in = res
        # skip: fromRGB of the downsampled image at every resolution below the top one.
        self.skip_fromrgb = nn.ModuleDict({
            f"b{res}": Conv2dLayer(img_channels, self.channels[res], 1, activation="lrelu", conv_clamp=conv_clamp)
            for res in self.block_resolutions[1:] + [4]
        }) if architecture == "skip" else None
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.mapping = (
            MappingNetwork(0, c_dim, cmap_dim, num_ws=None, num_layers=label_map_layers, w_avg_beta=None)
            if c_dim > 0 else None
        )
        self.epilogue = DiscriminatorEpilogue(
            self.channels[4], cmap_dim, resolution=4, mbstd_group_size=mbstd_group_size,
            mbstd_num_channels=mbstd_num_channels, conv_clamp=conv_clamp,
        )
        set_speed_options(self, num_bf16_res, channels_last)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # fromRGB runs in the dtype / layout of the first (highest-resolution) block.
        first = next(iter(self.blocks.values()), None)
        if first is not None:
            dtype = block_dtype(first.use_bf16, img.device)
            img = img.to(dtype=dtype, memory_format=memory_format(first.channels_last))
        x = self.fromrgb(img)
        for name, block in self.blocks.items():
            if self.skip_fromrgb is not None and name in self.skip_fromrgb:
                x = x + self.skip_fromrgb[name](img.to(dtype=block_dtype(block.use_bf16, img.device)))
            x = block(x)
            if self.skip_fromrgb is not None:
                img = downsample2d(img.float(), self.resample_filter)
        if self.skip_fromrgb is not None:
            x = x.float() + self.skip_fromrgb["b4"](img.float())
        cmap = self.mapping(None, c) if self.mapping is not None else None
        return self.epilogue(x.to(dtype=torch.float32, memory_format=torch.contiguous_format), cmap)


def set_speed_options(
    network: nn.Module, num_bf16_res: int = 0, channels_last: bool = False, grouped_modconv: bool = False
) -> None:
    """Speed settings that do not change what a network computes (up to rounding).

    ``num_bf16_res``: the top N resolutions compute in bfloat16 where the hardware supports it
    (their activations are clamped to +-conv_clamp as everywhere). ``channels_last``: NHWC
    feature maps (oneDNN's fast layout). ``grouped_modconv``: always the grouped form of the
    modulated conv (the reference path); otherwise the batched form while training.
    Works on a Generator, SynthesisNetwork or Discriminator (and reapplies after loading).
    """
    if num_bf16_res < 0:
        raise ValueError(f"num_bf16_res must be >= 0, got {num_bf16_res}")
    blocks = _blocks(network)
    resolutions = sorted({_block_resolution(m) for m in blocks}, reverse=True)
    reduced = set(resolutions[:num_bf16_res])
    for block in blocks:
        block.use_bf16 = _block_resolution(block) in reduced
        block.channels_last = channels_last
    for layer in network.modules():
        if isinstance(layer, (SynthesisLayer, ToRGBLayer)):
            layer.grouped_modconv = grouped_modconv


@contextlib.contextmanager
def float32_blocks(network: nn.Module) -> Iterator[None]:
    """Every block of ``network`` computes in float32 while inside; its bf16 choice comes back after.

    Only the forward pass needs to be inside: autograd replays the dtypes that forward used.
    """
    blocks = _blocks(network)
    chosen = [block.use_bf16 for block in blocks]
    for block in blocks:
        block.use_bf16 = False
    try:
        yield
    finally:
        for block, use_bf16 in zip(blocks, chosen):
            block.use_bf16 = use_bf16


def _blocks(network: nn.Module) -> list[nn.Module]:
    """The synthesis / discriminator blocks of a network: where the speed options live."""
    return [m for m in network.modules() if isinstance(m, (SynthesisBlock, DiscriminatorBlock))]


def _block_resolution(block: nn.Module) -> int:
    if isinstance(block, SynthesisBlock):
        return block.resolution
    return block.resolution_in
