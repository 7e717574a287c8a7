"""Check the installed packages against .ci/known-advisories.toml, offline.

Every advisory whose package is installed at an affected version fails the check, unless its id is
in .ci/pip-audit-allow.txt (one id a line, with its reason) — the allow-list pip-audit uses too.
Exit 0: nothing unaccepted found; 1: a known vulnerability is installed; 2: a malformed file.

    python .ci/audit_installed.py                   # the environment running it
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Advisory:
    id: str
    package: str
    affected: SpecifierSet  # empty: every version
    what: str


@dataclass(frozen=True)
class Finding:
    advisory: Advisory
    installed: str
    accepted: bool


def load_advisories(path: Path) -> list[Advisory]:
    advisories = []
    for number, entry in enumerate(tomllib.loads(path.read_text())["advisory"], start=1):
        missing = {"id", "package", "affected", "what"} - entry.keys()
        if missing:
            raise ValueError(f"{path.name}: advisory {number} lacks {sorted(missing)}")
        try:
            affected = SpecifierSet(entry["affected"])
        except InvalidSpecifier as error:
            raise ValueError(f"{path.name}: {entry['id']}: affected {entry['affected']!r} is no version specifier") from error
        advisories.append(Advisory(entry["id"], canonicalize_name(entry["package"]), affected, entry["what"]))
    return advisories


def load_allowed(path: Path) -> dict[str, str]:
    """{advisory id: reason}; an accepted advisory without a reason is an error."""
    allowed = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        advisory_id, _, reason = line.partition("#")
        if not reason.strip():
            raise ValueError(f"{path.name}: {advisory_id.strip()} is accepted without a reason")
        allowed[advisory_id.strip()] = reason.strip()
    return allowed


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def audit(advisories: list[Advisory], installed: dict[str, str], allowed: dict[str, str]) -> list[Finding]:
    findings = []
    for advisory in advisories:
        version = installed.get(advisory.package)
        if version is None:
            continue
        try:
            affected = advisory.affected.contains(Version(version), prereleases=True)
        except InvalidVersion:
            affected = True  # a version we cannot compare is not assumed safe
        if affected:
            findings.append(Finding(advisory, version, advisory.id in allowed))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advisories", type=Path, default=HERE / "known-advisories.toml")
    parser.add_argument("--allow", type=Path, default=HERE / "pip-audit-allow.txt")
    args = parser.parse_args(argv)
    try:
        advisories, allowed = load_advisories(args.advisories), load_allowed(args.allow)
    except (ValueError, KeyError, tomllib.TOMLDecodeError) as error:
        print(f"known-advisory check: {error}", file=sys.stderr)
        return 2
    installed = installed_versions()
    findings = audit(advisories, installed, allowed)
    for finding in findings:
        verdict = "accepted" if finding.accepted else "VULNERABLE"
        print(f"{verdict}: {finding.advisory.package} {finding.installed} — {finding.advisory.id} "
              f"({finding.advisory.what}; affected {finding.advisory.affected or 'every version'})")
    checked = sorted({a.package for a in advisories} & installed.keys())
    unaccepted = [f for f in findings if not f.accepted]
    print(f"known-advisory check: {len(advisories)} advisories, {len(checked)} of their packages installed, "
          f"{len(unaccepted)} unaccepted vulnerable, {len(findings) - len(unaccepted)} accepted")
    return 1 if unaccepted else 0


if __name__ == "__main__":
    sys.exit(main())
