"""Every stage's `device` key follows the one rule (ctsynth.device) where CUDA is absent, and
"auto" leaves CPU results, feature-cache keys and sweep ids exactly as "cpu" (CI has no GPU)."""

from __future__ import annotations

import pydantic
import pytest
import torch
from _classifier_data import CLASSES, write_prepared

from ctsynth.config import ClassifierParams, GenerateParams, Params, SyntheticParams, load_params
from ctsynth.data.mixing import real_split
from ctsynth.device import resolve_device
from ctsynth.paths import repo_root

STAGES = {"classifier": ClassifierParams, "generate": GenerateParams, "synthetic": SyntheticParams}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_setting_is_auto_resolves_to_the_cpu_and_cuda_without_cuda_is_a_clear_error(no_cuda, stage):
    section = STAGES[stage]
    assert section().device == "auto"
    assert getattr(load_params(repo_root() / "params.yaml"), stage).device == "auto"
    assert resolve_device(section().device) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device 'cuda' asked for, but torch sees no CUDA device"):
        resolve_device(section(device="cuda").device)
    with pytest.raises(pydantic.ValidationError, match="device"):
        section(device="gpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    prepared = write_prepared(root, {"train": (8, 8), "valid": (4, 4), "test": (6, 6)}, size=16)
    return root, prepared, [real_split(prepared, split, CLASSES) for split in ("train", "valid", "test")]


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable", "frozen-cached"])
def test_auto_and_cpu_train_bit_identical_classifiers_without_cuda(no_cuda, splits, freeze):
    from ctsynth.classifier.train import train_classifier

    root, _, (train, valid, test) = splits
    results = {}
    for setting in ("cpu", "auto"):
        params = ClassifierParams(resolution=16, epochs=2, patience=2, batch_size=8, freeze_backbone=freeze,
                                  feature_cache=str(root / "cache"), device=setting)
        results[setting] = train_classifier(params, train, valid, test, CLASSES, seed=3, progress=False)
    cpu, auto = results["cpu"], results["auto"]
    assert (cpu.test_probabilities == auto.test_probabilities).all()
    assert cpu.history[-1]["train_loss"] == auto.history[-1]["train_loss"]
    for name, tensor in cpu.model.state_dict().items():
        assert torch.equal(tensor, auto.model.state_dict()[name]), name
    assert next(auto.model.parameters()).device == torch.device("cpu")
    if freeze:  # the second run reads the features the first wrote: one cache folder for cpu and auto
        assert auto.precision["feature_cache"]["folder"] == cpu.precision["feature_cache"]["folder"]
        assert auto.precision["feature_cache"]["misses"] == 0


def test_cpu_feature_cache_key_and_sweep_id_do_not_depend_on_the_setting(no_cuda):
    from ctsynth.classifier.features import backbone_key
    from ctsynth.classifier.sweep import sweep_id

    cpu_key = backbone_key("smallcnn", "abc", 16, "fp32")
    assert backbone_key("smallcnn", "abc", 16, "fp32", "cpu") == cpu_key
    assert backbone_key("smallcnn", "abc", 16, "fp32", "cuda") != cpu_key  # GPU features kept apart
    ids = {setting: sweep_id(Params(classifier=ClassifierParams(device=setting)), "data") for setting in ("auto", "cpu")}
    assert ids["auto"] == ids["cpu"]
    assert sweep_id(Params(classifier=ClassifierParams(learning_rate=0.5)), "data") != ids["cpu"]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        sweep_id(Params(classifier=ClassifierParams(device="cuda")), "data")


def test_generation_asked_for_cuda_without_cuda_fails_before_writing(no_cuda, tmp_path):
    from ctsynth.gan.generate import generate_images

    out = tmp_path / "synthetic"
    with pytest.raises(RuntimeError, match="device 'cuda' asked for"):
        generate_images(tmp_path / "gan", out, CLASSES, per_class=2, device="cuda", progress=False)
    assert not out.exists()


def test_report_onnx_evaluation_runs_on_the_cpu_provider_and_records_it(no_cuda, splits, tmp_path):
    from ctsynth.classifier.train import build_classifier
    from ctsynth.export import export_onnx, onnx_session
    from ctsynth.report import champion_section, evaluate_onnx_on_split

    _, prepared, _ = splits
    onnx_path = export_onnx(build_classifier(ClassifierParams(), len(CLASSES)), 16, CLASSES, tmp_path / "model.onnx")
    assert onnx_session(onnx_path, torch.device("cpu")).get_providers()[0] == "CPUExecutionProvider"
    evaluation = evaluate_onnx_on_split(onnx_path, prepared, "test", CLASSES, device="auto")
    assert evaluation.provider == "CPUExecutionProvider"
    assert evaluation.metrics["n"] == 12
    assert "ONNX evaluated with" in champion_section({}, evaluation, onnx_path)
