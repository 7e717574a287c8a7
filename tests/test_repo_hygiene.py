"""The repository stands on its own: no tracked text file points at files outside it, at a path of
the machine it was written on, or at a ticket number.

A reader with only a clone cannot open a design note that lives next to the repository, a folder
under someone's home or a temporary directory, or a ticket in a tracker they cannot see; the text
has to say what it means instead. The patterns are assembled from pieces so that this file does not
match itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SIBLING_FOLDER = "../" + "shared"
OUTSIDE_NOTES = ["DESIGN" + ".md", "STYLEGAN2_ADA" + ".md"]
MACHINE_ROOTS = ["work", "home", "root", "tmp"]

# name -> pattern; each match is reported as file:line: name: the line
FORBIDDEN = {
    "a folder beside the repository": re.compile(re.escape(SIBLING_FOLDER)),
    "a note that is not in the repository": re.compile("|".join(re.escape(name) for name in OUTSIDE_NOTES)),
    # An absolute path starts a token: not `.../data/tmp/x`, `~/tmp/`, `$HOME/...` or a URL's path.
    "an absolute machine path": re.compile(r"(?<![\w.~$/:-])/(?:" + "|".join(MACHINE_ROOTS) + r")/"),
    "a ticket number": re.compile(r"\bissues?\s+#?\d+\b|\(#\d+\)", re.IGNORECASE),
}


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary files (images, model weights) and deleted ones."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def violations(path: Path, text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for name, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {name}: {line.strip()[:160]}")
    return found


def test_no_tracked_file_refers_outside_the_repository():
    found = [hit for path in tracked_files() if (text := text_of(path)) is not None for hit in violations(path, text)]
    assert not found, "references a reader of the repository cannot follow:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "see " + SIBLING_FOLDER + "/notes.txt",
        "the contract (" + OUTSIDE_NOTES[0] + ")",
        "written from ``" + OUTSIDE_NOTES[1] + "``",
        "--out /" + "tmp/conv/cpu64",
        "cd /" + "work/main && make",
        "`/" + "home/someone/data`",
        "the speed goals of issue " + "6",
        "Issue #" + "12 asked for it",
        "fixed the resolver (#" + "13)",
    ],
)
def test_patterns_catch(line):
    assert violations(REPO / "x.md", line), line


@pytest.mark.parametrize(
    "line",
    [
        "def test_x(tmp_path): ...",
        "reports/tmp/summary.html",
        "~/tmp/cache and $HOME/work/x",
        "https://example.org/home/page",
        "/usr/bin/chromium",
        "an issue with 2 workers; a tissue 5 mm thick",
        "colour #1f77b4 and step #3",
    ],
)
def test_patterns_spare(line):
    assert not violations(REPO / "x.md", line), line
