"""StyleGAN2 losses: non-saturating logistic, lazy R1 and lazy path-length regularisation.

The training loop runs four phases, each a separate optimiser step (or
accumulated into one):

=========  =========================================  ==============
phase      loss                                        every
=========  =========================================  ==============
``Gmain``  ``softplus(-D(aug(G(z))))``                 minibatch
``Greg``   ``pl_weight * (|J_w^T y| - a)^2 * pl_int``  ``pl_interval``
``Dmain``  ``softplus(D(aug(G(z)))) + softplus(-D(aug(x)))``  minibatch
``Dreg``   ``gamma/2 * |d D(aug(x))/dx|^2 * r1_int``   ``r1_interval``
=========  =========================================  ==============

Regularisers run lazily (every I minibatches) and are multiplied by I so the
effective strength is unchanged; Adam is compensated with
``lazy_regularization_adam`` (lr * c, betas ** c, c = I / (I + 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ctsynth.gan.networks import Generator, float32_blocks

__all__ = [
    "PHASES",
    "PhaseOutput",
    "StyleGAN2Loss",
    "d_logistic_loss",
    "g_nonsaturating_loss",
    "lazy_regularization_adam",
    "r1_penalty",
]

PHASES = ("Gmain", "Greg", "Dmain", "Dreg")


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``E[softplus(-D(G(z)))]`` = ``-E[log sigmoid(D(G(z)))]``: G's non-saturating loss."""
    return F.softplus(-fake_logits).mean()


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[softplus(-D(x))], E[softplus(D(G(z)))])``: D's logistic loss, real and fake terms."""
    return F.softplus(-real_logits).mean(), F.softplus(fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||d sum(D(x)) / dx||^2`` with a graph for the second derivative.

    ``real_images`` must be the leaf that requires grad, *before* augmentation:
    R1 regularises D as a function of the data, so the gradient runs back
    through the augmentation pipe.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])


def lazy_regularization_adam(
    lr: float, betas: tuple[float, float], reg_interval: int | None
) -> tuple[float, tuple[float, float]]:
    """Adam hyper-parameters for a network whose regulariser runs every ``reg_interval`` steps.

    With lazy regularisation the optimiser takes ``I + 1`` steps per ``I``
    minibatches; ``lr * c`` and ``beta ** c`` (``c = I / (I + 1)``) keep the
    per-minibatch learning rate and momentum time-constants the same.
    """
    if not reg_interval:
        return lr, betas
    c = reg_interval / (reg_interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


@dataclass
class PhaseOutput:
    """What one phase produced.

    ``loss``: scalar to ``backward()`` (regularisers already multiplied by their
    interval). ``stats``: detached 0-d tensors keyed like ``'Loss/D/real'``
    (call ``float()`` only when logging, to avoid a device sync per step).
    ``real_logits``: ``D(aug(x_real))`` of a phase that shows D real images (``Dmain`` and
    ``Dreg``), for ``AdaptiveP``'s r_t.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    real_logits: torch.Tensor | None = None


class StyleGAN2Loss:
    """Computes the four phase losses for a generator / discriminator pair.

    G and D are referenced, not owned. ``pl_mean`` (the running path-length
    target ``a``) lives here; save it with ``state_dict()`` for resumable runs.
    """

    def __init__(
        self,
        G: Generator,
        D: nn.Module,
        augment_pipe: nn.Module | None = None,
        r1_gamma: float = 10.0,
        style_mixing_prob: float = 0.9,
        pl_weight: float = 2.0,
        pl_batch_shrink: int = 2,
        pl_decay: float = 0.01,
        r1_interval: int = 16,
        pl_interval: int = 4,
    ) -> None:
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.pl_weight = pl_weight
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.r1_interval = r1_interval
        self.pl_interval = pl_interval
        device = next(G.parameters()).device
        self.pl_ema = torch.zeros([], device=device)  # running sum of lengths, starting at 0
        self.pl_weight_sum = torch.zeros([], device=device)  # the weight that sum has accumulated
        self.pl_mean = torch.zeros([], device=device)  # a = pl_ema / pl_weight_sum

    # -- helpers --------------------------------------------------------------

    def enabled_phases(self) -> list[tuple[str, int]]:
        """``(phase, interval)`` for every phase with a non-zero weight, in run order."""
        phases = [("Gmain", 1)]
        if self.pl_weight > 0 and self.pl_interval:
            phases.append(("Greg", self.pl_interval))
        phases.append(("Dmain", 1))
        if self.r1_gamma > 0 and self.r1_interval:
            phases.append(("Dreg", self.r1_interval))
        return phases

    def run_G(
        self, z: torch.Tensor, c: torch.Tensor | None, update_emas: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and the ws that made them (with style mixing)."""
        ws = self.G.mapping_with_mixing(z, c, self.style_mixing_prob, update_emas=update_emas)
        return self.G.synthesis(ws, noise_mode="random"), ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """D's logits for augmented images (every image D sees is augmented)."""
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return self.D(img, c)

    # -- phases ---------------------------------------------------------------

    def compute(
        self,
        phase: str,
        real_img: torch.Tensor,
        real_c: torch.Tensor | None,
        gen_z: torch.Tensor,
        gen_c: torch.Tensor | None,
    ) -> PhaseOutput:
        """Loss for ``phase`` in ``PHASES``. Zero the right grads and step the right optimiser outside."""
        if phase == "Gmain":
            return self.generator_main(gen_z, gen_c)
        if phase == "Greg":
            return self.generator_reg(gen_z, gen_c)
        if phase == "Dmain":
            return self.discriminator_main(real_img, real_c, gen_z, gen_c)
        if phase == "Dreg":
            return self.discriminator_reg(real_img, real_c)
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def generator_main(self, gen_z: torch.Tensor, gen_c: torch.Tensor | None) -> PhaseOutput:
        gen_img, _ = self.run_G(gen_z, gen_c, update_emas=True)
        fake_logits = self.run_D(gen_img, gen_c)
        loss = g_nonsaturating_loss(fake_logits)
        return PhaseOutput(loss, {"Loss/G/loss": loss.detach(), "Loss/scores/fake": fake_logits.detach().mean()})

    def generator_reg(self, gen_z: torch.Tensor, gen_c: torch.Tensor | None) -> PhaseOutput:
        """Path-length regularisation: ``(|J_w^T y| - a)^2`` with ``y ~ N(0, I) / sqrt(H W)``.

        Encourages a fixed-size step in w to change the image by a fixed
        amount, whatever the direction (a smoother, better-conditioned G).
        Runs on ``batch / pl_batch_shrink`` samples to save time.
        """
        if self.pl_weight <= 0:
            raise ValueError("Greg phase requested but pl_weight is 0")
        batch = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
        gen_c = gen_c[:batch] if gen_c is not None else None
        gen_img, ws = self.run_G(gen_z[:batch], gen_c)
        noise = torch.randn_like(gen_img) / math.sqrt(gen_img.shape[2] * gen_img.shape[3])
        (grad,) = torch.autograd.grad((gen_img * noise).sum(), ws, create_graph=True)
        pl_lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()
        with torch.no_grad():
            # a: the long-running exponential moving average of the lengths (the paper's
            # definition). The running sum starts at 0, so it is divided by the weight it has
            # accumulated (1 - (1 - decay)^n, as Adam's bias correction); otherwise a would start
            # near 0 and, for the first ~1/decay regularisation steps, pull every path length
            # towards 0 instead of towards their mean.
            self.pl_ema.copy_(self.pl_ema.lerp(pl_lengths.mean(), self.pl_decay))
            self.pl_weight_sum.copy_(self.pl_weight_sum.lerp(torch.ones_like(self.pl_weight_sum), self.pl_decay))
            self.pl_mean.copy_(self.pl_ema / self.pl_weight_sum)
        pl_penalty = (pl_lengths - self.pl_mean).square()
        loss = pl_penalty.mean() * self.pl_weight * self.pl_interval
        loss = loss + gen_img[:, 0, 0, 0].sum() * 0  # every G parameter gets a grad (DDP)
        return PhaseOutput(
            loss,
            {
                "Loss/pl_penalty": pl_penalty.detach().mean(),
                "Loss/G/reg": (pl_penalty.detach().mean() * self.pl_weight),
                "Loss/pl_mean": self.pl_mean.detach().clone(),
            },
        )

    def discriminator_main(
        self,
        real_img: torch.Tensor,
        real_c: torch.Tensor | None,
        gen_z: torch.Tensor,
        gen_c: torch.Tensor | None,
    ) -> PhaseOutput:
        with torch.no_grad():  # D's step needs no gradient into G
            gen_img, _ = self.run_G(gen_z, gen_c)
        fake_logits = self.run_D(gen_img, gen_c)
        real_logits = self.run_D(real_img.detach(), real_c)
        loss_real, loss_fake = d_logistic_loss(real_logits, fake_logits)
        loss = loss_real + loss_fake
        stats = {
            "Loss/D/loss": loss.detach(),
            "Loss/D/real": loss_real.detach(),
            "Loss/D/fake": loss_fake.detach(),
            "Loss/scores/real": real_logits.detach().mean(),
            "Loss/scores/fake": fake_logits.detach().mean(),
            "Loss/signs/real": real_logits.detach().sign().mean(),
        }
        return PhaseOutput(loss, stats, real_logits=real_logits.detach())

    def discriminator_reg(self, real_img: torch.Tensor, real_c: torch.Tensor | None) -> PhaseOutput:
        """Lazy R1: ``gamma / 2 * E ||grad_x D(aug(x))||^2``, times ``r1_interval``."""
        if self.r1_gamma <= 0:
            raise ValueError("Dreg phase requested but r1_gamma is 0")
        real_img = real_img.detach().requires_grad_(True)
        # R1 differentiates a gradient, so bfloat16's 8-bit significand is rounded into it twice:
        # its parameter gradient was 0.17-0.34 of the minibatch noise off on a CPU with AMX
        # (0.03-0.11 with AVX-512 bf16), the other phases at most 0.19 (docs/gan.md, "bf16").
        # It runs once per r1_interval minibatches, so float32 here costs little.
        with float32_blocks(self.D):
            real_logits = self.run_D(real_img, real_c)
        penalty = r1_penalty(real_logits, real_img)
        loss = penalty.mean() * (self.r1_gamma / 2) * self.r1_interval
        # The output bias does not affect the gradient wrt x; the zero-valued term gives it a
        # (zero) gradient instead of None, which DistributedDataParallel requires.
        loss = loss + real_logits.sum() * 0
        return PhaseOutput(
            loss,
            {"Loss/r1_penalty": penalty.detach().mean(), "Loss/D/reg": penalty.detach().mean() * (self.r1_gamma / 2)},
            real_logits=real_logits.detach(),  # ADA's r_t counts this pass on real images too
        )

    # -- persistence ----------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "pl_mean": self.pl_mean.detach().clone(),
            "pl_ema": self.pl_ema.detach().clone(),
            "pl_weight_sum": self.pl_weight_sum.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pl_mean.copy_(torch.as_tensor(state["pl_mean"]))
        if "pl_ema" in state:
            self.pl_ema.copy_(torch.as_tensor(state["pl_ema"]))
            self.pl_weight_sum.copy_(torch.as_tensor(state["pl_weight_sum"]))
        else:  # a snapshot from before the correction: continue from its mean, fully weighted
            self.pl_ema.copy_(self.pl_mean)
            self.pl_weight_sum.fill_(1.0)
