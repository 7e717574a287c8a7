"""Dependencies by platform and above known security fixes, read from pyproject.toml and the bentofiles.

Which platforms each runtime has wheels for was read from PyPI with pip at development time (pip
install --dry-run --only-binary=:all: --platform P --python-version 3.11 NAME, 2026-11-30) and is
encoded below; the test itself uses no network: it evaluates the environment markers.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

PLATFORMS = {
    "linux_x86_64": {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"},
    "linux_aarch64": {"platform_system": "Linux", "platform_machine": "aarch64", "sys_platform": "linux"},
    "macos_arm64": {"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"},
}
# Binary wheels for CPython 3.11 on PyPI, per platform (pip, at development time; see above).
WHEELS = {
    "onnxruntime-gpu": {"linux_x86_64"},
    "onnxruntime": {"linux_x86_64", "linux_aarch64", "macos_arm64"},
    "python-gdcm": {"linux_x86_64", "linux_aarch64", "macos_arm64"},
}
RUNTIMES = ("onnxruntime", "onnxruntime-gpu")
# Versions with a known vulnerability that the floors must exclude.
VULNERABLE = {
    "bentoml": ["1.4.2", "1.4.7", "1.4.18"],  # CVE-2025-27520, CVE-2025-32375, CVE-2025-54381
    "python-multipart": ["0.0.9", "0.0.17", "0.0.21"],  # CVE-2024-53981, CVE-2026-24486
    "starlette": ["0.40.0", "0.47.1", "0.49.0"],  # CVE-2025-54121, CVE-2025-62727
    "pillow": ["11.2.1"],  # CVE-2025-48379
}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _selected(platform: str) -> dict[str, Requirement]:
    environment = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.9", **PLATFORMS[platform]}
    return {r.name: r for r in _requirements() if r.marker is None or r.marker.evaluate(environment)}


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_each_platform_gets_exactly_one_installable_onnx_runtime(platform):
    selected = _selected(platform)
    runtimes = [name for name in RUNTIMES if name in selected]
    assert len(runtimes) == 1, f"{platform}: {runtimes}"
    assert platform in WHEELS[runtimes[0]], f"{platform} would install {runtimes[0]}, which has no wheel there"
    assert platform in WHEELS["python-gdcm"] and "python-gdcm" in selected


def test_the_gpu_runtime_is_chosen_where_it_exists():
    assert "onnxruntime-gpu" in _selected("linux_x86_64")
    assert "onnxruntime" in _selected("macos_arm64") and "onnxruntime" in _selected("linux_aarch64")


@pytest.mark.parametrize("package", sorted(VULNERABLE))
def test_floors_exclude_versions_with_known_vulnerabilities(package):
    requirement = {r.name: r for r in _requirements()}[package]
    for version in VULNERABLE[package]:
        assert version not in requirement.specifier, f"{package} {requirement.specifier} admits vulnerable {version}"


def _bento_packages(name: str) -> list[str]:
    return yaml.safe_load((REPO / "serving" / name).read_text())["python"]["packages"]


def test_the_bentofiles_differ_only_in_the_runtime():
    cpu, gpu = _bento_packages("bentofile.yaml"), _bento_packages("bentofile-gpu.yaml")
    cpu_names, gpu_names = {Requirement(p).name for p in cpu}, {Requirement(p).name for p in gpu}
    assert cpu_names - gpu_names == {"onnxruntime"} and gpu_names - cpu_names == {"onnxruntime-gpu"}
    assert [p for p in cpu if not p.startswith("onnxruntime")] == [p for p in gpu if not p.startswith("onnxruntime")]
    # the bento carries the same security floors as the project
    floors = {r.name: r.specifier for r in _requirements()}
    for package in cpu:
        requirement = Requirement(package)
        for version in VULNERABLE.get(requirement.name, []):
            assert version not in requirement.specifier, f"bentofile: {package} admits {version}"
        if requirement.name in floors and requirement.name in VULNERABLE:
            assert str(requirement.specifier) == str(floors[requirement.name]), requirement.name


def test_the_audit_allow_list_gives_a_reason_for_each_entry():
    lines = [line.strip() for line in (REPO / ".ci" / "pip-audit-allow.txt").read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    for entry in entries:
        vuln_id, _, reason = entry.partition(" ")
        assert vuln_id and reason.strip().startswith("#") and len(reason.strip()) > 10, f"no reason given: {entry!r}"


def test_serving_uses_only_the_registry_and_the_preprocessing_of_ctsynth():
    import ast

    allowed = {"ctsynth", "ctsynth.registry", "ctsynth.data.preprocess"}
    for path in sorted((REPO / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.split(".")[0] == "ctsynth":
                    assert name in allowed, f"{path.name} imports {name}"


def _audit_module():
    """.ci/audit_installed.py, the offline check CI runs against .ci/known-advisories.toml."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("audit_installed", REPO / ".ci" / "audit_installed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_offline_audit_finds_an_installed_vulnerable_version_and_respects_the_allow_list():
    audit = _audit_module()
    advisories = audit.load_advisories(REPO / ".ci" / "known-advisories.toml")
    installed = {"bentoml": "1.4.2", "starlette": "1.10.0", "ray": "2.60.0", "torch": "2.6.0rc1"}
    findings = {f.advisory.id: f for f in audit.audit(advisories, installed, allowed={"CVE-2023-48022": "why"})}
    assert {"CVE-2025-27520", "CVE-2025-32375", "CVE-2025-54381"} <= findings.keys()  # bentoml 1.4.2
    assert not any(f.advisory.package == "starlette" for f in findings.values())  # above every fix
    assert findings["CVE-2023-48022"].accepted and not findings["CVE-2025-27520"].accepted
    assert "CVE-2025-32434" not in findings  # a pre-release of the fixed torch is compared as a version


def test_the_offline_audit_passes_the_installed_set_and_refuses_unexplained_acceptance(tmp_path):
    audit = _audit_module()
    assert audit.main([]) == 0, "an installed package has a known vulnerability: raise its floor"
    allow = tmp_path / "allow.txt"
    allow.write_text("CVE-2025-27520\n")
    assert audit.main(["--allow", str(allow)]) == 2  # accepted without a reason


def test_the_floors_exclude_every_affected_range_the_advisories_list():
    audit = _audit_module()
    requirements = {r.name: r for r in _requirements()}
    for advisory in audit.load_advisories(REPO / ".ci" / "known-advisories.toml"):
        requirement = requirements.get(advisory.package)
        if requirement is None or not str(advisory.affected):
            continue
        # the highest affected version below the fix (the "<" bound) must not satisfy the floor
        fixed = next(s.version for s in advisory.affected if s.operator == "<")
        last_affected = f"{fixed}.dev0"
        assert not requirement.specifier.contains(last_affected, prereleases=True), (advisory.id, str(requirement.specifier))
