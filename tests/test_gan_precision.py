"""Precision chosen by measurement: the decision rule, the cache, and a real tiny measurement."""

from __future__ import annotations

import json
import math

import pytest

from ctsynth.gan import networks, precision
from ctsynth.gan.precision import BF16_NOISE_FRACTION, MIN_SPEEDUP, choose_precision, decide
from ctsynth.gan.presets import make_config


@pytest.mark.parametrize(
    "fp32_s,bf16_s,error,want_bf16,why",
    [
        (1.0, 0.6, 0.05, True, "bf16 1.67x"),  # faster and passes parity
        (1.0, 0.6, BF16_NOISE_FRACTION * 1.5, False, "fails parity"),  # faster, but not faithful
        (1.0, 0.6, math.nan, False, "fails parity"),
        (1.0, 2.0, 0.05, False, "not faster"),  # the Intel case: bf16 matmul at half the fp32 rate
        (1.0, 1.0 / (MIN_SPEEDUP * 0.99), 0.05, False, "not faster"),  # within timing noise
        (1.0, None, None, False, "no native bfloat16"),
    ],
)
def test_decision_keeps_bf16_only_when_faster_and_faithful(fp32_s, bf16_s, error, want_bf16, why) -> None:
    use_bf16, reason = decide(fp32_s, bf16_s, error)
    assert use_bf16 is want_bf16 and why in reason, reason


def test_injected_measurements_give_the_choice_and_both_timings(tmp_path, monkeypatch) -> None:
    cfg = make_config("tiny", 16)
    calls = []

    def fake_measure(cfg_, candidate, device, steps, warmup):  # the timings of a bf16-friendly machine
        calls.append(candidate)
        return 0.30, 0.20, 0.05

    monkeypatch.setattr(precision, "_measure", fake_measure)
    cache = tmp_path / "precision.json"
    choice = choose_precision(cfg, cache_path=cache)
    assert (choice.num_bf16_res, choice.precision, choice.cached) == (2, "bf16", False)
    params = choice.mlflow_params()
    assert params["precision_fp32_step_s"] == 0.3 and params["precision_bf16_step_s"] == 0.2
    assert params["precision"] == "bf16" and "1.50x" in params["precision_reason"]
    again = choose_precision(cfg, cache_path=cache)  # from the cache: not measured again
    assert again.cached and calls == [2] and again.num_bf16_res == 2 and again.fp32_step_s == 0.3
    other_shape = choose_precision(make_config("tiny", 32), cache_path=cache)  # another configuration
    assert not other_shape.cached and len(calls) == 2 and other_shape.key != choice.key
    choose_precision(cfg, cache_path=cache, refresh=True)
    assert len(calls) == 3

    cache.write_text("{not json")  # a damaged cache is measured again, not an error
    assert not choose_precision(cfg, cache_path=cache).cached
    assert json.loads(cache.read_text())["entries"]


def test_a_real_tiny_measurement_returns_sane_numbers(tmp_path) -> None:
    cfg = make_config("tiny", 16, c_dim=2, batch=4, mbstd=2)
    choice = choose_precision(cfg, steps=2, warmup=1, cache_path=tmp_path / "p.json")
    assert 0 < choice.fp32_step_s < 60
    if networks.bf16_supported("cpu"):
        assert choice.bf16_step_s is not None and 0 < choice.bf16_step_s < 60
        assert choice.bf16_error is not None and 0 < choice.bf16_error < 1
    else:  # emulated bf16 is never chosen, and not timed
        assert choice.bf16_step_s is None and choice.num_bf16_res == 0
    assert choice.num_bf16_res in (0, 2)
    assert choice.precision == ("bf16" if choice.num_bf16_res else "fp32")
    assert "torch" in choice.key and "cfg" in choice.key


def test_real_parity_measurement_with_bf16_forced(tmp_path, monkeypatch) -> None:
    """The parity half of the measurement on every CPU (bf16 emulated where not native)."""
    monkeypatch.setattr(networks, "bf16_supported", lambda device_type: True)
    cfg = make_config("tiny", 16, c_dim=2, batch=4, mbstd=2)
    fp32_s, bf16_s, error = precision._measure(cfg, 2, "cpu", steps=1, warmup=0)
    assert fp32_s > 0 and bf16_s > 0
    assert 0 < error < BF16_NOISE_FRACTION


def test_train_gan_stage_precision_setting_reaches_the_config_and_the_mlflow_tags(tmp_path, monkeypatch) -> None:
    from ctsynth.stages import train_gan as stage

    monkeypatch.setenv("CTSYNTH_CACHE_DIR", str(tmp_path))
    cfg = make_config("tiny", 16, c_dim=2, batch=4, mbstd=2)

    same, tags = stage.choose_training_precision(cfg, "fp32", "cpu")
    assert same is cfg and tags == {"precision": "fp32"}

    chosen, tags = stage.choose_training_precision(cfg, "auto", "cpu")
    assert float(tags["precision_fp32_step_s"]) > 0 and tags["precision_reason"]
    assert chosen.num_bf16_res == int(tags["precision_num_bf16_res"])  # what was chosen is what trains
    assert (tmp_path / "gan_precision.json").is_file()  # cached per machine
