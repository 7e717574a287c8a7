import numpy as np
import pytest
import torch
from _classifier_data import CLASSES, write_prepared
from PIL import Image

from ctsynth.classifier.backbones import WeightsNotFoundError, create_backbone, imagenet_checkpoint_path
from ctsynth.classifier.features import FeatureCache, extract_features
from ctsynth.classifier.heads import Classifier, create_head
from ctsynth.classifier.precision import choose_precision, cpu_supports_bf16
from ctsynth.data.mixing import real_split


def test_imagenet_weights_absent_gives_a_clear_error_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = imagenet_checkpoint_path("resnet18")
    assert expected == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsNotFoundError, match=r"resnet18-f37072fd\.pth at .*hub/checkpoints"):
        create_backbone("resnet18", "imagenet")


def test_weights_from_a_path_load_and_grey_input_stays_one_channel(tmp_path):
    from torchvision import models

    reference = models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    backbone = create_backbone("resnet18", str(tmp_path / "r18.pth"), freeze=True)
    assert torch.equal(backbone.body.conv1.weight, reference.conv1.weight)
    assert all(not p.requires_grad for p in backbone.parameters())
    model = Classifier(backbone, create_head("reference", backbone.out_features, 2), frozen_backbone=True).train()
    assert not model.backbone.training and model.head.training  # frozen BN statistics stay fixed
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 2)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not one of"):
        create_backbone("vgg16", "none")


def test_weights_file_is_hashed_once_per_process_and_a_rewritten_file_is_a_new_key(tmp_path):
    from torchvision import models

    from ctsynth.classifier import backbones

    path = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None).state_dict(), path)
    first = create_backbone("resnet18", str(path), freeze=True)
    reads = backbones._read_state_dict.cache_info().misses
    second = create_backbone("resnet18", str(path), freeze=True)
    assert backbones._read_state_dict.cache_info().misses == reads  # served from memory, not re-read
    assert first.weights_fingerprint() == second.weights_fingerprint()
    assert torch.equal(first.body.layer1[0].conv1.weight, second.body.layer1[0].conv1.weight)
    second.body.conv1.weight.data.add_(1.0)  # a caller's module is its own copy: the cache is untouched
    assert torch.equal(create_backbone("resnet18", str(path)).body.conv1.weight, first.body.conv1.weight)

    torch.manual_seed(1)
    torch.save(models.resnet18(weights=None).state_dict(), path)
    import os

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    rewritten = create_backbone("resnet18", str(path), freeze=True)
    assert rewritten.weights_fingerprint() != first.weights_fingerprint()
    assert not torch.equal(rewritten.body.conv1.weight, first.body.conv1.weight)

    # a backbone that trains is hashed from its current tensors, not from the file it started from
    trainable = create_backbone("resnet18", str(path), freeze=False)
    before = trainable.weights_fingerprint()
    trainable.body.conv1.weight.data.add_(1.0)
    assert trainable.weights_fingerprint() != before


def test_scratch_resnet_takes_the_grey_channel_directly():
    backbone = create_backbone("resnet34", "none")
    assert backbone.body.conv1.in_channels == 1
    assert backbone(torch.zeros(2, 1, 32, 32)).shape == (2, 512)


@pytest.fixture()
def items(tmp_path):
    prepared = write_prepared(tmp_path, {"train": (3, 3), "valid": (1, 1), "test": (1, 1)}, size=16)
    return real_split(prepared, "train", CLASSES)


def test_feature_cache_hits_and_invalidation(tmp_path, items):
    torch.manual_seed(0)
    backbone = create_backbone("smallcnn", "none", freeze=True)
    cache = FeatureCache(tmp_path / "cache", backbone, resolution=16, precision="fp32")
    first = cache.features(items, progress=False)
    assert (cache.misses, cache.hits) == (6, 0)
    again = FeatureCache(tmp_path / "cache", backbone, resolution=16, precision="fp32")
    second = again.features(items, progress=False)
    assert (again.misses, again.hits) == (0, 6)
    assert torch.equal(first, second)
    # the cached values are the backbone's features of the preprocessed image
    direct = extract_features(backbone, torch.stack([torch.from_numpy(__import__("ctsynth.data.preprocess", fromlist=["x"]).preprocess_bytes(i.path.read_bytes(), 16)) for i in items]), "fp32")
    assert torch.allclose(first, direct, atol=1e-5)

    # new image content -> only that image is recomputed
    Image.fromarray(np.full((16, 16), 200, np.uint8), mode="L").save(items[0].path)
    changed = FeatureCache(tmp_path / "cache", backbone, resolution=16, precision="fp32")
    third = changed.features(items, progress=False)
    assert (changed.misses, changed.hits) == (1, 5)
    assert not torch.equal(third[0], first[0]) and torch.equal(third[1:], first[1:])

    # other weights, resolution or precision -> another key, nothing reused
    torch.manual_seed(1)
    other_weights = FeatureCache(tmp_path / "cache", create_backbone("smallcnn", "none", freeze=True), 16, "fp32")
    other_resolution = FeatureCache(tmp_path / "cache", backbone, 24, "fp32")
    other_precision = FeatureCache(tmp_path / "cache", backbone, 16, "bf16")
    assert len({cache.key, other_weights.key, other_resolution.key, other_precision.key}) == 4
    other_weights.features(items, progress=False)
    assert other_weights.misses == 6


def test_precision_choice_falls_back_to_fp32_when_bf16_changes_predictions():
    def run(precision):
        # a pretend model whose bf16 output flips a label
        return torch.tensor([[0.6, 0.4], [0.2, 0.8]]) if precision == "fp32" else torch.tensor([[0.45, 0.55], [0.2, 0.8]])

    assert choose_precision("fp32", run, "t", 0.02, "probabilities").precision == "fp32"
    decision = choose_precision("auto", run, "t", 0.02, "probabilities")
    assert decision.precision == "fp32"
    if cpu_supports_bf16():
        assert decision.label_changes == 1 and "check failed" in decision.reason
        same = choose_precision("auto", lambda p: torch.tensor([[0.6, 0.4]]), "t", 0.02, "probabilities")
        assert same.precision == "bf16"
        with pytest.raises(RuntimeError, match="bf16 was required"):
            choose_precision("bf16", run, "t", 0.02, "probabilities")
