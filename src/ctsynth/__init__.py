"""ctsynth: does StyleGAN2-ADA synthetic data make a chest-CT cancer classifier better?"""

__version__ = "0.1.0"
