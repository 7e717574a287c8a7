"""Correctness tests for the StyleGAN2 building blocks, networks, ops and presets (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from ctsynth.gan.networks import (
    Conv2dLayer,
    Discriminator,
    FullyConnected,
    Generator,
    MinibatchStdLayer,
    modulated_conv2d,
)
from ctsynth.gan.ops import bias_act, downsample2d, setup_filter, upfirdn2d, upsample2d
from ctsynth.gan.presets import GANConfig, make_config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------


def test_upfirdn2d_impulse_response_is_the_filter() -> None:
    """A true convolution of a unit impulse reproduces the (unflipped) 2-D filter."""
    f = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0], [5.0, 0.0, 6.0]])
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 1.0
    y = upfirdn2d(x, f, padding=1)
    assert y.shape == (1, 1, 7, 7)
    torch.testing.assert_close(y[0, 0, 2:5, 2:5], f)
    # Correlation (flip_filter=True) gives the flipped filter.
    y_corr = upfirdn2d(x, f, padding=1, flip_filter=True)
    torch.testing.assert_close(y_corr[0, 0, 2:5, 2:5], f.flip([0, 1]))


def test_fir_resampling_keeps_constant_image_constant() -> None:
    f = setup_filter([1, 3, 3, 1])
    x = torch.full((2, 3, 16, 16), 0.7)
    up = upsample2d(x, f)
    assert up.shape == (2, 3, 32, 32)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7))
    down = downsample2d(x, f)
    assert down.shape == (2, 3, 8, 8)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 0.7))


def test_fir_resampling_is_centred_on_a_ramp() -> None:
    """Linear functions are reproduced exactly by a symmetric interpolator: checks the
    padding keeps the image centred (up: sample j at (j + 0.5)/2 - 0.5, down: at 2i + 0.5)."""
    f = setup_filter([1, 3, 3, 1])
    ramp = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16).repeat(1, 1, 16, 1)
    up = upsample2d(ramp, f)
    expected_up = (torch.arange(32, dtype=torch.float32) + 0.5) / 2 - 0.5
    torch.testing.assert_close(up[0, 0, 8, 2:-2], expected_up[2:-2])
    down = downsample2d(ramp, f)
    expected_down = torch.arange(8, dtype=torch.float32) * 2 + 0.5
    torch.testing.assert_close(down[0, 0, 4, 1:-1], expected_down[1:-1])


def test_up_then_down_preserves_a_smooth_image() -> None:
    f = setup_filter([1, 3, 3, 1])
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = (torch.sin(2 * math.pi * xx / 32) * torch.cos(2 * math.pi * yy / 32)).reshape(1, 1, 32, 32)
    back = downsample2d(upsample2d(img, f), f)
    assert back.shape == img.shape
    err = (back - img)[..., 3:-3, 3:-3].abs().max().item()
    assert err < 0.03, err


def test_bias_act_lrelu_gain_and_clamp() -> None:
    x = torch.tensor([[-1.0, 0.5, 1000.0]])
    b = torch.tensor([0.0, 0.5, 0.0]).reshape(3)
    y = bias_act(x.reshape(1, 3), b, dim=1, act="lrelu", clamp=256)
    expected = torch.tensor([[-0.2 * math.sqrt(2), 1.0 * math.sqrt(2), 256.0]])
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------
# equalised learning rate, modulated conv
# ---------------------------------------------------------------------------


def test_equalised_lr_fully_connected() -> None:
    layer = FullyConnected(50, 2000, lr_mul=0.01, bias_init=0.3)
    assert layer.weight_gain == pytest.approx(0.01 / math.sqrt(50))
    assert layer.weight.std().item() == pytest.approx(1 / 0.01, rel=0.03)  # stored N(0,1)/lr_mul
    x = torch.randn(4, 50)
    expected = x @ (layer.weight * 0.01 / math.sqrt(50)).T + layer.bias * 0.01
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.bias * layer.bias_gain, torch.full((2000,), 0.3))  # effective init


def test_equalised_lr_conv() -> None:
    layer = Conv2dLayer(16, 32, 3)
    assert layer.weight_gain == pytest.approx(1 / math.sqrt(16 * 9))
    assert layer.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_demodulated_conv_output_has_unit_variance() -> None:
    batch, in_ch, out_ch, size = 32, 24, 16, 16
    x = torch.randn(batch, in_ch, size, size)
    weight = torch.randn(out_ch, in_ch, 3, 3) * 3.0
    styles = torch.randn(batch, in_ch) * 0.5 + 1.0
    y = modulated_conv2d(x, weight, styles, demodulate=True, padding=1)
    assert y.shape == (batch, out_ch, size, size)
    torch.testing.assert_close(
        modulated_conv2d(x, weight, styles, demodulate=True, padding=1, fused=False), y, rtol=1e-4, atol=1e-4
    )
    interior = y[..., 1:-1, 1:-1]  # zero padding lowers the variance at the border
    assert interior.var().item() == pytest.approx(1.0, abs=0.03)
    # Per sample and output channel too (demodulation is per (n, o)).
    per = interior.var(dim=(2, 3))
    assert per.mean().item() == pytest.approx(1.0, abs=0.03)


def test_modulated_conv_grouped_equals_per_sample_conv() -> None:
    x = torch.randn(3, 4, 8, 8)
    weight = torch.randn(5, 4, 3, 3)
    styles = torch.randn(3, 4)
    for up in (1, 2):
        f = setup_filter([1, 3, 3, 1])
        y = modulated_conv2d(x, weight, styles, demodulate=True, up=up, padding=1, resample_filter=f)
        for n in range(3):
            w = weight * styles[n].reshape(1, 4, 1, 1)
            w = w / (w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
            if up == 1:
                ref = torch.nn.functional.conv2d(x[n : n + 1], w, padding=1)
            else:  # zero-insertion upsample + FIR (gain 4) then a full conv with the flipped kernel
                ref = torch.nn.functional.conv_transpose2d(x[n : n + 1], w.transpose(0, 1), stride=2)
                ref = upfirdn2d(ref, f, padding=1, gain=4)
            torch.testing.assert_close(y[n : n + 1], ref, rtol=1e-4, atol=1e-5)
        assert y.shape[-1] == 8 * up
        for demodulate in (True, False):  # the unfused form (scale inputs, shared conv, scale outputs) agrees
            fused = modulated_conv2d(x, weight, styles, demodulate, up=up, padding=1, resample_filter=f)
            unfused = modulated_conv2d(x, weight, styles, demodulate, up=up, padding=1, resample_filter=f, fused=False)
            torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-4)


def test_generator_fused_and_unfused_paths_agree() -> None:
    G, _ = tiny_pair()
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        fused = G(z, None, noise_mode="const")
    unfused = G(z, None, noise_mode="const")  # grad enabled -> unfused
    torch.testing.assert_close(unfused.detach(), fused, rtol=1e-4, atol=1e-4)


def test_minibatch_std_matches_explicit_groups() -> None:
    x = torch.randn(4, 3, 2, 2)
    y = MinibatchStdLayer(group_size=2)(x)
    assert y.shape == (4, 4, 2, 2)
    # group size 2 over 4 samples: groups {0, 2} and {1, 3}
    for members in ((0, 2), (1, 3)):
        g = x[list(members)]
        std = (g.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        for n in members:
            torch.testing.assert_close(y[n, 3], torch.full((2, 2), std.item()))


# ---------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------

# A small config whose parameter counts are derived by hand below:
# 8x8 output, channels ch(r) = min(32 // r, 16): ch4 = 8, ch8 = 4.
Z, W, C_DIM, IMG, MAP = 6, 5, 3, 1, 2
CH4, CH8 = 8, 4


def fc(i: int, o: int) -> int:
    return i * o + o


def test_generator_parameter_count_formula() -> None:
    def expected(c_dim: int) -> int:
        embed = fc(c_dim, W) if c_dim else 0
        mapping = embed + fc(Z + (W if c_dim else 0), W) + fc(W, W)  # 2 map layers
        synth_layer = lambda i, o: fc(W, i) + o * i * 9 + o + 1  # affine, weight, bias, noise strength
        torgb = lambda i: fc(W, i) + IMG * i + IMG
        b4 = CH4 * 4 * 4 + synth_layer(CH4, CH4) + torgb(CH4)
        b8 = synth_layer(CH4, CH8) + synth_layer(CH8, CH8) + torgb(CH8)
        return mapping + b4 + b8

    for c_dim in (0, C_DIM):
        G = Generator(Z, c_dim, W, 8, IMG, channel_base=32, channel_max=16, map_layers=MAP)
        assert n_params(G) == expected(c_dim)
        assert G.num_ws == 2 * 3 - 2  # 2 log2(R) - 2


@pytest.mark.parametrize("architecture", ["resnet", "orig", "skip"])
def test_discriminator_parameter_count_formula(architecture) -> None:
    label_layers = 2

    def expected(c_dim: int) -> int:
        fromrgb = IMG * CH8 + CH8
        block = (CH8 * CH8 * 9 + CH8) + (CH4 * CH8 * 9 + CH4)  # conv0, conv1 (down)
        if architecture == "resnet":
            block += CH4 * CH8  # 1x1 residual branch (no bias)
        if architecture == "skip":
            fromrgb += IMG * CH4 + CH4  # fromRGB of the 4x4 image into the head
        cmap = CH4 if c_dim else 0
        epilogue = (CH4 * (CH4 + 1) * 9 + CH4) + fc(CH4 * 16, CH4) + fc(CH4, cmap if c_dim else 1)
        mapping = (fc(c_dim, cmap) + label_layers * fc(cmap, cmap)) if c_dim else 0
        return fromrgb + block + epilogue + mapping

    for c_dim in (0, C_DIM):
        D = Discriminator(c_dim, 8, IMG, channel_base=32, channel_max=16, label_map_layers=label_layers,
                          architecture=architecture)
        assert n_params(D) == expected(c_dim)


@pytest.mark.parametrize("architecture", ["orig", "skip"])
def test_other_discriminator_architectures_compute_what_they_say(architecture) -> None:
    """No residual branch in either; skip: the image also enters through a lower-resolution fromRGB
    (changing it changes the logits); the R1 double backward reaches every parameter."""
    torch.manual_seed(0)
    D = Discriminator(2, 16, 1, channel_base=128, channel_max=16, architecture=architecture)
    img, c = torch.randn(4, 1, 16, 16, requires_grad=True), torch.eye(2)[[0, 1, 0, 1]]
    logits = D(img, c)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()
    assert all(block.skip is None for block in D.blocks.values())
    (grad,) = torch.autograd.grad(logits.sum(), img, create_graph=True)
    (logits.sum() + grad.square().sum()).backward()
    assert all(p.grad is not None for p in D.parameters())
    if architecture == "skip":
        with torch.no_grad():
            D.skip_fromrgb["b4"].weight.add_(1.0)
        assert not torch.allclose(D(img, c), logits)
    with pytest.raises(ValueError, match="unknown discriminator architecture"):
        Discriminator(0, 16, 1, architecture="stylegan1")


def tiny_pair(c_dim: int = 0) -> tuple[Generator, Discriminator]:
    cfg = make_config("tiny", 32)
    G = Generator(cfg.z_dim, c_dim, cfg.w_dim, 32, 1, cfg.channel_base, cfg.channel_max, cfg.map_layers)
    D = Discriminator(c_dim, 32, 1, cfg.channel_base, cfg.channel_max, mbstd_group_size=cfg.mbstd)
    return G, D


def test_generator_shapes_and_noise_modes() -> None:
    G, D = tiny_pair()
    z = torch.randn(4, G.z_dim)
    img = G(z, None)
    assert img.shape == (4, 1, 32, 32) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert D(img).shape == (4, 1)
    # const noise is reproducible; with strength 0 at init all modes agree
    torch.testing.assert_close(G(z, None, noise_mode="const"), G(z, None, noise_mode="const"))
    with torch.no_grad():
        for layer in G.modules():
            if hasattr(layer, "noise_strength"):
                layer.noise_strength.fill_(0.5)
    a, b = G(z, None, noise_mode="random"), G(z, None, noise_mode="random")
    assert not torch.allclose(a, b)
    torch.testing.assert_close(G(z, None, noise_mode="none"), G(z, None, noise_mode="none"))


def test_truncation_psi_zero_gives_w_avg() -> None:
    G, _ = tiny_pair()
    z = torch.randn(8, G.z_dim)
    for _ in range(3):
        G.mapping(z, None, update_emas=True)
    assert G.mapping.w_avg.abs().sum() > 0
    ws = G.mapping(torch.randn(5, G.z_dim), None, psi=0.0)
    torch.testing.assert_close(ws, G.mapping.w_avg.expand(5, G.num_ws, -1))
    ws_cut = G.mapping(torch.randn(5, G.z_dim), None, psi=0.0, cutoff=2)
    torch.testing.assert_close(ws_cut[:, :2], G.mapping.w_avg.expand(5, 2, -1))
    assert not torch.allclose(ws_cut[:, 2:], G.mapping.w_avg.expand(5, G.num_ws - 2, -1))


def test_w_avg_tracks_with_beta() -> None:
    G, _ = tiny_pair()
    z = torch.randn(8, G.z_dim)
    w = G.mapping(z, None)[:, 0]
    G.mapping(z, None, update_emas=True)
    torch.testing.assert_close(G.mapping.w_avg, (1 - 0.995) * w.mean(0))


def test_style_mixing_switches_once_to_a_second_latent() -> None:
    G, _ = tiny_pair()
    z = torch.randn(16, G.z_dim)
    ws = G.mapping_with_mixing(z, None, mixing_prob=1.0)
    plain = G.mapping(z, None)
    crossovers = set()
    for n in range(16):
        same = torch.isclose(ws[n], plain[n]).all(dim=1)  # per layer
        crossover = int(same.float().argmin())
        assert 1 <= crossover < G.num_ws
        assert same[:crossover].all() and not same[crossover:].any()
        assert torch.allclose(ws[n, crossover:], ws[n, crossover:][:1].expand(G.num_ws - crossover, -1))
        crossovers.add(crossover)
    assert len(crossovers) == 1  # one crossover layer for the whole minibatch
    torch.testing.assert_close(G.mapping_with_mixing(z, None, mixing_prob=0.0), plain)


def test_style_mixing_is_decided_once_per_minibatch() -> None:
    """With probability 0.5, about half the minibatches are mixed -- each entirely or not at all."""
    G, _ = tiny_pair()
    z = torch.randn(8, G.z_dim)
    plain = G.mapping(z, None)
    mixed_fraction = []
    for _ in range(40):
        ws = G.mapping_with_mixing(z, None, mixing_prob=0.5)
        mixed = ~torch.isclose(ws, plain).all(dim=2).all(dim=1)  # per sample
        assert mixed.all() or not mixed.any()
        mixed_fraction.append(float(mixed.all()))
    assert 0.2 < sum(mixed_fraction) / len(mixed_fraction) < 0.8


def test_conditional_networks_use_labels() -> None:
    G, D = tiny_pair(c_dim=2)
    z = torch.randn(4, G.z_dim)
    c0 = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    c1 = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    img0 = G(z, c0, noise_mode="const")
    img1 = G(z, c1, noise_mode="const")
    assert img0.shape == (4, 1, 32, 32)
    assert (img0 - img1).abs().max() > 1e-4
    assert (D(img0, c0) - D(img0, c1)).abs().max() > 1e-6
    with pytest.raises(ValueError):
        G(z, None)


def test_channels_last_input_gives_the_same_output() -> None:
    _, D = tiny_pair()
    img = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(D(img), D(img.contiguous(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------


def test_auto_preset_formulas() -> None:
    cfg = make_config("auto", 256)
    assert (cfg.batch, cfg.mbstd, cfg.channel_base, cfg.channel_max, cfg.map_layers) == (16, 4, 16384, 512, 2)
    assert cfg.lr == 0.0025 and cfg.ema_rampup == 0.05
    assert cfg.gamma == pytest.approx(0.0002 * 256**2 / 16)
    assert cfg.ema_kimg == pytest.approx(16 * 10 / 32)
    big = make_config("auto", 1024, gpus=8)
    assert (big.batch, big.mbstd, big.channel_base, big.lr) == (32, 4, 32768, 0.002)
    assert big.gamma == pytest.approx(0.0002 * 1024**2 / 32)
    small = make_config("auto", 64, gpus=4)  # min(4 * 32, 64) = 64
    assert (small.batch, small.mbstd) == (64, 4)


def test_fixed_presets_match_the_table() -> None:
    s = make_config("stylegan2", 256)
    assert (s.batch, s.mbstd, s.channel_base, s.channel_max, s.map_layers, s.lr, s.gamma, s.ema_kimg, s.ema_rampup) == (
        32, 4, 32768, 512, 8, 0.002, 10.0, 10.0, None)
    p = make_config("paper256", 256)
    assert (p.batch, p.mbstd, p.channel_base, p.map_layers, p.lr, p.gamma, p.ema_kimg, p.ema_rampup) == (
        64, 8, 16384, 8, 0.0025, 1.0, 20.0, None)
    c = make_config("cifar", 32)
    assert (c.batch, c.mbstd, c.channel_base, c.map_layers, c.gamma, c.ema_kimg, c.ema_rampup) == (
        64, 32, 32768, 2, 0.01, 500.0, 0.05)
    assert c.style_mixing_prob == 0.0 and s.style_mixing_prob == 0.9
    assert (c.d_architecture, s.d_architecture, p.d_architecture) == ("orig", "resnet", "resnet")
    cpu = make_config("cpu64", 64)
    assert (cpu.channel_base, cpu.channel_max, cpu.map_layers, cpu.z_dim, cpu.w_dim) == (1024, 128, 2, 256, 256)
    assert (cpu.pl_weight, cpu.style_mixing_prob, cpu.ada_kimg, cpu.gamma) == (0.0, 0.0, 100.0, 1.0)


def test_overrides_and_errors() -> None:
    cfg = make_config("tiny", 32, gamma=5.0, c_dim=2, ema_rampup=None)
    assert isinstance(cfg, GANConfig) and cfg.gamma == 5.0 and cfg.c_dim == 2 and cfg.ema_rampup is None
    with pytest.raises(ValueError, match="unknown GAN config key"):
        make_config("tiny", 32, gama=5.0)
    with pytest.raises(ValueError, match="unknown GAN preset"):
        make_config("nope", 32)
    with pytest.raises(ValueError, match="power of two"):
        make_config("tiny", 48)
    assert GANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="d_architecture"):
        make_config("tiny", 32, d_architecture="residual")
    with pytest.raises(ValueError, match="d_label_map_layers"):
        make_config("tiny", 32, d_label_map_layers=0)


def test_label_map_depth_of_the_conditional_discriminator_comes_from_the_config() -> None:
    from ctsynth.gan.checkpoint import build_networks

    assert make_config("cpu64", 64).d_label_map_layers == 8  # the paper's depth unless a run sets it
    for layers in (1, 3):
        _, D = build_networks(make_config("tiny", 8, c_dim=2, d_label_map_layers=layers), "cpu")
        assert len(D.mapping.layers) == layers
