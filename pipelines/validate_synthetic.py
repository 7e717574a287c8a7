"""DVC stage `validate_synthetic`: the validate suite on the synthetic manifest + quality metrics.

`python pipelines/validate_synthetic.py [--params FILE]`. Everything the stage does is ctsynth.stages.validate_synthetic.run,
which `ctsynth validate-synthetic` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import validate_synthetic

if __name__ == "__main__":
    sys.exit(stages.main(validate_synthetic))
