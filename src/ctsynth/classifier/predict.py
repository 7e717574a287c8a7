"""`ctsynth predict`: label and probabilities per file from the champion (or a given ONNX file),
through the same preprocess_bytes as training and the same answer as the service's /predict
(ctsynth.registry.ChampionModel.answer)."""

from __future__ import annotations

from pathlib import Path

from ctsynth.data.preprocess import ImageDecodeError, preprocess_bytes
from ctsynth.export import INPUT_NAME, OUTPUT_NAME


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
        answers.append({"file": str(path), **model.answer(logits[0])})
    return answers
