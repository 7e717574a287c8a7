"""ONNX export contract (input/output names, dynamic batch, one file, metadata) and the parity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctsynth.export import INPUT_NAME, OUTPUT_NAME, OnnxParityError, check_parity, export_onnx, onnx_session, read_onnx_info

RESOLUTION = 32
CLASSES = ["normal", "squamous"]


def small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, len(CLASSES)),
    )
    # Non-trivial batch-norm statistics, so an export in train mode would not match.
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_cnn(seed=0)
    path = export_onnx(model, RESOLUTION, CLASSES, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, RESOLUTION, RESOLUTION)).astype(np.float32)


def test_export_writes_one_file_with_contract_names_and_metadata(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external data file
    session = onnx_session(path)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    assert session.get_inputs()[0].shape[1:] == [1, RESOLUTION, RESOLUTION]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch axis
    info = read_onnx_info(path)
    assert info.classes == CLASSES
    assert info.resolution == RESOLUTION
    assert info.preprocessing == "ctsynth.data.preprocess.preprocess_bytes"
    assert read_onnx_info(path.read_bytes()) == info


def test_parity_passes_for_the_exported_model(exported):
    model, path = exported
    max_diff = check_parity(model, path, images(20))
    assert 0.0 <= max_diff <= 1e-4
    # also accepts a torch tensor (the classifier side holds its validation set as one)
    assert check_parity(model, path, torch.from_numpy(images(3))) <= 1e-4


def test_parity_fails_for_a_different_model(exported):
    _, path = exported
    with pytest.raises(OnnxParityError, match=r"max \|logit difference\| .* exceeds atol 0.0001"):
        check_parity(small_cnn(seed=1), path, images(5))


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported, batch):
    model, path = exported
    x = images(batch, seed=batch)
    (logits,) = onnx_session(path).run([OUTPUT_NAME], {INPUT_NAME: x})
    assert logits.shape == (batch, len(CLASSES))
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_export_restores_training_mode_and_rejects_wrong_output(tmp_path):
    model = small_cnn(seed=0).train()
    export_onnx(model, RESOLUTION, CLASSES, tmp_path / "a.onnx")
    assert model.training
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        export_onnx(model, RESOLUTION, ["a", "b", "c"], tmp_path / "b.onnx")


def test_read_onnx_info_names_missing_metadata(tmp_path):
    import onnx

    _, path = export_onnx(small_cnn(0), RESOLUTION, CLASSES, tmp_path / "m.onnx"), None
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match=r"bare.onnx lacks metadata \['classes', 'resolution'\]"):
        read_onnx_info(tmp_path / "bare.onnx")


def test_parity_rejects_bad_image_shapes(exported):
    model, path = exported
    with pytest.raises(ValueError, match="N x 1 x R x R"):
        check_parity(model, path, np.zeros((2, 3, RESOLUTION, RESOLUTION), np.float32))
