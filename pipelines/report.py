"""DVC stage `report`: reports/summary.html, the self-contained study report.

`python pipelines/report.py [--params FILE]`. Everything the stage does is ctsynth.stages.report.run,
which `ctsynth report` calls too; this file only gives DVC a command to run.
"""

import sys

from ctsynth import stages
from ctsynth.stages import report

if __name__ == "__main__":
    sys.exit(stages.main(report))
