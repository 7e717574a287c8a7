"""StyleGAN2-ADA, written from the papers (design, presets and measurements: ``docs/gan.md``).

``networks`` (Generator, Discriminator), ``augment`` (AugmentPipe, AdaptiveP),
``loss`` (StyleGAN2Loss), ``presets`` (GANConfig, make_config), ``ops`` (upfirdn2d,
bias_act). Import the submodules directly; this package imports nothing heavy
so that ``import ctsynth.gan.presets`` stays cheap.
"""
