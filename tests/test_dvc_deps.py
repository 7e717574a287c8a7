"""dvc.yaml's `deps` cover the code each stage runs, so `dvc repro` never skips a stage whose code
changed; and each stage's code is one module, src/ctsynth/stages/<stage>.py, that its script runs.

For every stage, a fresh interpreter imports the stage's script (the `pipelines/*.py` file its `cmd`
runs, without running `main`), then follows every `import` of a repository module written anywhere
in a loaded repository module — inside functions too, since several stages import their heavier
helpers lazily — and imports those, until nothing new appears. Every repository file in
`sys.modules` after that, plus the non-Python sources a loaded module names (the fused op's C++ and
CUDA files), must be covered by one of the stage's `deps` (a listed folder covers everything under
it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The repository's own import roots: package name -> folder on disk.
PACKAGE_ROOTS = {"ctsynth": "src/ctsynth", "serving": "serving"}

# Runs in the child interpreter: argv = repo, script (relative), JSON of PACKAGE_ROOTS.
_COLLECT = r"""
import ast, importlib, importlib.util, json, sys
from pathlib import Path

repo, script, roots = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
sys.path[:0] = [str(repo / "src"), str(repo)]
packages = {name: (repo / folder).resolve() for name, folder in roots.items()}


def is_ours(name):
    return name.split(".")[0] in packages


def imported_names(path, package):
    tree = ast.parse(path.read_text(), str(path))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                guarded.update(id(n) for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module
            # `from pkg import sub` may name a submodule
            yield from (f"{module}.{alias.name}" for alias in node.names)


def find(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ours_loaded():
    found = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and is_ours(name):
            found[name] = Path(file).resolve()
    return found


spec = importlib.util.spec_from_file_location("_dvc_stage_script", repo / script)
stage_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_script)

scanned = set()
pending = [(repo / script, "")]
while pending:
    path, package = pending.pop()
    for name in imported_names(path, package):
        if name and is_ours(name) and name not in sys.modules and find(name):
            importlib.import_module(name)
    for name, file in ours_loaded().items():
        if file not in scanned:
            scanned.add(file)
            is_package = file.name == "__init__.py"
            pending.append((file, name if is_package else name.rpartition(".")[0]))

print(json.dumps(sorted(str(file) for file in scanned)))
"""


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_script(stage: dict) -> str:
    """The `pipelines/*.py` script a stage's cmd runs (matrix stages: the same script per item)."""
    scripts = re.findall(r"(pipelines/\S+\.py)", stage["cmd"])
    assert len(scripts) == 1, f"expected one pipelines/*.py script in cmd {stage['cmd']!r}"
    return scripts[0]


def dep_paths(stage: dict) -> list[str]:
    return [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]


def code_files(script: str) -> set[str]:
    """Repository files (relative paths) the script's stage runs: its imports and what they name."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    done = subprocess.run(
        [sys.executable, "-c", _COLLECT, str(REPO), script, json.dumps(PACKAGE_ROOTS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"importing {script} failed:\n{done.stderr[-4000:]}"
    files = {Path(line).relative_to(REPO).as_posix() for line in json.loads(done.stdout.splitlines()[-1])}
    return files | {script} | named_sources(files)


def named_sources(modules: set[str]) -> set[str]:
    """Non-Python files next to a loaded module whose names the module's source mentions (e.g. the
    C++/CUDA sources that gan/ops/fused.py compiles): they are code the stage runs too."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = set()
    for module in modules:
        folder, text = Path(module).parent.as_posix(), (REPO / module).read_text()
        for other in tracked:
            other_path = Path(other)
            if other_path.parent.as_posix() == folder and other_path.suffix != ".py" and other_path.name in text:
                found.add(other)
    return found


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep.rstrip("/") or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_cover_the_code_it_runs(name):
    stage = stages()[name]
    deps = dep_paths(stage)
    missing = sorted(file for file in code_files(stage_script(stage)) if not covered(file, deps))
    assert not missing, f"dvc.yaml stage {name!r}: deps miss code the stage runs: {missing}"


@pytest.mark.parametrize("name", list(stages()))
def test_stage_code_deps_exist(name):
    """A code dep that names a moved or deleted file silently stops guarding anything."""
    code_roots = ("pipelines/", *(folder + "/" for folder in PACKAGE_ROOTS.values()))
    stale = [dep for dep in dep_paths(stages()[name]) if dep.startswith(code_roots) and not (REPO / dep).exists()]
    assert not stale, f"dvc.yaml stage {name!r}: deps name code that does not exist: {stale}"


def stage_module(stage: dict) -> str:
    """The ctsynth.stages module a stage's script runs: its one `from ctsynth.stages import <module>`."""
    tree = ast.parse((REPO / stage_script(stage)).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "ctsynth.stages"
             for alias in node.names]
    assert len(names) == 1, f"{stage_script(stage)} imports {names} from ctsynth.stages; a stage script runs one stage module"
    return f"src/ctsynth/stages/{names[0]}.py"


@pytest.mark.parametrize("name", list(stages()))
def test_each_stage_script_runs_its_stage_module_and_nothing_else(name):
    stage = stages()[name]
    module = stage_module(stage)
    tree = ast.parse((REPO / module).read_text())
    run = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run"), None)
    assert run is not None and [a.arg for a in run.args.args[:2]] == ["params", "root"], f"{module} has no run(params, root)"
    assert covered(module, dep_paths(stage)), f"dvc.yaml stage {name!r} does not list {module} in its deps"
    script = ast.parse((REPO / stage_script(stage)).read_text())
    imported = {alias.name if isinstance(node, ast.Import) else node.module
                for node in ast.walk(script) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported <= {"sys", "ctsynth", "ctsynth.stages"}, f"{stage_script(stage)} does more than run its stage module: {imported}"


def test_every_stage_module_is_a_stage_of_dvc_yaml():
    used = {stage_module(stage) for stage in stages().values()}
    present = {path.relative_to(REPO).as_posix() for path in (REPO / "src/ctsynth/stages").glob("*.py") if path.name != "__init__.py"}
    assert present == used, f"stage modules without a dvc.yaml stage: {sorted(present - used)}; stages without one: {sorted(used - present)}"


def test_coverage_rule():
    assert covered("src/ctsynth/gan/ops/fused.py", ["src/ctsynth/gan"])
    assert covered("src/ctsynth/gan/ops/fused.py", ["src/ctsynth/gan/"])
    assert not covered("src/ctsynth/gan_extra.py", ["src/ctsynth/gan"])
    assert not covered("src/ctsynth/data/mixing.py", ["src/ctsynth/data/preprocess.py"])
