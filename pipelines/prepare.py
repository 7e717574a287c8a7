"""DVC stage `prepare`: data/raw (Kaggle layout) -> data/prepared/{split}/{class}/*.png + manifest.csv.

`python pipelines/prepare.py [--params FILE]`. Everything the stage does is ctsynth.stages.prepare.run,
which `ctsynth prepare` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import prepare

if __name__ == "__main__":
    sys.exit(stages.main(prepare))
