"""kronfac through ``accelerate``: ``Accelerator().prepare(model, optimizer, loader, scheduler)``, gradient
accumulation with ``accelerator.accumulate(model)`` and ``save_state`` / ``load_state``.

The prepared optimizer wraps kronfac's: on the micro-batches that do not sync it skips ``step()`` and
``zero_grad()``, so the statistics of every micro-batch of a step meet in one curvature update, and
``accelerator.backward`` divides each loss by the accumulation steps, which ``accumulation_steps=`` undoes for the
curvature: the prepared run takes the full batch's steps. ``prepare`` also round-trips the optimizer's state_dict
(``load_state_dict(move_to_device(state_dict()))``) before the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from hf_tiny import TokenData, assert_same_curvature, flat, tiny_gpt2
from torch import nn

import kronfac

pytestmark = [
    pytest.mark.filterwarnings("ignore:kronfac.*first-order update"),
    pytest.mark.filterwarnings("ignore:kronfac. .* is shared by layers"),  # GPT-2's wte / lm_head
]

#: name -> factory(model, accumulation_steps), for GPT-2's token-mean loss.
OPTIMIZERS: dict[str, Callable[[nn.Module, int], Any]] = {
    "kfac": lambda model, k: kronfac.KFAC(
        model, lr=0.05, damping=1e-2, inverse_every=1, loss_average="batch+sequence", accumulation_steps=k
    ),
    "singd": lambda model, k: kronfac.SINGD(
        model, lr=0.05, damping=1e-2, loss_average="batch+sequence", accumulation_steps=k
    ),
    "adafisher": lambda model, k: kronfac.AdaFisher(
        model, lr=1e-3, loss_average="batch+sequence", accumulation_steps=k
    ),
}
BATCH = 8


def schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss


def plain_run(method: str, steps: int) -> tuple[nn.Module, Any]:
    """The reference: a plain loop on full batches of ``BATCH``."""
    model = tiny_gpt2(dtype=torch.float64)
    optimizer = OPTIMIZERS[method](model, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = torch.utils.data.DataLoader(TokenData("lm", n=BATCH * steps), batch_size=BATCH)
    for batch in loader:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer


def accelerated_run(
    method: str,
    steps: int,
    accumulation: int,
    *,
    save: Path | None = None,
    stop_after: int | None = None,
    load: Path | None = None,
) -> tuple[nn.Module, Any, Accelerator]:
    """The same training through accelerate, micro-batches of ``BATCH / accumulation`` accumulated; optionally
    stops after ``stop_after`` micro-batches and saves the state to ``save``, or resumes from ``load``."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = tiny_gpt2(dtype=torch.float64)
    optimizer = OPTIMIZERS[method](model, accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = TokenData("lm", n=BATCH * steps)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH // accumulation)
    model, prepared, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    seen = 0
    if load is not None:
        accelerator.load_state(str(load))
        seen = int((load / "micro_batches").read_text())
        loader = accelerator.skip_first_batches(loader, seen)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch))
            prepared.step()
            scheduler.step()
            prepared.zero_grad()
        seen += 1
        if save is not None and seen == stop_after:
            accelerator.save_state(str(save))
            (save / "micro_batches").write_text(str(seen))
            break
    return accelerator.unwrap_model(model), optimizer, accelerator


@pytest.mark.parametrize("method", sorted(OPTIMIZERS))
def test_accelerate_accumulation_equals_the_full_batch(method: str) -> None:
    """Micro-batches of 4 accumulated twice under ``accelerator.accumulate`` (float64): the prepared optimizer
    stepped once per full batch, with the full batch's curvature and parameters, to round-off."""
    steps = 3
    reference, reference_optimizer = plain_run(method, steps)
    model, optimizer, _ = accelerated_run(method, steps, accumulation=2)
    assert optimizer.steps == steps  # the wrapper skipped step() on the micro-batches that do not sync
    assert_same_curvature(optimizer, reference_optimizer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-10, atol=1e-12)


def test_accelerate_without_accumulation_steps_the_curvature_is_too_small() -> None:
    """The control of the test above: kronfac left at ``accumulation_steps=1`` under accelerate's accumulation
    sees each micro-batch's gradient divided by 2, so its ``G`` is 4 times too small."""
    _, reference = plain_run("kfac", 1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_gpt2(dtype=torch.float64)
    optimizer = OPTIMIZERS["kfac"](model, 1)
    loader = torch.utils.data.DataLoader(TokenData("lm", n=BATCH), batch_size=BATCH // 2)
    model, prepared, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch))
            prepared.step()
            prepared.zero_grad()
    name = "transformer.h.0.mlp.c_fc"
    got, expected = optimizer.layers[name].block.g_factor, reference.layers[name].block.g_factor
    torch.testing.assert_close(got * 4, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "singd"])
def test_accelerate_save_state_load_state_resumes_exactly(method: str, tmp_path: Path) -> None:
    """``accelerator.save_state`` after 2 of 4 steps, then a fresh accelerator, model and optimizer that
    ``load_state`` and skip the seen batches: the end is the uninterrupted run's, bit for bit."""
    steps, accumulation = 4, 2
    model, optimizer, _ = accelerated_run(method, steps, accumulation)
    accelerated_run(method, steps, accumulation, save=tmp_path / "state", stop_after=2 * accumulation)
    resumed, resumed_optimizer, _ = accelerated_run(method, steps, accumulation, load=tmp_path / "state")
    assert resumed_optimizer.steps == optimizer.steps == steps
    assert torch.equal(flat(resumed), flat(model))
    assert_same_curvature(resumed_optimizer, optimizer)
