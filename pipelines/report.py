"""DVC stage `report`: python pipelines/report.py

Writes reports/summary.html, one self-contained page (images embedded): data validation, GAN curves
and real-vs-synthetic grids, synthetic quality and memorisation, the ratio sweep with its CIs and
paired differences, and the champion's confusion matrix and ROC curve (its exported ONNX model run
over the prepared test split). Logs the page to the sweep's MLflow parent run (artifact report/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root
from ctsynth.report import ReportInputs, log_report_to_parent_run, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None)
    parser.add_argument("--out", default="reports/summary.html")
    args = parser.parse_args()
    setup_logging()
    params = load_params(args.params)
    root = repo_root()
    out = write_report(params, root, root / Path(args.out))
    inputs = ReportInputs.from_params(params, root)
    log_report_to_parent_run(out, inputs.study, inputs.sweep_table, root)


if __name__ == "__main__":
    main()
