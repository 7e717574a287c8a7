"""Train one classifier (one sweep item) and measure it.

Model choice is made on the VALIDATION split only: after every epoch the model is scored on
validation (`classifier.monitor`, default the validation cross-entropy), the best epoch's weights
are kept, and training stops after `patience` epochs without improvement. The test split is
touched once, by the chosen weights, at the end.

Two paths:
- trainable backbone: the whole model trains on the mixed images (optional shift augmentation);
- frozen backbone (`freeze_backbone: true`): features come from the on-disk FeatureCache (computed
  once per image) and only the head trains, on those cached feature vectors.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from ctsynth.classifier.backbones import create_backbone
from ctsynth.classifier.evaluate import classification_metrics, cross_entropy
from ctsynth.classifier.features import FeatureCache, decide_feature_precision
from ctsynth.classifier.heads import Classifier, create_head
from ctsynth.classifier.precision import (
    choose_precision,
    inference_mode,
    prepare_for_inference,
    to_inference_input,
)
from ctsynth.config import ClassifierParams
from ctsynth.device import resolve_device
from ctsynth.data.mixing import ImageDataset, ImageItem

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict]  # one dict per epoch: train/valid loss and accuracy, valid AUC, seconds
    best_epoch: int  # 1-based
    epochs_run: int
    valid: dict  # metrics of the chosen weights on the validation split (+ loss)
    test: dict  # metrics of the chosen weights on the real test split (+ loss)
    precision: dict = field(default_factory=dict)  # what ran in bf16 / fp32 and why
    n_parameters: int = 0
    n_trainable: int = 0
    seconds: float = 0.0
    # per-image predictions of the chosen weights (rows in the order of the items given), for the
    # study's bootstrap over test images
    test_probabilities: np.ndarray | None = None
    test_labels: np.ndarray | None = None


def build_classifier(params: ClassifierParams, n_classes: int, structure_only: bool = False) -> Classifier:
    """The classifier `params` describe; structure_only builds it without reading pretrained weights
    (to load a trained state_dict into, e.g. when `select` exports the champion)."""
    backbone = create_backbone(params.backbone, params.weights, in_chans=1, freeze=params.freeze_backbone, structure_only=structure_only)
    head = create_head(params.head, backbone.out_features, n_classes, hidden=params.head_hidden, dropout=params.dropout)
    return Classifier(backbone, head, frozen_backbone=params.freeze_backbone)


def make_optimizer(params: ClassifierParams, parameters) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    if params.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    return torch.optim.SGD(trainable, lr=params.learning_rate, momentum=0.9, weight_decay=params.weight_decay)


def predict_probabilities(module: nn.Module, inputs: torch.Tensor, precision: str = "fp32", batch_size: int = 64) -> torch.Tensor:
    """softmax(module(inputs)) in eval mode, float32 out, on the CPU (inputs go to the module's device)."""
    device = _module_device(module)
    prepare_for_inference(module, precision)
    outputs = []
    with inference_mode(precision, device.type):
        for start in range(0, len(inputs), batch_size):
            logits = module(to_inference_input(inputs[start : start + batch_size].to(device), precision))
            outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    module.to(memory_format=torch.contiguous_format)
    return torch.cat(outputs)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _score(monitor: str, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> tuple[float, dict]:
    """(value where higher is better, epoch record) for the monitored validation quantity."""
    metrics = classification_metrics(labels, probabilities, classes)
    loss = cross_entropy(labels, probabilities)
    record = {"valid_loss": loss, "valid_accuracy": metrics["accuracy"], "valid_balanced_accuracy": metrics["balanced_accuracy"], "valid_roc_auc": metrics["roc_auc"]}
    value = -loss if monitor == "valid_loss" else record[monitor]
    return (value if not math.isnan(value) else -math.inf), record


def fit(
    module: nn.Module,
    train_data: torch.utils.data.Dataset,
    valid_inputs: torch.Tensor,
    valid_labels: torch.Tensor,
    classes: list[str],
    params: ClassifierParams,
    seed: int,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """Train `module` with early stopping on validation; leaves it holding the best epoch's weights.

    Batches go to the module's device; the loader and its shuffling stay on the CPU, so the batch
    order of a seed is the same on every device.
    Returns (per-epoch history, best epoch, 1-based)."""
    device = _module_device(module)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_data, batch_size=params.batch_size, shuffle=True, generator=generator, drop_last=len(train_data) > params.batch_size)
    optimizer = make_optimizer(params, module.parameters())
    loss_fn = nn.CrossEntropyLoss()
    best_value, best_epoch, best_state = -math.inf, 0, copy.deepcopy(module.state_dict())
    history = []
    epochs = tqdm(range(1, params.epochs + 1), desc=f"train seed {seed}", disable=not progress, leave=False)
    for epoch in epochs:
        started = time.perf_counter()
        module.train()
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = module(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        # Per-epoch validation runs in fp32 so the early-stopping curve has one numeric meaning.
        probabilities = predict_probabilities(module, valid_inputs, "fp32").numpy()
        value, record = _score(params.monitor, valid_labels.numpy(), probabilities, classes)
        record = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1), **record, "seconds": time.perf_counter() - started}
        history.append(record)
        if value > best_value:
            best_value, best_epoch, best_state = value, epoch, copy.deepcopy(module.state_dict())
        epochs.set_postfix(valid_loss=f"{record['valid_loss']:.3f}", best=best_epoch)
        if epoch - best_epoch >= params.patience:
            log.info("early stop at epoch %d: no better %s since epoch %d", epoch, params.monitor, best_epoch)
            break
    module.load_state_dict(best_state)
    return history, best_epoch


def _split_metrics(labels: torch.Tensor, probabilities: torch.Tensor, classes: list[str]) -> dict:
    metrics = classification_metrics(labels.numpy(), probabilities.numpy(), classes)
    metrics["loss"] = cross_entropy(labels.numpy(), probabilities.numpy())
    return metrics


def train_classifier(
    params: ClassifierParams,
    train_items: list[ImageItem],
    valid_items: list[ImageItem],
    test_items: list[ImageItem],
    classes: list[str],
    seed: int,
    progress: bool = True,
    use_feature_cache: bool = True,
) -> TrainResult:
    """Train on `train_items`, choose weights on `valid_items`, measure on `test_items`.

    use_feature_cache=False runs a frozen backbone on every image every epoch instead of reading
    cached features (the baseline benchmarks/sweep_speed.py compares the cache against)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    # Built (and initialised from the seed) on the CPU, then moved: the initial weights of a seed
    # do not depend on the device.
    model = build_classifier(params, len(classes)).to(resolve_device(params.device))
    valid_labels = torch.tensor([item.label_id for item in valid_items])
    test_labels = torch.tensor([item.label_id for item in test_items])
    precision: dict = {}

    if params.freeze_backbone and use_feature_cache:
        decision = decide_feature_precision(
            _cache_root(params), model.backbone, params.resolution, valid_items, params.inference_precision, params.bf16_feature_tolerance
        )
        precision["features"] = decision.__dict__
        cache = FeatureCache(_cache_root(params), model.backbone, params.resolution, decision.precision)
        train_features = cache.features(train_items, progress=progress)
        valid_features = cache.features(valid_items, progress=progress)
        test_features = cache.features(test_items, progress=progress)
        precision["feature_cache"] = {"folder": str(cache.folder), "hits": cache.hits, "misses": cache.misses}
        train_labels = torch.tensor([item.label_id for item in train_items])
        history, best_epoch = fit(model.head, TensorDataset(train_features, train_labels), valid_features, valid_labels, classes, params, seed, progress)
        # The head on cached features is tiny: evaluate it in fp32.
        valid_probabilities = predict_probabilities(model.head, valid_features)
        test_probabilities = predict_probabilities(model.head, test_features)
        precision["evaluation"] = {"precision": "fp32", "reason": "head on cached features"}
    else:
        max_shift = params.max_shift if params.augment else 0
        train_data = ImageDataset(train_items, params.resolution, augment=params.augment, max_shift=max_shift)
        train_data.seed(seed)
        valid_inputs = ImageDataset(valid_items, params.resolution).inputs
        test_inputs = ImageDataset(test_items, params.resolution).inputs
        history, best_epoch = fit(model, train_data, valid_inputs, valid_labels, classes, params, seed, progress)
        decision = choose_precision(
            params.inference_precision,
            lambda p: predict_probabilities(model, valid_inputs, p),
            what=f"evaluation ({params.backbone}, {params.resolution} px)",
            tolerance=params.bf16_prob_tolerance,
            compare="probabilities",
        )
        precision["evaluation"] = decision.__dict__
        valid_probabilities = predict_probabilities(model, valid_inputs, decision.precision)
        test_probabilities = predict_probabilities(model, test_inputs, decision.precision)

    model.eval().cpu()  # the trained model goes back to the CPU for saving, export and selection
    n_parameters = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        epochs_run=len(history),
        valid=_split_metrics(valid_labels, valid_probabilities, classes),
        test=_split_metrics(test_labels, test_probabilities, classes),
        precision=precision,
        n_parameters=n_parameters,
        n_trainable=n_trainable,
        seconds=time.perf_counter() - started,
        test_probabilities=test_probabilities.numpy(),
        test_labels=test_labels.numpy(),
    )
    log.info(
        "seed %d: best epoch %d of %d, valid balanced accuracy %.3f, test accuracy %.3f, AUC %.3f (%.1f s)",
        seed, best_epoch, len(history), result.valid["balanced_accuracy"], result.test["accuracy"], result.test["roc_auc"], result.seconds,
    )
    return result


def _cache_root(params: ClassifierParams):
    from pathlib import Path

    from ctsynth.paths import repo_root

    root = Path(params.feature_cache)
    return root if root.is_absolute() else repo_root() / root
