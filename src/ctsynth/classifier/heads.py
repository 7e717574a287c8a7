"""Classification heads on a backbone's N x D features, and the Classifier = backbone + head.

- `linear`: one affine layer (what a frozen-feature "linear probe" is).
- `mlp`: one hidden layer with ReLU and dropout.
- `reference`: the reference study's head: batch norm on the features, then dense layers with
  leaky ReLU, then a 2-way (n_classes-way) output. We output logits; softmax gives probabilities
  (for two classes, softmax over two logits is the sigmoid of their difference).
"""

from __future__ import annotations

import torch
from torch import nn

from ctsynth.classifier.backbones import Backbone
from ctsynth.config import HEADS

HEAD_NAMES = HEADS  # classifier.head's choices (config.Head)


def create_head(name: str, in_features: int, n_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    if name == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, n_classes))
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )
    if name == "reference":
        return nn.Sequential(
            nn.BatchNorm1d(in_features),
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden // 2, n_classes),
        )
    raise ValueError(f"classifier.head={name!r} is not one of {list(HEAD_NAMES)}")


class Classifier(nn.Module):
    """N x 1 x R x R model input -> N x n_classes logits. A frozen backbone stays in eval mode."""

    def __init__(self, backbone: Backbone, head: nn.Module, frozen_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_backbone = frozen_backbone

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # pretrained batch-norm statistics must not drift
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
