"""kronfac inside ``transformers.Trainer(optimizers=(optimizer, scheduler))`` on GPT-2 (tied ``wte``/``lm_head``,
``Conv1D``) and BERT for sequence classification: a checkpoint resume ends where the uninterrupted run ends, the
Trainer's gradient accumulation gives the full batch's curvature, gradient checkpointing and bf16 autocast leave
the statistics alone.

The Trainer saves the optimizer with ``torch.save(optimizer.state_dict())`` and loads it with ``torch.load(...,
weights_only=True)``, clips gradients (``max_grad_norm=1``) after the backward passes, calls ``model.zero_grad()``
rather than the optimizer's and skips the batches a resumed epoch has seen; each test runs through all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import TokenData, assert_same_curvature, flat, loss_average_of, make_model, task_of
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import kronfac

# Warned once per optimizer, as expected on these models: LayerNorms first-order (K-FAC, SINGD), GPT-2's wte/lm_head.
pytestmark = [
    pytest.mark.filterwarnings("ignore:kronfac.*first-order update"),
    pytest.mark.filterwarnings("ignore:kronfac. .* is shared by layers"),
]

OptimizerFactory = Callable[[nn.Module, str, int], torch.optim.Optimizer]

#: name -> factory(model, loss_average, accumulation_steps): settings that act within a few steps.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "kfac": lambda model, average, k: kronfac.KFAC(
        model, lr=0.05, damping=1e-2, inverse_every=2, loss_average=average, accumulation_steps=k
    ),
    "kfac-mc": lambda model, average, k: kronfac.KFAC(
        model, lr=0.05, damping=1e-2, factor_every=2, fisher_type="mc", loss_average=average, accumulation_steps=k
    ),
    "singd": lambda model, average, k: kronfac.SINGD(
        model, lr=0.05, damping=1e-2, factor_every=2, loss_average=average, accumulation_steps=k
    ),
    "adafisherw": lambda model, average, k: kronfac.AdaFisherW(
        model, lr=1e-3, factor_every=2, loss_average=average, accumulation_steps=k
    ),
}


class CountSteps(TrainerCallback):
    """Counts the optimizer steps a ``train()`` call takes."""

    def __init__(self) -> None:
        self.steps = 0

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1


def run(
    kind: str,
    method: str,
    out: Path,
    *,
    batch: int = 4,
    accumulation: int = 1,
    resume: Path | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    **arguments: Any,
) -> tuple[nn.Module, Any, CountSteps]:
    """Train a fresh tiny model with a fresh optimizer through ``Trainer`` (resuming from ``resume`` if given)."""
    model = make_model(kind, dropout=dropout, dtype=dtype)
    optimizer = OPTIMIZERS[method](model, loss_average_of(kind), accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
    settings: dict[str, Any] = {
        "output_dir": str(out), "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no",
        "seed": 0, "dataloader_num_workers": 0,
    }  # fmt: skip
    counter = CountSteps()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**{**settings, **arguments}),
        train_dataset=TokenData(task_of(kind)),
        optimizers=(optimizer, scheduler),
        callbacks=[counter],
    )
    # BERT's forward takes **kwargs, so the Trainer believes it normalises its loss by the accumulated batch
    # (num_items_in_batch) and does not divide it by the accumulation steps; it does not (docs/integrations.md).
    trainer.loss_is_scaled_for_ga = False if kind == "bert" else None
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return model, optimizer, counter


RESUMED = [("gpt2", "kfac"), ("gpt2", "kfac-mc"), ("gpt2", "singd"), ("gpt2", "adafisherw"), ("bert", "kfac")]


@pytest.mark.parametrize(("kind", "method"), RESUMED, ids=lambda v: v)
def test_trainer_resume_ends_where_the_uninterrupted_run_ends(kind: str, method: str, tmp_path: Path) -> None:
    """6 steps of 2 accumulated micro-batches, dropout on, a checkpoint at step 3; a fresh model and optimizer
    resumed from it end at the same parameters and curvature, bit for bit, after 3 steps of their own."""
    common: dict[str, Any] = {"max_steps": 6, "accumulation": 2, "dropout": 0.1}
    model, optimizer, _ = run(kind, method, tmp_path, save_strategy="steps", save_steps=3, **common)
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed, resumed_optimizer, counter = run(kind, method, tmp_path / "resumed", resume=checkpoint, **common)
    assert counter.steps == 3  # the resumed run continued from step 3 (it did not start over)
    assert resumed_optimizer.steps == optimizer.steps == 6
    assert torch.equal(flat(resumed), flat(model))
    assert_same_curvature(resumed_optimizer, optimizer)


def test_trainer_resume_without_the_optimizer_state_ends_elsewhere(tmp_path: Path) -> None:
    """The control of the test above: with ``optimizer.pt`` gone, the Trainer resumes the model alone and the run
    ends elsewhere (so equality there is the optimizer state's doing)."""
    common: dict[str, Any] = {"max_steps": 6, "accumulation": 2}
    model, _, _ = run("gpt2", "kfac", tmp_path, save_strategy="steps", save_steps=3, **common)
    checkpoint = tmp_path / "checkpoint-3"
    (checkpoint / "optimizer.pt").unlink()
    resumed, _, counter = run("gpt2", "kfac", tmp_path / "resumed", resume=checkpoint, **common)
    assert counter.steps == 3
    assert not torch.allclose(flat(resumed), flat(model), rtol=0.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_gradient_accumulation_equals_the_full_batch(kind: str, tmp_path: Path) -> None:
    """Batches of 4 accumulated twice with ``accumulation_steps=2`` take the steps of batches of 8 (float64):
    every curvature statistic and parameter agrees to round-off, gradient clipping included."""
    full, full_optimizer, _ = run(kind, "kfac", tmp_path / "full", batch=8, max_steps=3, dtype=torch.float64)
    accumulated, optimizer, counter = run(
        kind, "kfac", tmp_path / "accumulated", batch=4, accumulation=2, max_steps=3, dtype=torch.float64
    )
    assert counter.steps == optimizer.steps == 3
    assert_same_curvature(optimizer, full_optimizer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(accumulated), flat(full), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning")  # renamed in 5.x
def test_trainer_gradient_checkpointing_leaves_the_curvature_alone(reentrant: bool, tmp_path: Path) -> None:
    """Checkpointed blocks run their forward again inside the backward pass (the reentrant kind runs the first
    one without grad); the statistics and the steps are those of the plain run."""
    plain, plain_optimizer, _ = run("gpt2", "kfac", tmp_path / "plain", max_steps=2, dtype=torch.float64)
    checkpointed, optimizer, _ = run(
        "gpt2",
        "kfac",
        tmp_path / "checkpointed",
        max_steps=2,
        dtype=torch.float64,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert_same_curvature(optimizer, plain_optimizer, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(checkpointed), flat(plain), rtol=1e-12, atol=1e-14)


def test_trainer_bf16_keeps_float32_statistics(tmp_path: Path) -> None:
    """``bf16=True`` runs the forward under CPU autocast (checked on a layer's output); the statistics are
    float32 and finite."""
    seen: list[torch.dtype] = []

    def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        seen.append(output.dtype)

    model = make_model("gpt2")
    model.transformer.h[0].mlp.c_fc.register_forward_hook(record)
    optimizer = OPTIMIZERS["kfac"](model, "batch+sequence", 1)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True, use_cpu=True,
        report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=arguments, train_dataset=TokenData("lm"), optimizers=(optimizer, None)).train()
    assert seen and set(seen) == {torch.bfloat16}
    for name, block in optimizer.curvature_state_dict()["layers"].items():
        for key in ("a_factor", "g_factor"):
            assert block[key].dtype == torch.float32, (name, key)
            assert torch.isfinite(block[key]).all(), (name, key)
