"""DVC stage `oracle`: the oracle arm's new genuine images in data/oracle.

`python pipelines/oracle.py [--params FILE]`. Everything the stage does is ctsynth.stages.oracle.run,
which `ctsynth oracle` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import oracle

if __name__ == "__main__":
    sys.exit(stages.main(oracle))
