"""ONNX export of a classifier and the check that onnxruntime answers like PyTorch.

The exported file is the contract serving relies on:

    input  `image`   float32 N x 1 x R x R, already preprocessed by ctsynth.data.preprocess
    output `logits`  float32 N x C
    batch axis dynamic, one self-contained file (no external data)
    metadata_props   classes (JSON list), resolution, preprocessing (the function to call first)

Because the classes and the resolution travel inside the file, an ONNX model copied anywhere can
be served without the MLflow store it came from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: serving reads ONNX metadata without it
    import torch

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PREPROCESSING_FUNCTION = "ctsynth.data.preprocess.preprocess_bytes"
DEFAULT_OPSET = 18
CPU_PROVIDERS = ["CPUExecutionProvider"]


class OnnxParityError(AssertionError):
    """onnxruntime and PyTorch disagree on the same inputs by more than the tolerance."""


@dataclass(frozen=True)
class OnnxModelInfo:
    classes: list[str]
    resolution: int
    preprocessing: str


def export_onnx(
    model: torch.nn.Module,
    resolution: int,
    classes: list[str],
    path: Path | str,
    opset: int = DEFAULT_OPSET,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Export `model` (N x 1 x R x R -> N x len(classes) logits) to one ONNX file at `path`.

    The model is exported in eval mode on CPU (batch norm and dropout frozen); its own mode and
    device are restored afterwards.
    """
    import onnx
    import torch

    if not classes:
        raise ValueError("export_onnx: classes is empty; the model must name what its logits mean")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    original_device = next(model.parameters(), torch.empty(0)).device
    model = model.to("cpu").eval()
    example = torch.zeros(2, 1, resolution, resolution, dtype=torch.float32)
    try:
        with torch.no_grad():
            out = model(example)
        if out.ndim != 2 or out.shape[1] != len(classes):
            raise ValueError(
                f"export_onnx: model output has shape {tuple(out.shape)} for a batch of 2; "
                f"expected (2, {len(classes)}) for classes {classes}"
            )
        # dynamo=True is torch's default exporter; dynamic_shapes marks the batch axis. Everything
        # is embedded (external_data=False) so the model is one file to copy, hash and serve.
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    finally:
        model.train(was_training)
        model.to(original_device)

    proto = onnx.load(str(path))
    metadata = {
        "classes": json.dumps(list(classes)),
        "resolution": str(int(resolution)),
        "preprocessing": PREPROCESSING_FUNCTION,
        **(extra_metadata or {}),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    log.info("exported ONNX model to %s (%d bytes, classes %s, %d px)", path, path.stat().st_size, classes, resolution)
    return path


def read_onnx_info(onnx_model: Path | str | bytes) -> OnnxModelInfo:
    """Classes, resolution and preprocessing stored in an exported model's metadata."""
    import onnx

    try:
        proto = onnx.load_from_string(onnx_model) if isinstance(onnx_model, bytes) else onnx.load(str(onnx_model))
    except Exception as exc:
        where = "ONNX bytes" if isinstance(onnx_model, bytes) else str(onnx_model)
        raise ValueError(f"{where} is not a readable ONNX model: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in ("classes", "resolution") if k not in props]
    if missing:
        where = "ONNX bytes" if isinstance(onnx_model, bytes) else str(onnx_model)
        raise ValueError(f"{where} lacks metadata {missing}; export it with ctsynth.export.export_onnx")
    return OnnxModelInfo(
        classes=list(json.loads(props["classes"])),
        resolution=int(props["resolution"]),
        preprocessing=props.get("preprocessing", ""),
    )


def check_input_shape(images: np.ndarray, resolution: int, what: str = "images") -> np.ndarray:
    """The model input contract, checked the same way wherever images enter a model (registration's
    input example, the service's /logits): float32 N x 1 x R x R. Returns the images."""
    expected = (1, resolution, resolution)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"{what} has shape {images.shape}; expected N x {' x '.join(map(str, expected))}")
    return images


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from the exported model's logits (one row per image, or one image's vector),
    in float64: the one conversion every answer and every evaluation of an ONNX model uses."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def cuda_driver_present() -> bool:
    """Whether libcuda loads; onnxruntime-gpu would otherwise log errors and fall back silently."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def onnx_session(onnx_model: Path | str | bytes, device: str | torch.device = "cpu", threads: int | None = None, spin: bool = True):
    """The one way an onnxruntime session is made (evaluation, parity, registry, `ctsynth predict`,
    the service).

    `device`: "cpu" (pinned to the CPU provider: the -gpu wheel would try CUDA first), "cuda" or
    "cuda:N" (the CUDA provider first, CPU as fallback, a warning when CUDA does not run it),
    "auto" (CUDA where this onnxruntime build has the provider and a driver loads), or a resolved
    torch.device. `threads`: intra-op threads (None: onnxruntime's choice). `spin=False` keeps the
    worker threads from spinning between runs: in a server they would burn the cores the HTTP
    workers need. The provider that runs it is `session.get_providers()[0]`.
    """
    import onnxruntime as ort

    setting = str(device)
    available = ort.get_available_providers()
    want_cuda = setting.startswith("cuda") or (setting == "auto" and "CUDAExecutionProvider" in available and cuda_driver_present())
    if want_cuda and "CUDAExecutionProvider" not in available:
        log.warning("device %s asked for, but onnxruntime %s has no CUDAExecutionProvider: ONNX runs on the CPU", setting, ort.__version__)
        want_cuda = False
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if want_cuda:
        index = int(setting.split(":")[1]) if ":" in setting else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = CPU_PROVIDERS
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    got = session.get_providers()
    if want_cuda and got[0] != "CUDAExecutionProvider":
        log.warning("CUDA was requested but onnxruntime runs on %s", got)
    if not want_cuda and got[0] != "CPUExecutionProvider":
        raise RuntimeError(f"onnxruntime picked {got} instead of the CPU provider")
    return session


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path | str,
    images: np.ndarray | torch.Tensor,
    atol: float = 1e-4,
    batch_size: int = 64,
) -> float:
    """Run `images` (N x 1 x R x R float32) through PyTorch and onnxruntime; return the max |diff|.

    Raises OnnxParityError naming the largest difference and where it is when it exceeds `atol`.
    """
    import torch

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"check_parity: images must be N x 1 x R x R, got shape {images.shape}")
    if len(images) == 0:
        raise ValueError("check_parity: no images given; parity on nothing proves nothing")
    session = onnx_session(onnx_path)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    worst, worst_at = 0.0, (0, 0)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                expected = model(torch.from_numpy(chunk).to(device)).float().cpu().numpy()
                (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
                if actual.shape != expected.shape:
                    raise OnnxParityError(
                        f"ONNX output shape {actual.shape} != PyTorch output shape {expected.shape} ({onnx_path})"
                    )
                diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
                if not np.all(np.isfinite(diff)):
                    raise OnnxParityError(f"non-finite logits from PyTorch or onnxruntime on images {start}..")
                index = np.unravel_index(int(diff.argmax()), diff.shape)
                if diff[index] > worst:
                    worst, worst_at = float(diff[index]), (start + int(index[0]), int(index[1]))
    finally:
        model.train(was_training)
    if worst > atol:
        raise OnnxParityError(
            f"onnxruntime and PyTorch disagree on {onnx_path}: max |logit difference| {worst:.3g} "
            f"(image {worst_at[0]}, logit {worst_at[1]}) exceeds atol {atol:g} over {len(images)} images"
        )
    log.info("ONNX parity OK on %d images: max |logit difference| %.3g <= %g", len(images), worst, atol)
    return worst
