"""`kronfac bench` end to end (tiny budgets), its argument checks, its partial results, plus the data loaders and
report pieces it stands on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kronfac.bench import bench as bench_cli
from kronfac.bench.data import load_digits, load_mnist1d, load_stdlib_text
from kronfac.bench.methods import METHODS
from kronfac.bench.protocol import SUITES
from kronfac.bench.runner import resolve_device, state_bytes
from kronfac.bench.tasks import TASKS
from kronfac.cli import build_parser, main


def test_bench_quick_runs_end_to_end_and_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "--quick", "--steps-scale", "0.3", "--tasks", "cnn-digits", "charlm", "--trials", "2"]
    assert main([*args, "--methods", "adamw", "kfac", "muon", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"cnn-digits", "charlm"}
    assert results["tasks"]["charlm"]["metric"] == "loss"
    for task in results["tasks"].values():
        assert set(task["methods"]) == {"adamw", "kfac", "muon"}
        for name, record in task["methods"].items():
            assert len(record["trials"]) == 2
            recommended = METHODS[name].trials(1)[0]
            assert {k: record["trials"][0][k] for k in recommended} == recommended  # the recommended setting first
            assert [r["seed"] for r in record["runs"]] == [1]  # never the seed trials were selected on
            summary = record["summary"]
            assert 0.0 <= summary["accuracy_mean"] <= 1.0
            assert summary["median_ms"] > 0 and summary["mean_ms"] > 0 and summary["state_bytes"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| kfac |" in md and "vs AdamW" in md and "test loss" in md
    for name in results["tasks"]:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "performance_profile.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "steps→target" in out and "charlm: best test loss" in out  # the table in the terminal


def test_bench_help_and_list(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in [*TASKS, *METHODS, *SUITES]:
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in lines), name


def test_every_kronfac_method_is_listed() -> None:
    kfac_variants = {"kfac", "kfac-thermo", "kfac-kldwrm-so", "kfac-kldwrm-q", "kfac-kldwrm-qe", "cgfac"}
    others = {"adafisher", "adafisherw", "singd", "singd-diagonal", "singd-block", "singd-tril", "ikfac"}
    kronfac_methods = kfac_variants | others
    assert kronfac_methods <= {name for name, m in METHODS.items() if m.family == "kronfac"}
    assert {"muon", "soap", "shampoo", "psgd-kron", "singd-ikfac", "asdl-kfac", "kfac-pytorch"} <= set(METHODS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--steps-scale", "0"], "--steps-scale must be a positive number"),
        (["--steps-scale", "nan"], "--steps-scale must be a positive number"),
        (["--tasks", "nope"], "unknown task(s) nope"),
        (["--methods", "adamw", "nope"], "unknown method(s) nope"),
        (["--suite", "huge"], "unknown suite 'huge'"),
        (["--device", "tpu"], "Invalid device"),
    ],
)
def test_bad_arguments_fail_before_training_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    monkeypatch.setattr(bench_cli, "run_protocol", lambda *a, **k: pytest.fail("trained before checking"))
    assert main(["bench", "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_out_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and len(err.strip().splitlines()) == 1


def test_cuda_without_a_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_results_are_written_after_each_task_and_an_interruption_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = bench_cli.run_protocol

    def interrupt_on_second_task(task, *args, **kwargs):  # type: ignore[no-untyped-def]
        if task.name == "charlm":
            raise KeyboardInterrupt
        return real(task, *args, **kwargs)

    monkeypatch.setattr(bench_cli, "run_protocol", interrupt_on_second_task)
    argv = ["bench", "--quick", "--steps-scale", "0.2", "--tasks", "cnn-digits", "charlm", "--methods", "adamw"]
    assert main([*argv, "--out", str(tmp_path)]) == 130
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["tasks"]) == ["cnn-digits"] and results["meta"]["interrupted"]
    assert "## cnn-digits" in (tmp_path / "results.md").read_text()
    assert "interrupted" in capsys.readouterr().err


def test_progress_total_weighs_each_task_by_its_cost() -> None:
    protocol = SUITES["default"].protocol
    steps_of, weight, total = bench_cli.work(["mlp-mnist1d", "charlm"], ["adamw", "kfac"], protocol, 1.0)
    assert weight["charlm", "adamw"] > 10 * weight["mlp-mnist1d", "adamw"]
    assert weight["mlp-mnist1d", "kfac"] > weight["mlp-mnist1d", "adamw"]
    expected = sum(
        weight[t, m] * (protocol.trials * steps_of[t][1] + protocol.seeds * steps_of[t][0])
        for t in steps_of
        for m in ("adamw", "kfac")
    )
    assert total == expected and all(isinstance(w, int) for w in weight.values())


def test_suites_name_known_tasks_and_methods() -> None:
    for suite in SUITES.values():
        assert set(suite.tasks) <= set(TASKS) and set(suite.methods) <= set(METHODS)
    assert SUITES["full"].protocol.trials >= 8 and SUITES["full"].protocol.seeds >= 3
    assert set(SUITES["full"].tasks) == set(TASKS)


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
    from torch import nn

    import kronfac
    from kronfac.bench.methods import OptimizerTrainer

    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    opt = kronfac.KFAC(model, momentum=0.0, inverse_every=1)
    nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    trainer = OptimizerTrainer(model, opt, None)  # type: ignore[arg-type]  # the task is not needed here
    factors = sum(4 * (d_in**2 + d_out**2) for d_in, d_out in ((11, 20), (21, 3)))  # A and G in float32
    assert state_bytes(trainer.state_objects()) >= 2 * factors  # factors plus their eigendecompositions
