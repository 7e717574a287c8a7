"""`ctsynth predict`: label and probabilities per file from the champion (or a given ONNX file),
through the same preprocess_bytes as training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctsynth.data.preprocess import ImageDecodeError, preprocess_bytes
from ctsynth.export import INPUT_NAME, OUTPUT_NAME


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict_files(paths: list[Path], model) -> list[dict]:
    """One dict per file: {"file", "label", "probabilities", "model"} or {"file", "error"}."""
    session = model.session()
    answers = []
    for path in paths:
        try:
            image = preprocess_bytes(Path(path).read_bytes(), model.resolution)
        except (OSError, ImageDecodeError) as exc:
            answers.append({"file": str(path), "error": str(exc)})
            continue
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: image[None]})
        probabilities = softmax(logits.astype(np.float64))[0]
        answers.append({
            "file": str(path),
            "label": model.classes[int(probabilities.argmax())],
            "probabilities": {c: float(p) for c, p in zip(model.classes, probabilities)},
            "model": {"name": model.name, "version": model.version},
        })
    return answers
