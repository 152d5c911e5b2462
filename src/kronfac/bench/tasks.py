"""Benchmark tasks: a model, its bundled data, its loss, the metric it is scored by (validation accuracy or
validation loss) with a target, and the training budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.data import Split, load_digits, load_mnist1d, load_stdlib_text
from kronfac.bench.models import CharTransformer, LinearLSTM, cnn1d, mlp, small_cnn

__all__ = ["METRICS", "TASKS", "Task", "get_task"]

#: What a task is scored by: the key of an evaluation point and whether larger is better.
METRICS: dict[str, bool] = {"accuracy": True, "loss": False}


@dataclass
class Task:
    """One benchmark task.

    Args:
        name: identifier used on the command line.
        description: one line for the report.
        load: returns the data split (cached).
        build: ``build(split) -> nn.Module`` (seeded by the caller).
        steps: training steps of a full run; ``quick_steps`` for ``--quick``.
        batch_size: mini-batch size.
        target: validation ``metric`` counted as "reached" for time/steps to target (at least this accuracy, at
            most this loss).
        eval_every: evaluate the metrics every this many steps.
        curvature_options: keyword arguments kronfac optimizers need for this task (e.g. ``loss_average``).
        metric: ``"accuracy"`` (larger is better) or ``"loss"`` (smaller is better), the final metric the report
            compares and the tuning selects by.
        step_ms: expected milliseconds of one AdamW step on one CPU thread, which weighs the progress bar.
    """

    name: str
    description: str
    load: Callable[[], Split]
    build: Callable[[Split], nn.Module]
    steps: int
    quick_steps: int
    batch_size: int
    target: float
    eval_every: int
    curvature_options: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"
    step_ms: float = 1.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"Invalid metric: {self.metric!r} (must be one of {', '.join(METRICS)})")

    @property
    def larger_is_better(self) -> bool:
        return METRICS[self.metric]

    def reached(self, value: float) -> bool:
        """Whether a validation ``metric`` value reaches the target."""
        return value >= self.target if self.larger_is_better else value <= self.target

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1024) -> tuple[float, float]:
        """Mean loss and accuracy (per token for sequences) on ``(x, y)``."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for start in range(0, len(x), chunk):
            out = model(x[start : start + chunk])
            target = y[start : start + chunk]
            flat, flat_y = out.reshape(-1, out.shape[-1]), target.reshape(-1)
            total_loss += float(nn.functional.cross_entropy(flat, flat_y, reduction="sum"))
            correct += int((flat.argmax(-1) == flat_y).sum())
            count += flat_y.numel()
        model.train(was_training)
        return total_loss / count, correct / count


@cache
def _digits() -> Split:
    return load_digits()


@cache
def _mnist1d() -> Split:
    return load_mnist1d()


@cache
def _text() -> tuple[Split, int]:
    split, vocab = load_stdlib_text()
    return split, len(vocab)


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            name="mlp-digits",
            description="MLP 64-128-128-10 on scikit-learn digits",
            load=_digits,
            build=lambda split: mlp([64, 128, 128, 10]),
            steps=300,
            quick_steps=30,
            batch_size=64,
            target=0.95,
            eval_every=20,
            step_ms=0.6,
        ),
        Task(
            name="mlp-mnist1d",
            description="MLP 40-256-256-10 on mnist1d",
            load=_mnist1d,
            build=lambda split: mlp([40, 256, 256, 10]),
            steps=1500,
            quick_steps=40,
            batch_size=128,
            target=0.60,
            eval_every=50,
            step_ms=1.4,
        ),
        Task(
            name="cnn-digits",
            description="CNN (2 conv + linear) on 8x8 digits",
            load=_digits,
            build=lambda split: small_cnn(),
            steps=300,
            quick_steps=30,
            batch_size=64,
            target=0.95,
            eval_every=20,
            step_ms=1.7,
        ),
        Task(
            name="cnn-mnist1d",
            description="1-D CNN (3 conv, kernel 5, 32 channels + linear) on mnist1d",
            load=_mnist1d,
            build=lambda split: cnn1d(),
            steps=1000,
            quick_steps=30,
            batch_size=128,
            target=0.85,
            eval_every=50,
            step_ms=3.0,
        ),
        Task(
            name="lstm-mnist1d",
            description="LSTM (hidden 64) over mnist1d as a sequence of 10 steps of 4 values",
            load=_mnist1d,
            build=lambda split: LinearLSTM(hidden=64, input_size=4),
            steps=1000,
            quick_steps=20,
            batch_size=128,
            target=0.60,
            eval_every=50,
            step_ms=6.0,
        ),
        Task(
            name="charlm",
            description="GPT-style char LM (2 pre-norm blocks, width 64, context 64) on stdlib source, "
            "scored by validation loss (nats/char)",
            load=lambda: _text()[0],
            build=lambda split: CharTransformer(vocab=_text()[1]),
            steps=400,
            quick_steps=10,
            batch_size=32,
            target=1.9,
            eval_every=50,
            curvature_options={"loss_average": "batch+sequence"},
            metric="loss",
            step_ms=21.0,
        ),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
