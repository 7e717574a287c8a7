"""DVC stage `validate`: Great Expectations checks of data/raw + data/prepared.

`python pipelines/validate.py [--params FILE]`. Everything the stage does is ctsynth.stages.validate.run,
which `ctsynth validate` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import validate

if __name__ == "__main__":
    sys.exit(stages.main(validate))
