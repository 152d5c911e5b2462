"""kronfac in PyTorch Lightning: ``configure_optimizers`` returning a kronfac optimizer, automatic optimization
with ``accumulate_grad_batches`` (Lightning divides each loss by it and steps once per window, so
``accumulation_steps=`` must equal it), manual optimization, a checkpoint resume, the precision plugin's
GradScaler read in ``configure_optimizers``, and ``Tuner.lr_find``, which builds and discards optimizers.

In automatic optimization Lightning calls ``optimizer.step(closure)`` and zeroes the gradients inside the closure,
between the forward and the backward pass of the window's first micro-batch; kronfac keeps that micro-batch's
statistics (only a complete forward and backward that no step took is dropped).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch import Tensor, nn

import kronfac

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),  # Lightning on torch 2.13
]

N = 64


def data(n: int = N) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=generator))


def loader(batch: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(), batch_size=batch)


class Classifier(L.LightningModule):
    """A float64 MLP trained by K-FAC with a per-step LR schedule; ``lr`` is an attribute, as ``lr_find`` wants."""

    def __init__(
        self, *, accumulation_steps: int = 1, manual: bool = False, read_scaler: bool = False, lr: float = 0.05
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.accumulation_steps, self.read_scaler, self.lr = accumulation_steps, read_scaler, lr
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[Tensor, Tensor], index: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.lr_schedulers().step()
        return loss

    def configure_optimizers(self) -> Any:
        # Runs after the model is on its device and the precision plugin (and its GradScaler) exists.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self.read_scaler else None
        optimizer = kronfac.KFAC(
            self.net,
            lr=self.lr,
            damping=1e-2,
            inverse_every=1,
            accumulation_steps=self.accumulation_steps,
            grad_scaler=scaler,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(**settings: Any) -> L.Trainer:
    quiet = {
        "accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "max_epochs": 1,
    }  # fmt: skip
    return L.Trainer(**{**quiet, **settings})


def optimizer_of(module: L.LightningModule) -> Any:
    return module.trainer.optimizers[0]


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def factors(optimizer: Any) -> list[Tensor]:
    return [t for layer in optimizer.layers.values() for t in (layer.block.a_factor, layer.block.g_factor)]


def test_accumulate_grad_batches_equals_the_full_batch() -> None:
    """``accumulate_grad_batches=2`` on batches of 8 with ``accumulation_steps=2`` takes the steps of batches of
    16: curvature and parameters agree to round-off."""
    full = Classifier()
    trainer().fit(full, loader(16))
    accumulated = Classifier(accumulation_steps=2)
    trainer(accumulate_grad_batches=2).fit(accumulated, loader(8))
    assert optimizer_of(accumulated).steps == optimizer_of(full).steps == N // 16
    for got, expected in zip(factors(optimizer_of(accumulated)), factors(optimizer_of(full))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(accumulated), flat(full), rtol=1e-10, atol=1e-12)


def test_manual_optimization_equals_automatic() -> None:
    """``self.optimizers()`` / ``manual_backward`` / ``step()`` with the scheduler stepped by hand: the steps of
    automatic optimization."""
    automatic = Classifier()
    trainer().fit(automatic, loader(16))
    manual = Classifier(manual=True)
    trainer().fit(manual, loader(16))
    assert torch.equal(flat(manual), flat(automatic))


def test_checkpoint_resume_ends_where_the_uninterrupted_run_ends(tmp_path: Path) -> None:
    """``trainer.save_checkpoint`` after epoch 1, ``fit(ckpt_path=...)`` of a fresh module for epoch 2: the end
    of two uninterrupted epochs, bit for bit (the optimizer state goes through Lightning's checkpoint)."""
    uninterrupted = Classifier()
    trainer(max_epochs=2).fit(uninterrupted, loader(16))
    first = Classifier()
    one_epoch = trainer(max_epochs=1)
    one_epoch.fit(first, loader(16))
    one_epoch.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Classifier()
    trainer(max_epochs=2).fit(resumed, loader(16), ckpt_path=tmp_path / "epoch1.ckpt")
    assert optimizer_of(resumed).steps == optimizer_of(uninterrupted).steps == 2 * N // 16
    assert torch.equal(flat(resumed), flat(uninterrupted))
    for got, expected in zip(factors(optimizer_of(resumed)), factors(optimizer_of(uninterrupted))):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("read_scaler", [True, False], ids=["scaler-read", "scaler-ignored"])
def test_the_precision_plugins_grad_scaler_is_removed_from_the_curvature(read_scaler: bool) -> None:
    """A ``16-mixed`` precision plugin with a GradScaler (loss scale 2^10; the float64 model is not autocast, so
    the scale is the only difference): passing the plugin's scaler as ``grad_scaler=`` gives the unscaled run's
    steps exactly; ignoring it makes ``G`` 2^20 times too large."""
    plain = Classifier()
    trainer().fit(plain, loader(16))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = Classifier(read_scaler=read_scaler)
    trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(scaled, loader(16))
    if read_scaler:
        assert torch.equal(flat(scaled), flat(plain))
    else:
        g_scaled = optimizer_of(scaled).layers["0"].block.g_factor
        g_plain = optimizer_of(plain).layers["0"].block.g_factor
        assert g_scaled.trace() > 1e4 * g_plain.trace()


def test_lr_find_leaves_the_hooks_of_one_optimizer() -> None:
    """``Tuner.lr_find`` builds an optimizer, runs it, restores the module and ``fit`` builds another: the
    discarded optimizer's capture hooks are gone with it, so each layer carries one optimizer's hooks."""
    module = Classifier()
    fit = trainer(max_epochs=3)
    Tuner(fit).lr_find(module, train_dataloaders=loader(16), num_training=8, min_lr=1e-3, max_lr=0.1, update_attr=False)
    fit.fit(module, loader(16))
    gc.collect()
    # Lightning's LightningOptimizer wrapper is an instance of a KFAC subclass sharing the wrapped one's state; a
    # KFAC whose constructor raised (in another test) has no model.
    live = [o for o in gc.get_objects() if type(o) is kronfac.KFAC and getattr(o, "model", None) is module.net]
    assert live == [optimizer_of(module)]
    assert len(module.net[0]._forward_hooks) == 1  # the live K-FAC's capture hook (factor_every=1)
