"""DVC stage `select`: sweep statistics, champion by validation metric, ONNX export + parity, registry.

`python pipelines/select_champion.py [--params FILE]`. Everything the stage does is ctsynth.stages.select_champion.run,
which `ctsynth select` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import select_champion

if __name__ == "__main__":
    sys.exit(stages.main(select_champion))
