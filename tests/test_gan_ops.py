"""Fast GAN ops and speed options agree with the pure-PyTorch reference.

* fused bias_act (C++ built with ninja, cached in one build folder so a test session compiles
  once): forward, both first gradients and the double backward, against ``reference.bias_act``;
* ``ops.upfirdn2d`` (one autograd node whose backward is the adjoint upfirdn2d): forward,
  gradient and ``gradgradcheck``;
* the whole training step: the fast path (fused ops, batched modulated convs, channels-last) and
  the reference path (CTSYNTH_FUSED_OPS=0, grouped modulated convs, NCHW) give the same losses
  and gradients on the same inputs and seeds (float32, 1e-4 relative);
* bfloat16 on the top resolutions changes each step's gradients by a small fraction of the
  minibatch noise (and a deliberately broken reduced-precision path does not).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ctsynth.gan import networks, ops
from ctsynth.gan.networks import Discriminator, Generator, set_speed_options
from ctsynth.gan.ops import fused, reference
from ctsynth.gan.precision import BF16_NOISE_FRACTION, bf16_gradient_error, phase_gradients
from ctsynth.gan.presets import make_config
from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions


def _extension_or_skip():
    if not fused.fused_ops_enabled():
        pytest.skip("CTSYNTH_FUSED_OPS=0: fused ops disabled")
    if shutil.which("ninja") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler / ninja: the fused op cannot be built here")
    ext = fused.load_extension()
    if ext is None:
        pytest.skip(f"fused bias_act did not build: {fused.extension_status()}")
    return ext


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("act,clamp", [("lrelu", 0.8), ("lrelu", None), ("linear", 0.5), ("relu", None)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_bias_act_matches_reference_forward_grads_and_double_backward(act, clamp, channels_last, with_bias) -> None:
    _extension_or_skip()
    # More elements than one parallel chunk of the kernel (16384), so chunk boundaries are exercised.
    x = torch.randn(3, 5, 33, 35)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    b = torch.randn(5, requires_grad=True) if with_bias else None
    gain = 1.7
    y = fused.fused_bias_act(x, b, 1, act, 0.2, gain, clamp)
    assert y is not None
    y_ref = reference.bias_act(x, b, act=act, gain=gain, clamp=clamp)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    if clamp is not None:
        assert (y_ref.abs() == clamp).any(), "the test input should exercise the clamp"

    dy = torch.randn_like(y)
    inputs = [x, b] if with_bias else [x]
    grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy, create_graph=True)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-6, atol=1e-6)
    if with_bias:
        torch.testing.assert_close(grads[1], grads_ref[1], rtol=1e-4, atol=1e-4)

    # Double backward, as R1 takes it: d/dw of |d(sum(w * f(x)))/dx|^2 through the op.
    w = torch.randn_like(y, requires_grad=True)
    (gx_w,) = torch.autograd.grad((w * fused.fused_bias_act(x, b, 1, act, 0.2, gain, clamp)).sum(), x, create_graph=True)
    (gx_w_ref,) = torch.autograd.grad((w * reference.bias_act(x, b, act=act, gain=gain, clamp=clamp)).sum(), x,
                                      create_graph=True)
    (gw,) = torch.autograd.grad(gx_w.square().sum(), w)
    (gw_ref,) = torch.autograd.grad(gx_w_ref.square().sum(), w)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_bias_act_uses_the_fused_kernel_on_the_cpu_by_default(monkeypatch) -> None:
    monkeypatch.delenv("CTSYNTH_FUSED_OPS", raising=False)
    _extension_or_skip()
    y = ops.bias_act(torch.randn(2, 3, 4, 4, requires_grad=True), torch.zeros(3), act="lrelu")
    assert "BiasAct" in type(y.grad_fn).__name__


def test_fused_bias_act_bias_along_other_dim_and_bfloat16() -> None:
    _extension_or_skip()
    x = torch.randn(4, 6)
    b = torch.randn(6)
    torch.testing.assert_close(ops.bias_act(x, b, dim=1, act="lrelu"), reference.bias_act(x, b, dim=1, act="lrelu"))
    y = ops.bias_act(x.bfloat16(), b, act="lrelu", clamp=1.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.bias_act(x.bfloat16(), b, act="lrelu", clamp=1.0).float(),
                               rtol=1e-2, atol=1e-2)


def test_bias_act_falls_back_to_reference_when_disabled(monkeypatch) -> None:
    monkeypatch.setenv("CTSYNTH_FUSED_OPS", "0")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = ops.bias_act(x, torch.zeros(3), act="lrelu")
    assert y.grad_fn is not None and "BiasAct" not in type(y.grad_fn).__name__
    assert fused.load_extension() is None and "disabled" in fused.extension_status()


def test_gpu_machine_without_cuda_toolkit_falls_back_to_reference_for_cuda_tensors(monkeypatch, caplog) -> None:
    """Simulated: CUDA is available but there is no nvcc, so the build has CPU kernels only."""
    _extension_or_skip()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_which = shutil.which
    monkeypatch.setattr(fused.shutil, "which", lambda name: None if name == "nvcc" else real_which(name))
    for name, value in (("_extension", None), ("_extension_devices", frozenset()), ("_warned_devices", set()),
                        ("_status", "not loaded")):
        monkeypatch.setattr(fused, name, value)  # a fresh process on that machine
    assert fused.load_extension() is not None and "(cpu)" in fused.extension_status()
    with caplog.at_level("WARNING", logger=fused.__name__):
        assert fused.kernel_runs_on("cuda") is False
        assert fused.kernel_runs_on("cuda") is False  # warned once
    ours = [r.getMessage() for r in caplog.records if r.name == fused.__name__]
    assert len(ours) == 1 and "without cuda kernels" in ours[0] and "reference ops" in ours[0], ours
    assert fused.kernel_runs_on("cpu") is True
    x = torch.randn(2, 3, 4, 4)  # the CPU kernel still serves CPU tensors in that build
    torch.testing.assert_close(fused.fused_bias_act(x, None, 1, "lrelu", 0.2, 2**0.5, None),
                               reference.bias_act(x, act="lrelu"))


def test_unknown_activation_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ops.bias_act(torch.zeros(2, 2), act="tanh")


@pytest.mark.parametrize(
    "up,down,padding,taps",
    [(1, 1, (1, 2, 1, 2), 4), (2, 1, (2, 1, 2, 1), 4), (1, 2, (1, 1, 1, 1), 4), (2, 1, (6, 5, 6, 5), 12),
     (1, 2, (5, 5, 5, 5), 12), (1, 1, (-1, 2, 0, 1), 4)],
)
@pytest.mark.parametrize("channels,channels_last", [(3, False), (3, True), (1, False)])
def test_upfirdn2d_node_matches_reference_and_is_twice_differentiable(up, down, padding, taps, channels,
                                                                      channels_last) -> None:
    """Both forward kernels of the node: depthwise convolution (feature maps, NCHW or NHWC) and
    the banded matrices (single-channel images)."""
    f = torch.rand(taps, dtype=torch.float64) + 0.1
    x = torch.randn(2, channels, 9, 10, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = ops.upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.5)
    y_ref = reference.upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.5)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0])
    assert torch.autograd.gradgradcheck(lambda t: ops.upfirdn2d(t, f, up=up, down=down, padding=padding, gain=1.5), (x,))


# ---------------------------------------------------------------------------
# Whole training step: fast path == reference path
# ---------------------------------------------------------------------------


def _trainer(tmp_path: Path, **overrides) -> GANTrainer:
    cfg = make_config("tiny", 16, c_dim=2, batch=4, mbstd=2, augment="bgc", fixed_p=0.5, seed=5, **overrides)
    generator = torch.Generator().manual_seed(0)
    data = TrainingData(torch.rand(16, 1, 16, 16, generator=generator) * 2 - 1, torch.arange(16) % 2)
    return GANTrainer(cfg, data, TrainOptions(out_dir=tmp_path, classes=["a", "b"], mlflow=False, progress=False))


def test_fast_path_equals_reference_path_losses_and_gradients(tmp_path, monkeypatch) -> None:
    _extension_or_skip()
    fast = _trainer(tmp_path / "fast", channels_last=True)
    reference_trainer = _trainer(tmp_path / "ref")
    reference_trainer.G.load_state_dict(fast.G.state_dict())
    reference_trainer.D.load_state_dict(fast.D.state_dict())
    for net in (reference_trainer.G, reference_trainer.D):
        set_speed_options(net, 0, False, grouped_modconv=True)

    got = phase_gradients(fast, draw=123)
    monkeypatch.setenv("CTSYNTH_FUSED_OPS", "0")
    want = phase_gradients(reference_trainer, draw=123)
    for phase in want:
        loss, grads = got[phase]
        loss_ref, grads_ref = want[phase]
        assert loss == pytest.approx(loss_ref, rel=1e-4, abs=1e-6), phase
        assert grads.keys() == grads_ref.keys()
        # Relative to the phase's gradient scale: a few parameters (e.g. fromRGB's bias in R1,
        # which only reaches the penalty through the activation pattern) have gradients ~1e-5 of
        # the rest, where float32 rounding of the different summation orders shows.
        scale = max(r.abs().max().item() for r in grads_ref.values())
        for name in grads_ref:
            g, r = grads[name], grads_ref[name]
            assert (g - r).abs().max().item() / scale < 1e-4, f"{phase}: {name}"
            assert torch.allclose(g, r, rtol=1e-3, atol=1e-4 * scale), f"{phase}: {name}"


# What bfloat16 must preserve is each training step's direction. The noise that step already
# carries is the minibatch noise: float32 on two independent minibatches (another seed for the
# real batch, z, noise and augmentation) gives gradients that differ by ||g(a) - g(b)||. bf16 on
# the same minibatch as float32 may add at most BF16_NOISE_FRACTION (1/8) of that, RMS over the
# phases that compute in bf16 and two draws (precision.bf16_gradient_error; the same check decides
# whether a training run may use bf16; R1 runs in float32, tested below). A whole-run comparison
# (p or losses after a few dozen steps) cannot say this: training is chaotic, so after 24 steps
# the bf16 and float32 runs are as far apart as two float32 runs with different seeds (p differs
# by 0-2 ADA steps either way), whichever CPU computes them.


def _to_float8(out: torch.Tensor) -> torch.Tensor:
    """A broken reduced-precision path: bf16 activations rounded to 2 mantissa bits (of 7)."""
    return out.to(torch.float8_e5m2).to(out.dtype) if out.dtype == torch.bfloat16 else out


def test_bf16_step_error_is_a_small_fraction_of_minibatch_noise_and_a_broken_path_is_not(tmp_path, monkeypatch) -> None:
    """RMS over phases and draws of ||g_bf16 - g_fp32|| / ||g_fp32(draw) - g_fp32(another draw)||.

    bfloat16 is forced on (PyTorch emulates it where the CPU has no native bf16), so the same
    numerics are checked on every machine. The broken path hooks every conv / modulated conv of
    its networks and rounds their bf16 outputs to float8; it must fail the same bound.
    """
    monkeypatch.setattr(networks, "bf16_supported", lambda device_type: True)
    fp32 = _trainer(tmp_path / "fp32", channels_last=True)
    variants = {"bf16": _trainer(tmp_path / "bf16", channels_last=True, num_bf16_res=2),
                "broken": _trainer(tmp_path / "broken", channels_last=True, num_bf16_res=2)}
    for trainer in variants.values():
        trainer.G.load_state_dict(fp32.G.state_dict())
        trainer.D.load_state_dict(fp32.D.state_dict())
    for layer in list(variants["broken"].G.modules()) + list(variants["broken"].D.modules()):
        if isinstance(layer, (networks.SynthesisLayer, networks.Conv2dLayer)):
            layer.register_forward_hook(lambda module, args, out: _to_float8(out))

    error = bf16_gradient_error(fp32, variants)
    assert 0 < error["bf16"] < BF16_NOISE_FRACTION, error  # 0 would mean bf16 was not in use
    assert error["broken"] > BF16_NOISE_FRACTION, error


def test_speed_options_select_top_resolutions() -> None:
    G = Generator(16, 0, 16, 32, 1, channel_base=256, channel_max=16, map_layers=1, num_bf16_res=2)
    D = Discriminator(0, 32, 1, channel_base=256, channel_max=16, num_bf16_res=2, channels_last=True)
    assert {r for r, b in ((b.resolution, b.use_bf16) for b in G.synthesis.blocks.values()) if b} == {16, 32}
    assert [b.use_bf16 for b in D.blocks.values()] == [True, True, False]
    assert all(b.channels_last for b in D.blocks.values())
    with pytest.raises(ValueError, match="num_bf16_res"):
        make_config("tiny", 32, num_bf16_res=-1)


def test_r1_runs_in_float32_while_the_other_phases_use_bf16(tmp_path, monkeypatch) -> None:
    """R1 differentiates a gradient: with oneDNN's AMX kernels its bf16 error was 0.17-0.34 of the
    minibatch noise, so it runs in float32 -- the same gradients as the float32 trainer's -- while
    D's main phase still computes in bf16, and every block gets its bf16 choice back afterwards."""
    monkeypatch.setattr(networks, "bf16_supported", lambda device_type: True)
    fp32 = _trainer(tmp_path / "fp32", channels_last=True)
    bf16 = _trainer(tmp_path / "bf16", channels_last=True, num_bf16_res=2)
    bf16.G.load_state_dict(fp32.G.state_dict())
    bf16.D.load_state_dict(fp32.D.state_dict())
    chosen = [b.use_bf16 for b in bf16.D.blocks.values()]
    assert any(chosen)
    want = phase_gradients(fp32, draw=7, phases=("Dmain", "Dreg"))
    got = phase_gradients(bf16, draw=7, phases=("Dmain", "Dreg"))
    for name, grad in want["Dreg"][1].items():
        torch.testing.assert_close(got["Dreg"][1][name], grad, rtol=1e-5, atol=1e-7 * grad.abs().max().item())
    assert any(not torch.equal(got["Dmain"][1][name], grad) for name, grad in want["Dmain"][1].items())
    assert [b.use_bf16 for b in bf16.D.blocks.values()] == chosen
