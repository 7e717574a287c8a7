"""The GPU acceptance run's python parts (benchmarks/gpu_acceptance.py) in their dry-run sizes on
the CPU: the fastest subset runs for real and the table must list every figure with a number.
No timing assertions: speed is measured by benchmarks/, not by tests."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_acceptance():
    if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts beside src/, not an installed package
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.gpu_acceptance")


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| (")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


@pytest.mark.slow
def test_dry_run_parts_fill_the_table_with_numbers(tmp_path, capsys):
    acceptance = load_acceptance()
    results, work = tmp_path / "results.jsonl", tmp_path / "work"
    common = ["--results", str(results), "--device", "cpu", "--dry-run"]
    assert acceptance.main(["data", "--workdir", str(work), "--dry-run"]) == 0
    assert acceptance.main(["step-parity", *common]) == 0
    assert acceptance.main(["generation", "--workdir", str(work), *common]) == 0
    assert acceptance.main(["quality", "--workdir", str(work), "--budget-s", "3", *common]) == 0

    rows = acceptance.read_results(results)
    parts = [row["part"] for row in rows]
    # (i) one parity row; (iii) per network: generate_images and synthesis alone; (v) kimg, s/kimg,
    # KID and its floor, pixel KID and its floor
    assert parts == ["i"] + ["iii"] * 4 + ["v"] * 6, parts
    for row in rows:
        assert row["status"] == "ok", row
        assert isinstance(row["value"], float) and math.isfinite(row["value"]), row
    by_what = {row["what"].split(",")[0]: row["value"] for row in rows}
    assert by_what["generate_images"] > 0 and by_what["synthesis alone (G_ema on cpu"] > 0
    assert rows[5]["value"] > 0, "no training step ran in the GAN budget"

    capsys.readouterr()
    assert acceptance.main(["table", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| part | what was measured | value | unit | status |"
    cells = table_rows(table)
    assert len(cells) == len(rows)
    for row_cells, row in zip(cells, rows):
        assert len(row_cells) == 5, row_cells
        assert row_cells[0] == f"({row['part']})" and row_cells[4] == "ok"
        assert math.isclose(float(row_cells[2]), row["value"], rel_tol=1e-3), (row_cells, row)
    # the images really were written by generate_images, as many as the dry run asks for
    written = sorted((work / "generation-tiny-32" / "images").rglob("*.png"))
    assert len(written) == 2 * acceptance.DRY.generate_per_class


def test_a_failed_or_skipped_part_is_a_table_row_and_fails_the_table(tmp_path, capsys):
    acceptance = load_acceptance()
    results = tmp_path / "results.jsonl"
    acceptance.record(results, "iii", "generate_images, fresh cpu64 64 px", 412.5, "images/s")
    assert acceptance.main(["table", "--results", str(results)]) == 0
    assert acceptance.main(["mark", "--results", str(results), "--part", "i", "--what", "fused CUDA bias_act build and parity",
                            "--status", "skipped", "--note", "dry run: needs CUDA"]) == 0
    assert acceptance.main(["table", "--results", str(results)]) == 0, "a skipped part is not a failure"
    assert acceptance.main(["mark", "--results", str(results), "--part", "iv", "--what", "classifier sweep items",
                            "--note", "stopped at its budget of 50 s"]) == 0  # FAILED is mark's default
    capsys.readouterr()
    assert acceptance.main(["table", "--results", str(results)]) == 1
    cells = table_rows(capsys.readouterr().out)
    assert [c[0] for c in cells] == ["(iii)", "(i)", "(iv)"]
    assert cells[0][2:] == ["412.5", "images/s", "ok"]
    assert cells[1][2] == "–" and cells[1][4] == "skipped"
    assert cells[2][4] == "FAILED" and "stopped at its budget" in cells[2][1]
    assert acceptance.main(["table", "--results", str(tmp_path / "none.jsonl")]) == 1, "an empty run is not a pass"


def test_script_runs_every_part_under_a_timeout_and_states_its_budget():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    acceptance = load_acceptance()
    for command in ("data", "op-parity", "op-tests", "step-parity", "throughput", "generation", "sweep", "quality", "table"):
        assert command in acceptance.COMMANDS
        assert f'"${{ACC[@]}}" {command} ' in script, command
    budgets = [int(b) for b in re.findall(r"^\s*part \S+ (\d+) ", script, re.MULTILINE)]
    gan = re.search(r"^part v \$\(\(\$\{GAN_BUDGET%\.\*\} / SCALE \+ (\d+)\)\)", script, re.MULTILINE)
    assert gan, "part (v) is not bounded by its training budget"
    # the worst case of a real run: data + (i) CUDA + (ii) ... (iv) + (v) at the default 180 s
    dry_only = 40  # op-tests appears twice (dry and CUDA branch) with the same budget
    assert sum(budgets) - dry_only + 180 + int(gan.group(1)) <= 600, budgets
    assert "Time budget" in script
