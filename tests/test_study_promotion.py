"""@champion moves only when the candidate beats the current champion on the same validation
images (or select.promote: always); the version says why. Real MLflow sqlite store."""

import numpy as np
import pytest
import torch

from ctsynth.export import export_onnx
from ctsynth.registry import load_champion, promote_if_better, register_champion

CLASSES = ["normal", "squamous"]
RES = 8


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def _model(tmp_path, name, sign):
    """A fixed linear model on the mean pixel: sign +1 is right on the data below, -1 is wrong."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(RES * RES, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] += sign / (RES * RES)
        model[1].weight[0] -= sign / (RES * RES)
        model[1].bias.zero_()
    return export_onnx(model.eval(), RES, CLASSES, tmp_path / f"{name}.onnx")


def _valid():
    labels = np.array([0, 0, 0, 1, 1, 1])
    inputs = np.stack([np.full((1, RES, RES), -0.5 if y == 0 else 0.5, np.float32) for y in labels])
    inputs[2] = 0.5  # one normal image that looks like cancer: the good model gets 5 of 6
    return inputs, labels


def _register(onnx, decision, inputs):
    return register_champion(onnx, None, {}, {}, inputs[:2], move_alias=decision.promote, description=decision.reason, tags=decision.tags)


def test_only_a_better_candidate_moves_the_champion_and_the_reason_is_recorded(store):
    from mlflow import MlflowClient

    inputs, labels = _valid()
    good, bad = _model(store, "good", +1), _model(store, "bad", -1)
    first = promote_if_better(good, inputs, labels, CLASSES, "balanced_accuracy")
    assert first.promote and first.reason.startswith("first champion")
    v1 = _register(good, first, inputs)

    worse = promote_if_better(bad, inputs, labels, CLASSES, "balanced_accuracy")
    assert not worse.promote and "not promoted: not better" in worse.reason
    v2 = _register(bad, worse, inputs)
    assert load_champion().version == v1  # the alias stayed
    client = MlflowClient()
    version = client.get_model_version("ctsynth-classifier", v2)
    assert version.description == worse.reason and version.tags["previous_champion_version"] == v1
    assert float(version.tags["candidate_valid_metric"]) < float(version.tags["champion_valid_metric"])

    # the same model again is not better either (strictly better is required)
    assert not promote_if_better(good, inputs, labels, CLASSES, "balanced_accuracy").promote
    forced = promote_if_better(bad, inputs, labels, CLASSES, "balanced_accuracy", policy="always")
    assert forced.promote and "select.promote: always" in forced.reason
    v3 = _register(bad, forced, inputs)
    assert load_champion().version == v3


def test_a_champion_for_other_classes_is_kept_unless_always(store):
    inputs, labels = _valid()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(RES * RES, 3)).eval()
    other = export_onnx(model, RES, ["normal", "squamous", "adenocarcinoma"], store / "other.onnx")
    register_champion(other, None, {}, {}, inputs[:2])
    decision = promote_if_better(_model(store, "good", +1), inputs, labels, CLASSES, "balanced_accuracy")
    assert not decision.promote and "cannot be scored" in decision.reason
    assert promote_if_better(_model(store, "good", +1), inputs, labels, CLASSES, "balanced_accuracy", policy="always").promote
    with pytest.raises(ValueError, match="better' or 'always"):
        promote_if_better(other, inputs, labels, CLASSES, "balanced_accuracy", policy="sometimes")
