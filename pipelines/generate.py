"""DVC stage `generate`: synthetic images per class from models/gan into data/synthetic.

`python pipelines/generate.py [--params FILE]`. Everything the stage does is ctsynth.stages.generate.run,
which `ctsynth generate` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import generate

if __name__ == "__main__":
    sys.exit(stages.main(generate))
