"""`kronfac bench --quick` end to end, plus the data loaders and report pieces it stands on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kronfac.bench.data import load_digits, load_mnist1d, load_stdlib_text
from kronfac.bench.runner import state_bytes
from kronfac.cli import build_parser, main


def test_bench_quick_runs_end_to_end_and_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"mlp-digits", "mlp-mnist1d", "cnn-digits", "charlm"}
    for task in results["tasks"].values():
        assert set(task["methods"]) == {"sgd", "adamw", "kfac"}
        for record in task["methods"].values():
            assert record["lr"] in record["lr_grid"]
            assert len(record["sweep"]) == len(record["lr_grid"]) * len(record["grid"])
            summary = record["summary"]
            assert 0.0 <= summary["accuracy_mean"] <= 1.0
            assert summary["median_ms"] > 0 and summary["state_bytes"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| kfac |" in md and "vs AdamW" in md
    for name in results["tasks"]:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "kronfac bench results" in capsys.readouterr().out


def test_bench_help_and_bad_method(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown method"):
        main(["bench", "--quick", "--methods", "nope"])


def test_bundled_datasets_load_offline() -> None:
    digits = load_digits()
    assert digits.x_train.shape[1] == 64 and len(digits.x_test) == 359
    assert float(digits.x_train.max()) <= 1.0
    mnist = load_mnist1d()
    assert mnist.x_train.shape[1] == 40 and len(mnist.x_test) == 1000
    text, vocab = load_stdlib_text(num_chars=20_000, seq_len=32)
    assert text.x_train.shape[1] == 32 and int(text.y_train.max()) < len(vocab)
    torch.testing.assert_close(text.x_train[:, 1:], text.y_train[:, :-1])


def test_state_bytes_counts_shared_storage_once() -> None:
    t = torch.zeros(10)
    assert state_bytes([{"a": t, "b": [t, torch.zeros(5, dtype=torch.float64)]}]) == 40 + 40


def test_state_bytes_count_kronfac_curvature() -> None:
    """The optimizer-state column counts K-FAC's factors and inverses (they ride in the state_dict as a blob)."""
    import torch
    from torch import nn

    import kronfac
    from kronfac.bench.methods import OptimizerTrainer
    from kronfac.bench.runner import state_bytes

    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    opt = kronfac.KFAC(model, momentum=0.0, inverse_every=1)
    nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    trainer = OptimizerTrainer(model, opt, None)  # type: ignore[arg-type]  # the task is not needed here
    factors = sum(4 * (d_in**2 + d_out**2) for d_in, d_out in ((11, 20), (21, 3)))  # A and G in float32
    assert state_bytes(trainer.state_objects()) >= 2 * factors  # factors plus their eigendecompositions
