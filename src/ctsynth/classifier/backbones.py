"""Backbones: torchvision ResNets (ImageNet weights from the local cache only) and a small CNN.

A backbone maps the model input (float32 N x 1 x R x R in [-1, 1], from preprocess_bytes) to a
feature vector N x D. ImageNet-pretrained ResNets expect 3 normalised channels, so for them the
grey-to-RGB step lives *inside* the backbone (`GreyToImageNet`): the exported ONNX model keeps the
1-channel input that serving feeds it.

Nothing here downloads. `weights="imagenet"` reads torchvision's checkpoint file from
`torch.hub.get_dir()/checkpoints/`; when it is absent the error names the file and the folder.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctsynth.config import BACKBONES

log = logging.getLogger(__name__)

BACKBONE_NAMES = BACKBONES  # classifier.backbone's choices (config.Backbone)
RESNETS = tuple(name for name in BACKBONE_NAMES if name.startswith("resnet"))
SMALL_CNN = "smallcnn"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but the file is not on this machine (we never download)."""


class GreyToImageNet(nn.Module):
    """[-1, 1] grey N x 1 x R x R -> ImageNet-normalised RGB N x 3 x R x R (what pretrained nets saw)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = (x + 1.0) * 0.5
        return (unit.expand(-1, 3, -1, -1) - self.mean) / self.std


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks and global average pooling: ~0.1 M parameters, trains in
    seconds per epoch on 2 CPU cores at 64 px, which is what the 25-run CPU sweep needs."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class Backbone(nn.Module):
    """input adapter (optional) -> feature extractor; `out_features` is D of the N x D output."""

    def __init__(
        self, name: str, body: nn.Module, out_features: int, adapter: nn.Module | None, source_fingerprint: str | None = None
    ) -> None:
        super().__init__()
        self.name = name
        self.adapter = adapter if adapter is not None else nn.Identity()
        self.body = body
        self.out_features = out_features
        # sha256 of the weights file's tensors, known from loading it (computed once per process).
        self.source_fingerprint = source_fingerprint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.adapter(x))

    def weights_fingerprint(self) -> str:
        """The identity of these weights (the feature cache's key). A frozen backbone loaded from a
        file still holds that file's weights, so their hash, taken once per process when the file
        was read, stands for them; anything else is hashed tensor by tensor now."""
        frozen = not any(parameter.requires_grad for parameter in self.parameters())
        if frozen and self.source_fingerprint is not None:
            return f"{self.name}:{self.source_fingerprint}"
        return state_fingerprint(self)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    weights: str  # "imagenet", "none" or a file path
    in_chans: int = 1


def imagenet_checkpoint_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet checkpoint of `name` (IMAGENET1K_V1, as Keras' ResNet50)."""
    from torchvision import models

    weights_enum = models.get_model_weights(name).IMAGENET1K_V1
    file_name = weights_enum.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _load_state_dict(path: Path, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights file's state_dict and the sha256 of its tensors."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: weights file {path} does not exist")
    stat = path.stat()
    return _read_state_dict(str(path.resolve()), stat.st_size, stat.st_mtime_ns, what)


@functools.lru_cache(maxsize=2)
def _read_state_dict(path: str, size: int, mtime_ns: int, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """A weights file read and hashed once per process (a sweep builds its backbone once per run);
    size and modification time in the key make a rewritten file a new entry. Callers copy the
    tensors into their own modules, so the cached ones are never modified."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{what}: {path} is not a loadable PyTorch state_dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, expected a state_dict")
    return state, tensors_sha256({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def _resnet(name: str, weights: str, in_chans: int, structure_only: bool = False) -> Backbone:
    from torchvision import models

    pretrained = weights != "none" and not structure_only
    # Weights about to be overwritten by a file need no random initialisation (seconds for a
    # ResNet50 on 2 cores, once per sweep run): build on the meta device, then allocate.
    with torch.device("meta" if pretrained else "cpu"):
        net = getattr(models, name)(weights=None)
    out_features = net.fc.in_features
    net.fc = nn.Identity()
    if weights == "none":
        # Trained from scratch: take the grey channel directly instead of faking RGB.
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return Backbone(name, net, out_features, adapter=None)
    if structure_only:  # the pretrained layout (3-channel input behind the grey adapter), weights to be loaded later
        return Backbone(name, net, out_features, adapter=GreyToImageNet() if in_chans == 1 else None)
    if weights == "imagenet":
        path = imagenet_checkpoint_path(name)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} are not on this machine and ctsynth never downloads. "
                f"Put torchvision's file {path.name} at {path} (download it elsewhere from "
                f"{models.get_model_weights(name).IMAGENET1K_V1.url}), or set classifier.weights to "
                f"a file path, or to 'none' to train from scratch."
            )
        what = f"classifier.weights=imagenet ({name})"
    else:
        path = Path(weights)
        what = f"classifier.weights={weights} ({name})"
    loaded, fingerprint = _load_state_dict(path, what)
    state = {k: v for k, v in loaded.items() if not k.startswith("fc.")}
    net.to_empty(device="cpu")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: {path} does not fit torchvision's {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    adapter = GreyToImageNet() if in_chans == 1 else None
    return Backbone(name, net, out_features, adapter=adapter, source_fingerprint=fingerprint)


def _small_cnn(weights: str, in_chans: int, structure_only: bool = False) -> Backbone:
    body = SmallCNN(in_chans)
    if weights == "imagenet":
        raise ValueError("classifier.weights=imagenet: there are no ImageNet weights for smallcnn; use a resnet or 'none'")
    if weights != "none" and not structure_only:
        state, _ = _load_state_dict(Path(weights), f"classifier.weights={weights} (smallcnn)")
        body.load_state_dict(state)
    return Backbone(SMALL_CNN, body, body.out_features, adapter=None)


def create_backbone(name: str, weights: str = "none", in_chans: int = 1, freeze: bool = False, structure_only: bool = False) -> Backbone:
    """Backbone `name` (resnet18/34/50, smallcnn) with `weights` ('imagenet', 'none' or a path).

    structure_only: the same modules, but pretrained weights are not read (a trained state_dict
    will be loaded into it)."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"classifier.backbone={name!r} is not one of {list(BACKBONE_NAMES)}")
    if name == SMALL_CNN:
        backbone = _small_cnn(weights, in_chans, structure_only)
    else:
        backbone = _resnet(name, weights, in_chans, structure_only)
    if freeze:
        freeze_module(backbone)
    log.info("backbone %s, weights %s, %d features, frozen=%s", name, weights, backbone.out_features, freeze)
    return backbone


def freeze_module(module: nn.Module) -> None:
    """No gradients and eval mode (batch-norm statistics stay those of the pretrained weights)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.eval()


def state_fingerprint(module: nn.Module) -> str:
    """sha256 of every parameter and buffer: the identity of a set of weights, whatever its origin."""
    return tensors_sha256(module.state_dict())


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
