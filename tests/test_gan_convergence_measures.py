"""The measures of benchmarks/gan_convergence.py that decide how a preset is judged: the diversity
ratio (mode collapse) and sampling from one conditional G or one unconditional G per class."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch

from ctsynth.gan.checkpoint import build_networks
from ctsynth.gan.presets import make_config

REPO = Path(__file__).resolve().parents[1]


def convergence():
    if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts beside src/
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.gan_convergence")


def test_diversity_ratio_is_one_for_real_variety_and_zero_for_one_image_per_class():
    bench = convergence()
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32)
    labels = np.repeat([0, 1], 20)
    assert bench.diversity_ratio(real, labels, real, labels) == 1.0
    collapsed = np.concatenate([np.repeat(real[:1], 20, 0), np.repeat(real[20:21], 20, 0)])
    assert bench.diversity_ratio(collapsed, labels, real, labels) < 1e-6
    assert 0.45 < bench.diversity_ratio(real * 0.5, labels, real, labels) < 0.55


def test_sampling_labels_each_class_and_truncation_reduces_variety():
    bench = convergence()
    torch.manual_seed(0)
    conditional, _ = build_networks(make_config("tiny", 16, c_dim=2), "cpu")
    unconditional, _ = build_networks(make_config("tiny", 16, c_dim=0), "cpu")
    for generators in ([(conditional.eval(), 0), (conditional, 1)], [(unconditional.eval(), 0), (unconditional, 0)]):
        images, labels = bench.sample(generators, per_class=6, z_dim=64, seed=1)
        assert images.shape == (12, 1, 16, 16) and labels.tolist() == [0] * 6 + [1] * 6
        truncated, _ = bench.sample(generators, per_class=6, z_dim=64, seed=1, psi=0.0)
        # psi 0 puts every latent on the centre: one image per class (up to the random noise inputs)
        assert truncated[:6].std(axis=0).mean() < 0.5 * images[:6].std(axis=0).mean()
