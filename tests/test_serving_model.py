"""What serving gets from the registry, and only from there: the champion object makes the
onnxruntime session for a device, predicts probabilities, checks the input shape, and builds the
answer that `ctsynth predict` and the service's /predict both return."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctsynth.data.preprocess import preprocess_bytes
from ctsynth.export import export_onnx, onnx_session, softmax
from ctsynth.registry import load_onnx_file

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 16
CLASSES = ["normal", "squamous"]
# serving/ may use these of ctsynth (plus its own modules): the model and the one preprocessing.
SERVING_MAY_IMPORT = {"ctsynth", "ctsynth.registry", "ctsynth.data.preprocess"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(3, len(CLASSES))).eval()
    return load_onnx_file(export_onnx(net, RESOLUTION, CLASSES, tmp_path_factory.mktemp("onnx") / "m.onnx"))


def repository_imports(path: Path) -> set[str]:
    """Modules of this repository (ctsynth.*, serving.*) and onnxruntime that `path` imports, anywhere."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "ctsynth":
                names.update(f"ctsynth.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("ctsynth", "serving", "onnxruntime")}


@pytest.mark.parametrize("path", sorted((REPO / "serving").glob("*.py")), ids=lambda p: p.name)
def test_serving_imports_only_the_registry_the_preprocessing_and_itself(path):
    outside = sorted(n for n in repository_imports(path) if n.split(".")[0] != "serving" and n not in SERVING_MAY_IMPORT)
    assert not outside, f"serving/{path.name} imports {outside}; the model (session, answer, checks) comes from ctsynth.registry"


def test_predict_is_the_softmax_of_the_sessions_logits(model):
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, RESOLUTION, RESOLUTION)).astype(np.float32)
    (logits,) = onnx_session(model.onnx_bytes).run(["logits"], {"image": images})
    probabilities = model.predict(images)
    assert probabilities.shape == (5, len(CLASSES)) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert np.allclose(probabilities, softmax(logits)) and np.array_equal(probabilities.argmax(1), logits.argmax(1))
    assert model.session("cpu").get_providers()[0] == "CPUExecutionProvider"


def test_one_input_check_for_registration_and_serving(model):
    with pytest.raises(ValueError, match=r"images has shape \(2, 1, 8, 8\); expected N x 1 x 16 x 16"):
        model.predict(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected N x 1 x 16 x 16"):
        model.check_input(np.zeros((16, 16), np.float32))


def test_answer_names_the_top_class_every_probability_and_the_model(model):
    answer = model.answer(np.array([0.5, 2.5], np.float32))
    assert answer["label"] == "squamous" and answer["model"] == {"name": "m", "version": "file"}
    assert answer["probabilities"]["squamous"] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0)
    json.dumps(answer)  # plain floats and strings: what the service sends


def test_ctsynth_predict_answers_what_the_model_answers(model, tmp_path):
    from PIL import Image

    from ctsynth.classifier.predict import predict_files

    image = tmp_path / "slice.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30), dtype=np.uint8)).save(image)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good, broken = predict_files([image, bad], model)
    (logits,) = model.session().run(["logits"], {"image": preprocess_bytes(image.read_bytes(), RESOLUTION)[None]})
    assert good == {"file": str(image), **model.answer(logits[0])}
    assert set(broken) == {"file", "error"}


def test_the_service_builds_no_session_and_no_answer_of_its_own():
    """The service's model comes with its session, answer and shape check: the service module holds
    no onnxruntime session options and no softmax."""
    source = (REPO / "serving" / "service.py").read_text()
    assert "InferenceSession" not in source and "np.exp" not in source
    assert "self.model.answer(" in source and "self.model.session(" in source and ".model.check_input(" in source


def module_level_imports(path: Path) -> set[str]:
    """ctsynth modules `path` imports when it is imported (not those inside functions, which run
    only when called, nor TYPE_CHECKING ones)."""
    names = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            for field in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text()).body)
    return {n for n in names if n.split(".")[0] == "ctsynth"}


@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "bentofile-gpu.yaml"])
def test_the_bento_carries_every_ctsynth_module_the_service_imports(bentofile):
    import yaml

    included = set(yaml.safe_load((REPO / "serving" / bentofile).read_text())["include"])
    # serving's own imports all run (its lazy ones when the service starts); of a ctsynth module,
    # those at module level run on import (registry's lazy ones serve the select stage, not serving)
    pending = [path for path in (REPO / "serving").glob("*.py")]
    needed, seen = set(), set()
    while pending:
        path = pending.pop()
        names = repository_imports(path) if path.parent.name == "serving" else module_level_imports(path)
        for name in (n for n in names if n.startswith("ctsynth")):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs on the way down
                folder = REPO / "src" / Path(*parts[:depth])
                file = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
                if file.is_file() and file not in seen:
                    seen.add(file)
                    needed.add(file.relative_to(REPO).as_posix())
                    pending.append(file)
    missing = sorted(needed - included)
    assert "src/ctsynth/registry.py" in needed and not missing, f"serving/{bentofile} lacks {missing}: the bento would not start"
