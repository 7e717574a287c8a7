"""DVC stage `oracle`: python pipelines/oracle.py

Writes the oracle arm's new genuine training images into sweep.oracle (data/oracle): new phantom
slices through the prepare path (embedded data), or a held-out part of the real train split
(sweep.oracle_source: holdout). docs/study.md explains the positive control.
"""

from ctsynth.config import load_params
from ctsynth.data.oracle import build_oracle
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root


def main() -> None:
    setup_logging()
    build_oracle(load_params(), repo_root())


if __name__ == "__main__":
    main()
