"""`kronfac thermo-cost`: the command prints the cost model's tables and writes its JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kronfac.bench.thermo_cost import main
from kronfac.cli import main as kronfac_main


def test_cli_prints_table_and_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workload", "gnn", "--widths", "128,1024", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| 1024 |" in printed and "crossover width" in printed and "time_constant" in printed
    report = json.loads((tmp_path / "thermo_cost.json").read_text())
    assert [row["width"] for row in report["workloads"]["gnn"]["rows"]] == [128.0, 1024.0]
    assert (tmp_path / "thermo_cost.png").stat().st_size > 0


def test_kronfac_thermo_cost_help_lists_the_cost_model_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        kronfac_main(["thermo-cost", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "kronfac thermo-cost" in printed and "--time-constant" in printed and "--condition-number" in printed


def test_bad_widths_are_rejected_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        kronfac_main(["thermo-cost", "--widths", "128,x"])
    assert exit_info.value.code == 2
    assert "widths must be comma-separated integers" in capsys.readouterr().err
