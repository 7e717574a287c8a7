"""Frozen-backbone feature cache: a frozen backbone is a fixed function, so each image's features
are computed once and every later run (other seeds, other ratios, other heads) reads them back.

Layout: <cache root>/<backbone key>/<image sha256>.npy (float32, D values), where
backbone key = sha256(backbone name, sha256 of its weights, input resolution, precision), and
<image sha256> is the hash of the image file's bytes. Any change of image content, weights (also a
different random init), resolution, precision or device (GPU features are kept apart) is a different key, so a stale entry is never read.
Entries are written atomically (temp file + rename), so parallel sweep items can share the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctsynth.classifier.backbones import Backbone
from ctsynth.classifier.precision import inference_mode, prepare_for_inference, to_inference_input
from ctsynth.data.mixing import ImageItem
from ctsynth.data.preprocess import preprocess_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def backbone_key(name: str, weights_fingerprint: str, resolution: int, precision: str, device_type: str = "cpu") -> str:
    identity = {
        "format": CACHE_FORMAT_VERSION,
        "backbone": name,
        "weights_sha256": weights_fingerprint,
        "resolution": resolution,
        "precision": precision,
    }
    # Features computed on a GPU differ from the CPU's in the last bits (other kernels), so they are
    # kept apart; the CPU key is the one written before devices existed, so CPU entries stay valid.
    if device_type != "cpu":
        identity["device"] = device_type
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def extract_features(backbone: Backbone, inputs: torch.Tensor, precision: str, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Backbone features N x D (float32, on the CPU) for model inputs N x 1 x R x R, in `precision`,
    computed on the backbone's device."""
    device = next(backbone.parameters(), torch.empty(0)).device
    prepare_for_inference(backbone, precision)
    outputs = []
    with inference_mode(precision, device.type):
        for start in tqdm(range(0, len(inputs), batch_size), desc=f"features {backbone.name} {precision}", disable=not progress, leave=False):
            chunk = to_inference_input(inputs[start : start + batch_size].to(device), precision)
            outputs.append(backbone(chunk).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, backbone.out_features)


@dataclass
class FeatureCache:
    root: Path
    backbone: Backbone
    resolution: int
    precision: str
    batch_size: int = 32
    hits: int = 0
    misses: int = 0
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        device_type = next(self.backbone.parameters(), torch.empty(0)).device.type
        self.key = backbone_key(self.backbone.name, self.backbone.weights_fingerprint(), self.resolution, self.precision, device_type)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "key.json"
        if not meta.exists():  # for a person browsing the cache
            _atomic_write_bytes(meta, json.dumps({"backbone": self.backbone.name, "resolution": self.resolution, "precision": self.precision, "key": self.key}).encode())

    @property
    def folder(self) -> Path:
        return self.root / self.key

    def features(self, items: list[ImageItem], progress: bool = True) -> torch.Tensor:
        """N x D features of `items` (in order): read from the cache, computing only what is missing."""
        hashes = [file_sha256(item.path) for item in items]
        missing = {}
        for item, digest in zip(items, hashes):
            if not (self.folder / f"{digest}.npy").exists():
                missing.setdefault(digest, item)
        self.misses += len(missing)
        self.hits += len(set(hashes)) - len(missing)
        if missing:
            log.info("feature cache %s: computing %d of %d images", self.folder, len(missing), len(set(hashes)))
            digests = list(missing)
            inputs = torch.from_numpy(np.stack([preprocess_bytes(missing[d].path.read_bytes(), self.resolution) for d in digests]))
            computed = extract_features(self.backbone, inputs, self.precision, self.batch_size, progress=progress).numpy()
            for digest, vector in zip(digests, computed):
                buffer = _npy_bytes(vector.astype(np.float32))
                _atomic_write_bytes(self.folder / f"{digest}.npy", buffer)
        if not items:
            return torch.empty(0, self.backbone.out_features)
        return torch.from_numpy(np.stack([np.load(self.folder / f"{digest}.npy") for digest in hashes]))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    descriptor, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _device_identity(backbone: Backbone) -> dict:
    """{} on the CPU (so stored CPU decisions stay valid), else {"device": "cuda"}."""
    device_type = next(backbone.parameters(), torch.empty(0)).device.type
    return {} if device_type == "cpu" else {"device": device_type}


def decide_feature_precision(
    root: Path,
    backbone: Backbone,
    resolution: int,
    valid_items: list[ImageItem],
    requested: str,
    tolerance: float,
):
    """bf16 or fp32 for feature extraction, checked on the validation images; the decision is
    stored next to the cache (keyed by weights, resolution and the validation images), so the check
    runs once per sweep rather than once per run."""
    from ctsynth.classifier.precision import PrecisionDecision, choose_precision

    identity = {
        "backbone": backbone.name,
        "weights": backbone.weights_fingerprint(),
        **_device_identity(backbone),
        "resolution": resolution,
        "valid": sorted(file_sha256(item.path) for item in valid_items),
        "requested": requested,
        "tolerance": tolerance,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    record = Path(root) / f"precision-{key}.json"
    if record.exists():
        decision = PrecisionDecision(**json.loads(record.read_text()))
        log.info("feature extraction precision: %s (stored check %s: %s)", decision.precision, record.name, decision.reason)
        return decision
    inputs = torch.from_numpy(np.stack([preprocess_bytes(item.path.read_bytes(), resolution) for item in valid_items]))
    decision = choose_precision(
        requested,
        lambda precision: extract_features(backbone, inputs, precision),
        what=f"feature extraction ({backbone.name}, {resolution} px)",
        tolerance=tolerance,
        compare="features",
    )
    Path(root).mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(record, json.dumps(decision.__dict__).encode())
    return decision
