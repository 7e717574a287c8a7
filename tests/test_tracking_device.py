"""The one device rule (ctsynth.device) where CUDA is absent, as on the CPU machines that run CI."""

from __future__ import annotations

import pydantic
import pytest
import torch

from ctsynth.config import SyntheticParams
from ctsynth.device import cpu_model, record_device, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda_and_cuda_asked_for_is_a_clear_error(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for setting in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device '{setting}' asked for, but torch sees no CUDA device"):
            resolve_device(setting)


def test_a_setting_outside_the_rule_is_refused_when_params_are_read():
    assert SyntheticParams().device == "auto"
    assert SyntheticParams(device="cuda:0").device == "cuda:0"
    with pytest.raises(pydantic.ValidationError, match="device"):
        SyntheticParams(device="gpu")
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda, cuda:N"):
        resolve_device("mps")


def test_the_device_is_recorded_in_the_active_run(no_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from ctsynth import tracking

    with tracking.start_run(tracking.EXPERIMENT_GAN, "device") as run:
        recorded = record_device("auto", resolve_device("auto"))
    from mlflow import MlflowClient

    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["device_setting"] == "auto" and tags["device"] == "cpu" == recorded["device"]
    assert tags["device_name"]  # the CPU model


def test_cpu_model_names_the_generation_behind_a_bare_model_name(tmp_path):
    """Two processors' blocks: the first one's name, family and model; nothing else leaks in."""
    block = "processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(i=0) + "\n" + block.format(i=1).replace("26", "25"))
    assert cpu_model(cpuinfo) == "AMD EPYC (family 26, model 2)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
