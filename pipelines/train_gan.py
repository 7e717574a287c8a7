"""DVC stage `train_gan`: StyleGAN2-ADA on data/prepared/train (or: torchrun --nproc_per_node N pipelines/train_gan.py).

`python pipelines/train_gan.py [--params FILE]`. Everything the stage does is ctsynth.stages.train_gan.run,
which `ctsynth train-gan` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import train_gan

if __name__ == "__main__":
    sys.exit(stages.main(train_gan))
