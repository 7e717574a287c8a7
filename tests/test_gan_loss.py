"""Tests for the StyleGAN2 losses: values against hand-computed softplus formulas,
lazy-regularisation scaling, path-length bookkeeping, and one step of every phase."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctsynth.gan.augment import AugmentPipe
from ctsynth.gan.loss import (
    PHASES,
    StyleGAN2Loss,
    d_logistic_loss,
    g_nonsaturating_loss,
    lazy_regularization_adam,
)
from ctsynth.gan.networks import Discriminator, Generator
from ctsynth.gan.presets import make_config


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


class StubG(nn.Module):
    """img = ws[:, 0, 0] * k everywhere (size x size); one mapping per z, no mixing effects."""

    def __init__(self, num_ws: int = 3, size: int = 4, k: float = 1.0) -> None:
        super().__init__()
        self.num_ws, self.size = num_ws, size
        self.k = nn.Parameter(torch.tensor(k))
        self.map_scale = nn.Parameter(torch.tensor(1.0))  # so ws is part of the autograd graph

    def mapping_with_mixing(self, z, c, mixing_prob, update_emas=False):  # type: ignore[no-untyped-def]
        return z.unsqueeze(1).repeat(1, self.num_ws, 1) * self.map_scale

    def synthesis(self, ws, noise_mode="random"):  # type: ignore[no-untyped-def]
        return (ws[:, 0, 0] * self.k).reshape(-1, 1, 1, 1).expand(-1, 1, self.size, self.size)


class StubD(nn.Module):
    """D(x) = a * mean(x), one logit per image."""

    def __init__(self, a: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, img, c=None):  # type: ignore[no-untyped-def]
        return self.a * img.mean(dim=(1, 2, 3)).unsqueeze(1)


def test_loss_functions_equal_softplus_by_hand() -> None:
    fake = torch.tensor([[0.0], [1.0], [-2.0]])
    real = torch.tensor([[3.0], [-0.5]])
    assert g_nonsaturating_loss(fake).item() == pytest.approx((softplus(0) + softplus(-1) + softplus(2)) / 3)
    loss_real, loss_fake = d_logistic_loss(real, fake)
    assert loss_real.item() == pytest.approx((softplus(-3) + softplus(0.5)) / 2)
    assert loss_fake.item() == pytest.approx((softplus(0) + softplus(1) + softplus(-2)) / 3)


def test_phase_losses_on_a_toy_pair_equal_hand_values() -> None:
    G, D = StubG(), StubD(a=2.0)
    loss = StyleGAN2Loss(G, D, augment_pipe=None, r1_gamma=10.0, r1_interval=16)
    gen_z = torch.tensor([[0.5, 9.0], [-1.0, 9.0]])  # fake logits = 2 * z[:, 0] = 1, -2
    real = torch.stack([torch.full((1, 4, 4), 1.5), torch.full((1, 4, 4), -0.25)])  # real logits 3, -0.5

    d = loss.compute("Dmain", real, None, gen_z, None)
    expected_real = (softplus(-3) + softplus(0.5)) / 2
    expected_fake = (softplus(1) + softplus(-2)) / 2
    assert d.loss.item() == pytest.approx(expected_real + expected_fake, rel=1e-6)
    assert float(d.stats["Loss/D/real"]) == pytest.approx(expected_real, rel=1e-6)
    assert float(d.stats["Loss/signs/real"]) == 0.0  # one positive, one negative
    torch.testing.assert_close(d.real_logits, torch.tensor([[3.0], [-0.5]]))

    g = loss.compute("Gmain", real, None, gen_z, None)
    assert g.loss.item() == pytest.approx((softplus(-1) + softplus(2)) / 2, rel=1e-6)

    # R1: dD/dx = a / (H W) per pixel -> ||grad||^2 = a^2 / (H W) = 4 / 16
    r1 = loss.compute("Dreg", real, None, gen_z, None)
    assert float(r1.stats["Loss/r1_penalty"]) == pytest.approx(4 / 16, rel=1e-6)
    torch.testing.assert_close(r1.real_logits, torch.tensor([[3.0], [-0.5]]))  # ADA's r_t counts the R1 pass too
    assert r1.loss.item() == pytest.approx(10.0 / 2 * 4 / 16 * 16, rel=1e-6)  # gamma/2 * E|g|^2 * interval
    r1.loss.backward()
    # d/da of gamma/2 * a^2/16 * 16 = gamma * a
    assert D.a.grad.item() == pytest.approx(10.0 * 2.0, rel=1e-6)


def test_dmain_does_not_backpropagate_into_g() -> None:
    G, D = StubG(), StubD()
    loss = StyleGAN2Loss(G, D)
    out = loss.compute("Dmain", torch.randn(2, 1, 4, 4), None, torch.randn(2, 2), None)
    out.loss.backward()
    assert G.k.grad is None and G.map_scale.grad is None and D.a.grad is not None


def test_path_length_bookkeeping() -> None:
    """With pl_decay = 1 and one sample, pl_mean equals that sample's length and the penalty is 0."""
    G, D = StubG(num_ws=4, size=1, k=3.0), StubD()
    loss = StyleGAN2Loss(G, D, pl_weight=2.0, pl_decay=1.0, pl_batch_shrink=2, pl_interval=4)
    out = loss.compute("Greg", torch.zeros(2, 1, 1, 1), None, torch.randn(2, 5), None)
    assert float(out.stats["Loss/pl_penalty"]) == pytest.approx(0.0, abs=1e-10)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-8)
    # img = k * ws[:, 0, 0] at 1 pixel; y ~ N(0, 1): |J^T y| = |k y| / sqrt(num_ws) over the mean of 4 layers
    assert 0 < loss.pl_mean.item()
    # a second call with decay 0.01 moves pl_mean 1% of the way to the new batch mean
    loss.pl_decay = 0.01
    before = loss.pl_mean.clone()
    out = loss.compute("Greg", torch.zeros(4, 1, 1, 1), None, torch.randn(4, 5), None)
    assert float(out.stats["Loss/pl_mean"]) != before.item()
    state = loss.state_dict()
    fresh = StyleGAN2Loss(G, D)
    fresh.load_state_dict(state)
    assert fresh.pl_mean.item() == loss.pl_mean.item()


def test_path_length_mean_is_the_running_average_of_the_lengths() -> None:
    """a is the decay-weighted mean of the lengths seen so far -- from the first step on, not an
    average that starts at 0 (which would pull every length towards 0 for ~1/decay steps)."""
    G, D = StubG(num_ws=4, size=1, k=3.0), StubD()
    loss = StyleGAN2Loss(G, D, pl_weight=2.0, pl_decay=0.01, pl_batch_shrink=1, pl_interval=4)
    batch_means, weights = [], []
    for step in range(3):
        torch.manual_seed(step)
        z = torch.randn(8, 5)
        y = torch.randn(8, 1, 1, 1)  # the noise the phase draws next
        # img = k * ws[:, 0, 0] at one pixel: |J^T y| = |k y| over the mean of 4 layers.
        batch_means.append(float((3.0 * y).abs().mean() / 2))
        torch.manual_seed(step)
        loss.compute("Greg", torch.zeros(8, 1, 1, 1), None, torch.randn(8, 5), None)
        weights = [w * 0.99 for w in weights] + [0.01]
        want = sum(w * m for w, m in zip(weights, batch_means)) / sum(weights)
        assert loss.pl_mean.item() == pytest.approx(want, rel=1e-5), step
    assert loss.pl_mean.item() > 0.5 * min(batch_means)  # an uncorrected EMA: ~3 % of them
    restored = StyleGAN2Loss(G, D)
    restored.load_state_dict(loss.state_dict())
    assert (restored.pl_mean, restored.pl_ema, restored.pl_weight_sum) == (loss.pl_mean, loss.pl_ema, loss.pl_weight_sum)


def test_lazy_regularization_adam_correction() -> None:
    lr, betas = lazy_regularization_adam(0.002, (0.0, 0.99), 16)
    c = 16 / 17
    assert lr == pytest.approx(0.002 * c)
    assert betas == pytest.approx((0.0, 0.99**c))
    lr4, betas4 = lazy_regularization_adam(0.0025, (0.0, 0.99), 4)
    assert lr4 == pytest.approx(0.0025 * 0.8) and betas4[1] == pytest.approx(0.99**0.8)
    assert lazy_regularization_adam(0.002, (0.0, 0.99), None) == (0.002, (0.0, 0.99))


def test_enabled_phases_follow_weights() -> None:
    G, D = StubG(), StubD()
    assert StyleGAN2Loss(G, D).enabled_phases() == [("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)]
    assert StyleGAN2Loss(G, D, pl_weight=0).enabled_phases() == [("Gmain", 1), ("Dmain", 1), ("Dreg", 16)]
    with pytest.raises(ValueError, match="unknown phase"):
        StyleGAN2Loss(G, D).compute("Dboth", torch.zeros(1, 1, 4, 4), None, torch.zeros(1, 2), None)


def test_every_phase_runs_on_tiny_conditional_networks() -> None:
    torch.manual_seed(0)
    cfg = make_config("tiny", 32)
    G = Generator(cfg.z_dim, 2, cfg.w_dim, 32, 1, cfg.channel_base, cfg.channel_max, cfg.map_layers)
    D = Discriminator(2, 32, 1, cfg.channel_base, cfg.channel_max, mbstd_group_size=cfg.mbstd)
    pipe = AugmentPipe(cfg.augment)
    pipe.p.fill_(0.5)
    loss = StyleGAN2Loss(G, D, pipe, r1_gamma=cfg.gamma, style_mixing_prob=cfg.style_mixing_prob)
    real = torch.randn(cfg.batch, 1, 32, 32)
    c = torch.eye(2)[torch.tensor([0, 1, 0, 1])]
    z = torch.randn(cfg.batch, cfg.z_dim)
    for phase in PHASES:
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        out = loss.compute(phase, real, c, z, c)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        owner = G if phase.startswith("G") else D
        grads = [p.grad for p in owner.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), phase
    assert G.mapping.w_avg.abs().sum() > 0  # Gmain updates the truncation centre
