"""Synthetic-data quality at small n: KID, Fréchet distance, k-NN precision/recall, memorisation.

Every metric here is a plain function of two feature (or pixel) arrays, so it can be tested on
hand-made inputs; `features.py` decides what the arrays are, `synthetic.py` which sets are compared
(synthetic vs. real, and real vs. real as the floor); the stage that reads and writes the files is
ctsynth.stages.validate_synthetic.
"""

from ctsynth.metrics.frechet import frechet_distance
from ctsynth.metrics.kid import kernel_inception_distance, polynomial_kernel, unbiased_mmd2
from ctsynth.metrics.memorisation import MemorisationResult, memorisation
from ctsynth.metrics.prdc import precision_recall_density_coverage

__all__ = [
    "MemorisationResult",
    "frechet_distance",
    "kernel_inception_distance",
    "memorisation",
    "polynomial_kernel",
    "precision_recall_density_coverage",
    "unbiased_mmd2",
]
