"""The tuning protocol's pieces: quasi-random trials, the schedule, every method's trainer, the Muon split, and
the report's noise and profile."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kronfac.bench.data import load_digits
from kronfac.bench.methods import METHODS
from kronfac.bench.models import LinearLSTM, cnn1d
from kronfac.bench.peers import muon_parameters
from kronfac.bench.protocol import Protocol, run_protocol
from kronfac.bench.report import comparison, noise_sentence, performance_profile
from kronfac.bench.runner import run_one, schedule
from kronfac.bench.space import Range, trials
from kronfac.bench.tasks import Task


def test_trials_start_at_the_recommended_setting_and_stay_in_their_ranges() -> None:
    space = {"lr": Range(1e-4, 1e-1), "warmup": Range(0.0, 0.1, log=False)}
    points = trials(space, {"lr": 1e-3, "warmup": 0.05, "momentum": 0.9}, 8)
    assert points[0] == {"lr": 1e-3, "warmup": 0.05, "momentum": 0.9}
    assert len({(p["lr"], p["warmup"]) for p in points}) == 8
    for p in points[1:]:
        assert 1e-4 <= p["lr"] <= 1e-1 and 0.0 <= p["warmup"] <= 0.1 and p["momentum"] == 0.9
    assert trials(space, {"lr": 1e-3, "warmup": 0.05}, 8) == trials(space, {"lr": 1e-3, "warmup": 0.05}, 8)
    with pytest.raises(ValueError, match="trials"):
        trials(space, {}, 0)
    with pytest.raises(ValueError, match="range"):
        Range(0.0, 1.0)


def test_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    factor = schedule(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0)
    assert schedule(10, 0.0)(0) == 1.0


def _tiny_task(metric: str = "accuracy") -> Task:
    return Task(
        name="tiny", description="MLP 64-16-10 on digits", load=load_digits,
        build=lambda split: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), steps=6, quick_steps=3,
        batch_size=32, target=0.2 if metric == "accuracy" else 2.5, eval_every=2, metric=metric,
    )  # fmt: skip


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.available()])
def test_every_method_trains_with_its_recommended_setting_and_a_trial(name: str) -> None:
    method, task = METHODS[name], _tiny_task()
    for setting in method.trials(2):
        extra = {k: v for k, v in setting.items() if k != "lr"}
        result = run_one(task, method, setting["lr"], 0, 4, extra=extra, track_val=True)
        assert len(result.step_ms) == 4 and result.error is None, result.error
        assert "val_accuracy" in result.curve[-1] and result.state_bytes > 0


def test_protocol_selects_by_validation_and_reruns_fresh_seeds() -> None:
    task = _tiny_task("loss")
    record = run_protocol(task, METHODS["adamw"], Protocol(trials=3, seeds=2), steps=6, trial_steps=3)
    scores = [t["val_loss"] for t in record["trials"]]
    best = record["trials"][scores.index(min(scores))]
    assert record["lr"] == best["lr"] and record["hyperparameters"]["warmup"] == best["warmup"]
    assert [r["seed"] for r in record["runs"]] == [1, 2]
    summary = record["summary"]
    assert summary["metric"] == "loss" and summary["seeds"] == 2
    assert summary["metric_mean"] == pytest.approx(summary["loss_mean"])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    lstm = LinearLSTM(hidden=8)
    matrices, rest = muon_parameters(lstm)
    assert {id(p) for p in matrices} == {id(lstm.ih.weight), id(lstm.hh.weight)}
    assert {id(p) for p in rest} == {id(lstm.ih.bias), id(lstm.head.weight), id(lstm.head.bias)}
    matrices, rest = muon_parameters(cnn1d())
    assert matrices == [] and len(rest) == 8  # conv filters are 4-D, the only matrix is the head


def _record(mean: float, std: float, seeds: int = 3, family: str = "kronfac", steps: float | None = None) -> dict:
    summary = {"metric": "accuracy", "metric_mean": mean, "metric_std": std, "seeds": seeds,
               "steps_to_target": steps, "seconds_to_target": None if steps is None else steps / 100}  # fmt: skip
    return {"family": family, "summary": summary}


def test_noise_sentence_separates_ties_from_real_differences() -> None:
    task = {"metric": "accuracy", "methods": {
        "a": _record(0.90, 0.01), "b": _record(0.895, 0.01), "c": _record(0.80, 0.01)}}  # fmt: skip
    sentence = noise_sentence("t", task)
    assert "best test accuracy a" in sentence and "within the seed noise of it: b" in sentence
    assert "more than the noise (> 2 standard errors): c" in sentence
    one_seed = {"metric": "accuracy", "methods": {"a": _record(0.9, 0.0, seeds=1), "b": _record(0.8, 0.0, seeds=1)}}
    assert "no noise estimate" in noise_sentence("t", one_seed)


def test_comparison_and_performance_profile(tmp_path: Path) -> None:
    task = {"metric": "accuracy", "description": "", "methods": {
        "kfac": _record(0.9, 0.01, steps=100), "adamw": _record(0.9, 0.01, family="baseline", steps=200),
        "soap": _record(0.9, 0.01, family="peer", steps=None)}}  # fmt: skip
    steps = comparison(task)["steps"]
    assert steps[0] == ("kfac", 100.0) and steps[1] == ("adamw", 200.0) and steps[2] == pytest.approx(0.5)
    path = performance_profile({"tasks": {"t1": task, "t2": task}}, tmp_path)
    assert path is not None and path.stat().st_size > 1000
    assert math.isfinite(steps[2])


def test_runs_on_the_device_asked_for() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_one(_tiny_task(), METHODS["kfac"], 0.1, 0, 2, device=device)
    assert len(result.step_ms) == 2 and result.error is None
