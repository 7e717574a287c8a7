"""Tests for the ADA augmentation pipe and the adaptive-p controller (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from ctsynth.gan.augment import AUGMENT_SPECS, AdaptiveP, AugmentPipe, bilinear_sample, wavelet_lowpass
from ctsynth.gan.loss import StyleGAN2Loss
from ctsynth.gan.networks import Discriminator, Generator


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def smooth_images(batch: int = 8, channels: int = 1, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.sin(2.5 * xx + 0.3) * torch.cos(1.7 * yy) + 0.3 * xx
    return base.reshape(1, 1, size, size).repeat(batch, channels, 1, 1)


def only(name: str, p: float = 1.0) -> AugmentPipe:
    """A pipe that applies exactly one transform."""
    pipe = AugmentPipe("bgc")
    pipe.strengths = {k: 0.0 for k in pipe.strengths} | {name: 1.0}
    pipe.p.fill_(p)
    return pipe


def test_p_zero_is_exact_identity() -> None:
    pipe = AugmentPipe("bgc")
    assert float(pipe.p) == 0.0
    img = torch.randn(4, 1, 32, 32)
    out = pipe(img)
    assert torch.equal(out, img)


def test_p_one_changes_images_keeps_shape_and_dtype() -> None:
    pipe = AugmentPipe("bgc")
    pipe.p.fill_(1.0)
    for dtype, channels in ((torch.float32, 1), (torch.float64, 1), (torch.float32, 3)):
        img = torch.randn(4, channels, 32, 32, dtype=dtype)
        out = pipe(img)
        assert out.shape == img.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out - img).abs().mean() > 0.1


def test_identity_resample_preserves_a_smooth_image() -> None:
    pipe = AugmentPipe("bgc")
    img = smooth_images()
    out = pipe._resample(img, torch.eye(3).repeat(8, 1, 1))
    assert (out - img)[..., 4:-4, 4:-4].abs().max() < 2e-3
    assert (out - img).abs().max() < 2e-2  # borders: reflect padding vs. the true continuation


def test_wavelet_lowpass_is_an_orthonormal_symlet() -> None:
    f = wavelet_lowpass(6).double()
    assert f.shape == (12,)
    assert f.sum().item() == pytest.approx(1.0)
    h = f * math.sqrt(2)  # unit-norm taps
    for shift in range(1, 6):  # orthogonal to its own even shifts: the 2x round trip is exact
        assert (h[: 12 - 2 * shift] * h[2 * shift:]).sum().item() == pytest.approx(0.0, abs=1e-6)
    assert h.square().sum().item() == pytest.approx(1.0)
    n = torch.arange(12, dtype=torch.float64)
    for moment in range(6):  # six zeros at Nyquist: the matching high-pass has 6 vanishing moments
        assert ((-1) ** n * n**moment * h).sum().item() == pytest.approx(0.0, abs=1e-6 * 12**moment)


def _translate(tx: float, ty: float, batch: int = 1) -> torch.Tensor:
    g = torch.eye(3).repeat(batch, 1, 1)
    g[:, 0, 2], g[:, 1, 2] = tx, ty
    return g


def _rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_resampling_with_no_transform_drawn_returns_the_input_exactly() -> None:
    """White noise (all frequencies up to Nyquist) through the resampling chain, in a batch where
    another image is rotated (so the chain runs), and through the whole pipe with p > 0."""
    pipe = AugmentPipe("bgc")
    img = torch.randn(2, 1, 32, 32)
    g = torch.stack([torch.eye(3), _rotation(0.5)])
    out = pipe._resample(img, g)
    assert (out[0] - img[0]).abs().max() <= 1e-4
    assert (out[1] - img[1]).abs().mean() > 0.3  # the rotated one did change

    pipe.p.fill_(1e-9)  # p > 0, but no transform is drawn
    assert (pipe(img) - img).abs().max() <= 1e-4


@pytest.mark.parametrize("tx,ty", [(3, -2), (-4, 0), (0, 5)])
def test_integer_translation_is_exact(tx, ty) -> None:
    """Whole-pixel shifts reproduce pixels exactly; the border comes from reflect padding."""
    img = torch.randn(2, 1, 24, 24)
    g = torch.cat([_translate(tx, ty), _rotation(0.3)[None]])  # in a batch with a real rotation
    out = AugmentPipe("bgc")._resample(img, g)
    padded = F.pad(img, [8, 8, 8, 8], mode="reflect")
    want = padded[:, :, 8 + ty : 8 + ty + 24, 8 + tx : 8 + tx + 24]  # out(p) = in(p + t)
    assert (out[0] - want[0]).abs().max() <= 1e-4
    assert out.shape == img.shape


def test_flips_and_quarter_turns_are_exact() -> None:
    img = torch.randn(3, 1, 16, 16)
    g = torch.stack([torch.diag(torch.tensor([-1.0, 1.0, 1.0])), _rotation(math.pi / 2), _rotation(0.7)])
    out = AugmentPipe("bgc")._resample(img, g)
    assert (out[0] - img[0].flip(2)).abs().max() <= 1e-4
    quarter = [(out[1] - torch.rot90(img[1], k, (1, 2))).abs().max().item() for k in range(4)]
    assert min(quarter) <= 1e-4, quarter


@pytest.mark.parametrize("name,g", [("rotate 30 deg", _rotation(math.pi / 6)),
                                    ("scale 1.3, rotate -50 deg", torch.diag(torch.tensor([1 / 1.3, 1 / 1.3, 1.0])) @ _rotation(-0.87)),
                                    ("fractional shift", _translate(0.37, -1.61)[0])])
def test_real_rotation_and_scale_resample_a_band_limited_image_correctly(name, g) -> None:
    """A smooth pattern (up to ~0.3 of Nyquist) is resampled as its continuous version moved by g."""
    size = 48

    def pattern(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pixel-centred coordinates
        return torch.sin(0.9 * x + 0.4 * y) * 0.5 + torch.cos(0.6 * y - 0.3 * x) * 0.5

    centres = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    img = pattern(xx, yy).float()[None, None]
    out = AugmentPipe("bgc")._resample(img, g[None])
    src = g.double() @ torch.stack([xx.flatten(), yy.flatten(), torch.ones(size * size, dtype=torch.float64)])
    want = pattern(src[0], src[1]).reshape(size, size).float()
    inside = (src[0].abs().reshape(size, size) < size / 2 - 8) & (src[1].abs().reshape(size, size) < size / 2 - 8)
    error = (out[0, 0] - want)[inside].abs().max()
    # Measured 0.016-0.019: the symlet's phase is not quite linear (the price of an exact
    # round trip); a half-pixel misplacement of the 2x grid gives 0.08-0.11.
    assert error < 0.025, (name, float(error))


def test_xflip_gives_original_or_mirror() -> None:
    img = smooth_images()
    out = only("xflip")(img)
    err = torch.stack([(out - img).abs().amax(dim=(1, 2, 3)), (out - img.flip(3)).abs().amax(dim=(1, 2, 3))])
    assert err.amin(dim=0).max() < 2e-2
    assert (err.argmin(dim=0) == 1).any() and (err.argmin(dim=0) == 0).any()


def test_rotate90_gives_a_quarter_turn() -> None:
    img = smooth_images(batch=16)
    out = only("rotate90")(img)
    cands = torch.stack([(out - torch.rot90(img, k, (2, 3))).abs().amax(dim=(1, 2, 3)) for k in range(4)])
    assert cands.amin(dim=0).max() < 2e-2


def test_integer_translation_is_a_whole_pixel_shift_within_range() -> None:
    img = smooth_images(batch=6)
    out = only("xint")(img)
    max_shift = round(0.125 * 32)
    for n in range(6):
        best = min(
            ((out[n, :, 8:-8, 8:-8] - torch.roll(img[n], (dy, dx), (1, 2))[:, 8:-8, 8:-8]).abs().max().item(), dy, dx)
            for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1)
        )
        assert best[0] < 2e-3, (n, best)


def test_brightness_and_lumaflip_on_grey_images() -> None:
    img = torch.randn(8, 1, 16, 16)
    out = only("brightness")(img)
    shift = (out - img).reshape(8, -1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # one offset per image
    assert shift[:, 0].abs().max() > 0
    flipped = only("lumaflip")(img)
    per_image = torch.stack([(flipped - img).abs().amax(dim=(1, 2, 3)), (flipped + img).abs().amax(dim=(1, 2, 3))])
    assert per_image.amin(dim=0).max() < 1e-5  # grey lumaflip is negation or identity


def test_hue_and_saturation_keep_grey_rgb_grey() -> None:
    grey = torch.randn(8, 1, 16, 16).repeat(1, 3, 1, 1)
    for name in ("hue", "saturation"):
        out = only(name)(grey)
        torch.testing.assert_close(out, grey, rtol=1e-5, atol=1e-5)
    colour = torch.randn(8, 3, 16, 16)
    assert (only("hue")(colour) - colour).abs().max() > 0.1


def test_rotation_probability_is_split_over_two_draws() -> None:
    """Geometric 'rotate' is applied twice with p_rot = 1 - sqrt(1 - p): P(any rotation) = p."""
    pipe = only("rotate", p=0.5)
    draws = []
    original = pipe._gate

    def spy(values, identity, strength, prob=None):  # type: ignore[no-untyped-def]
        out = original(values, identity, strength, prob)
        draws.append(out != identity)
        return out

    pipe._gate = spy  # type: ignore[method-assign]
    pipe._geometric_matrix(20000, 32, 32, torch.device("cpu"))
    assert len(draws) == 2
    any_rotation = (draws[0] | draws[1]).float().mean().item()
    assert any_rotation == pytest.approx(0.5, abs=0.015)
    assert draws[0].float().mean().item() == pytest.approx(1 - math.sqrt(0.5), abs=0.015)


def test_bilinear_sample_matches_grid_sample() -> None:
    images = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    grid = torch.rand(2, 5, 6, 2, dtype=torch.float64) * 2.6 - 1.3  # includes points outside the image
    grid[0, 0, 0] = torch.tensor([-1.0, 1.0])  # exactly on the outer edge
    expected = torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    torch.testing.assert_close(bilinear_sample(images, grid), expected)
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    g = grid[:1, :3, :3]
    assert torch.autograd.gradgradcheck(lambda inp: bilinear_sample(inp, g), (x,))


def test_resample_is_twice_differentiable() -> None:
    pipe = AugmentPipe("bgc")
    c, s = math.cos(0.3), math.sin(0.3)
    g = torch.tensor([[[c * 1.1, -s, 0.7], [s, c * 0.9, -0.4], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda inp: pipe._resample(inp, g)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_r1_flows_through_augmentation() -> None:
    G = Generator(16, 0, 16, 16, 1, channel_base=128, channel_max=16, map_layers=1)
    D = Discriminator(0, 16, 1, channel_base=128, channel_max=16, mbstd_group_size=2)
    pipe = AugmentPipe("bgc")
    pipe.p.fill_(1.0)
    loss = StyleGAN2Loss(G, D, pipe, r1_gamma=10.0)
    real = torch.randn(4, 1, 16, 16)
    out = loss.compute("Dreg", real, None, torch.randn(4, 16), None)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = [p.grad for p in D.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert D.fromrgb.weight.grad.abs().sum() > 0
    assert D.epilogue.fc.weight.grad.abs().sum() > 0


def test_generator_gradient_flows_through_augmentation() -> None:
    pipe = AugmentPipe("bgc")
    pipe.p.fill_(1.0)
    img = torch.randn(4, 1, 16, 16, requires_grad=True)
    pipe(img).square().sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# adaptive p
# ---------------------------------------------------------------------------


def test_adaptive_p_follows_the_update_rule() -> None:
    pipe = AugmentPipe("bgc")
    ada = AdaptiveP(pipe, target=0.6, ada_kimg=500, interval=4)
    batch = 8
    step = batch * 4 / (500 * 1000)
    positive = torch.ones(batch, 1)
    # 3 minibatches: no update yet
    for _ in range(3):
        assert ada.accumulate(positive) is None
    assert ada.p == 0.0
    # 4th: r_t = 1 > 0.6 -> p += step
    assert ada.accumulate(positive) == pytest.approx(1.0)
    assert ada.p == pytest.approx(step, rel=1e-6)
    # next interval: 5 of 8 positive in each batch -> r_t = (5 - 3)/8 = 0.25 < 0.6 -> p -= step
    mixed = torch.tensor([1.0] * 5 + [-1.0] * 3).reshape(batch, 1)
    for _ in range(3):
        assert ada.accumulate(mixed) is None
    assert ada.accumulate(mixed) == pytest.approx(0.25)
    assert ada.p == pytest.approx(0.0, abs=1e-12)
    # below target again: p is clamped at 0
    for _ in range(4):
        ada.accumulate(-positive)
    assert ada.p == 0.0
    # two steps up
    for _ in range(8):
        ada.accumulate(positive * 3.0)
    assert ada.p == pytest.approx(2 * step, rel=1e-6)


def test_adaptive_p_state_dict_restores_p_and_accumulators() -> None:
    pipe = AugmentPipe("bgc")
    ada = AdaptiveP(pipe, interval=4)
    for _ in range(4):
        ada.accumulate(torch.ones(16, 1))
    ada.accumulate(torch.tensor([1.0, -1.0, 1.0, 1.0]))  # mid-interval
    state = ada.state_dict()

    pipe2 = AugmentPipe("bgc")
    resumed = AdaptiveP(pipe2, interval=4)
    resumed.load_state_dict(state)
    assert resumed.p == pytest.approx(ada.p) and resumed.p > 0
    for controller in (ada, resumed):
        for _ in range(2):
            controller.accumulate(torch.ones(4, 1))
        rt = controller.accumulate(torch.ones(4, 1))
        assert rt == pytest.approx((2 + 12) / 16)
    assert resumed.p == pytest.approx(ada.p)
    # p also travels in the pipe's own state_dict (a buffer)
    assert "p" in pipe.state_dict()


def test_unknown_spec_and_range_raise() -> None:
    assert set(AUGMENT_SPECS["bgc"]) >= {"xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac"}
    with pytest.raises(ValueError, match="unknown augment spec"):
        AugmentPipe("bgcfnc")
    with pytest.raises(ValueError, match="unknown augmentation ranges"):
        AugmentPipe("bgc", scale_sd=0.3)
