"""DVC stage `train_classifier`: every item of the sweep through the executor of sweep.executor.

`python pipelines/train_classifier.py [--params FILE]`. Everything the stage does is ctsynth.stages.train_classifier.run,
which `ctsynth train-classifier` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import train_classifier

if __name__ == "__main__":
    sys.exit(stages.main(train_classifier))
