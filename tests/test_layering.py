"""The layers of the package point one way: the stages (ctsynth.stages) and the command line
(ctsynth.cli) orchestrate the domain packages, never the reverse.

A domain module that imported a stage, the CLI or the report would run orchestration (paths of the
repository, MLflow runs of a stage) from inside a computation, and the stage's behaviour would
again be spread over several places. Every `import` is read from the source with `ast`, those
inside functions too (several modules import their heavier helpers lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ctsynth"

DOMAIN = ("data", "gan", "metrics", "classifier", "validation")
# The library modules beside the packages that the domain and serving build on.
LIBRARY = ("config.py", "device.py", "export.py", "jsonable.py", "logs.py", "paths.py", "registry.py", "tracking.py")
ORCHESTRATION = ("ctsynth.stages", "ctsynth.cli", "ctsynth.report")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports, relative imports made absolute (`package`: the module's package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from ctsynth import stages`
    return found


def orchestration_imports(path: Path, package: str) -> list[str]:
    return sorted(name for name in imported_modules(path, package)
                  if any(name == layer or name.startswith(layer + ".") for layer in ORCHESTRATION))


def domain_files() -> list[Path]:
    files = [path for folder in DOMAIN for path in sorted((PACKAGE / folder).rglob("*.py"))]
    return files + [PACKAGE / name for name in LIBRARY]


def package_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


@pytest.mark.parametrize("path", domain_files(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_domain_modules_import_no_stage_cli_or_report(path):
    found = orchestration_imports(path, package_of(path))
    assert not found, f"{path.relative_to(PACKAGE)} imports orchestration {found}; move that code into its ctsynth.stages module"


def test_the_rule_sees_every_form_of_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import ctsynth.cli\n"
        "from ctsynth import stages\n"
        "def later():\n    from ctsynth.report import render_report\n"
        "from ..stages.prepare import run\n"
        "from ctsynth.reporting import x\n"  # a different module that merely starts with the name
    )
    assert orchestration_imports(module, "ctsynth.metrics") == [
        "ctsynth.cli", "ctsynth.report", "ctsynth.report.render_report", "ctsynth.stages", "ctsynth.stages.prepare",
        "ctsynth.stages.prepare.run",
    ]


def test_every_stage_module_is_reached_only_from_scripts_and_the_cli():
    """The stage modules are entry points: pipelines/, the CLI and other stage code use them."""
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "stages" or path.name == "cli.py":
            continue
        if any(name.startswith("ctsynth.stages") for name in imported_modules(path, package_of(path))):
            users.append(path.relative_to(PACKAGE).as_posix())
    assert not users, f"library modules importing ctsynth.stages: {users}"
