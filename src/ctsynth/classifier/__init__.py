"""The cancer classifier: backbones + heads, frozen-feature cache, training, evaluation, statistics."""
