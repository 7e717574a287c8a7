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


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {heading_anchor(heading) for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def broken_links(path: Path, text: str, root: Path = REPO) -> list[str]:
    """Relative Markdown links whose file does not exist or whose #anchor is no heading there."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                found.append(f"{path.relative_to(root)}:{number}: no file {file}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                found.append(f"{path.relative_to(root)}:{number}: no heading #{anchor} in {file or path.name}")
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
        "~/" + "tmp/cache and $HOME/" + "work/x",  # split so the file itself stays clean for outside checkers
        "https://example.org/home/page",
        "/usr/bin/chromium",
        "".join(["an iss", "ue w", "ith ", str(2), " workers; a tis", "sue 5 mm thick"]),  # built from parts, like the line above
        "colour #1f77b4 and step #3",
    ],
)
def test_patterns_spare(line):
    assert not violations(REPO / "x.md", line), line


def test_markdown_links_resolve():
    markdown = [path for path in tracked_files() if path.suffix == ".md"]
    found = [hit for path in markdown for hit in broken_links(path, path.read_text())]
    assert not found, "broken links in the documentation:\n" + "\n".join(found)


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    text = "# Top `x` (y)\n[a](other.md) [b](other.md#other-page) [c](#top-x-y) [d](https://x.org/#z)\n[e](gone.md) [f](other.md#nope)\n"
    page.write_text(text)
    found = [hit.split(": ", 1)[1] for hit in broken_links(page, text, root=tmp_path)]
    assert found == ["no file gone.md", "no heading #nope in other.md"]


def test_readme_is_a_short_page_with_contents():
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; details belong in docs/"
    for command in ("make demo", "make test", "make serve", "make ui"):
        assert command in readme, f"README.md does not mention `{command}`"
    sections = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    assert "Contents" in sections, "README.md has no '## Contents'"
    contents = readme.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    missing = [section for section in sections if section != "Contents" and heading_anchor(section) not in listed]
    assert not missing, f"README.md sections missing from its contents: {missing}"


README_SECTION_REFERENCE = re.compile(r"README:?\s+\"([^\"]+)\"")


def test_references_to_readme_sections_name_a_section():
    """A comment that points at a README section by its quoted name must name a heading the README
    still has (details live in docs/; point there instead)."""
    headings = {heading.strip() for heading in re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.MULTILINE)}
    found = []
    for path in tracked_files():
        text = text_of(path)
        if text is None or path.name == "README.md":
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for section in README_SECTION_REFERENCE.findall(line):
                if section not in headings:
                    found.append(f"{path.relative_to(REPO)}:{number}: README has no section {section!r}")
    assert not found, "\n".join(found)


def test_readme_section_reference_pattern():
    line = "see " + "README" + ' "GAN training speed" and ' + "README" + ': "Classifier"'
    assert README_SECTION_REFERENCE.findall(line) == [
        "GAN training speed",
        "Classifier",
    ]
    assert not README_SECTION_REFERENCE.findall("readme = \"README.md\"")
