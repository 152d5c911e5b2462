"""The training-loop conventions of the frameworks people use: gradient accumulation, autocast, eval-mode
forwards, GradScaler-skipped steps, empty batches, model outputs that are not tensors, discarded optimizers,
wrapped models."""

from __future__ import annotations

import gc
import io
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kronfac
from settings import DETERMINISTIC, OPTIMIZERS


def model64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def data(n: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_gradient_accumulation_equals_the_full_batch(name: str) -> None:
    """k micro-batches with loss/k (the frameworks' convention) and accumulation_steps=k take the step of the
    full batch (float64)."""
    k = 4
    results = []
    for steps in (1, k):
        net = model64()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = OPTIMIZERS[name](net, accumulation_steps=steps)
        for i in range(3):
            x, y = data(seed=i)
            opt.zero_grad()
            for xs, ys in zip(x.chunk(steps), y.chunk(steps)):
                (nn.functional.cross_entropy(net(xs), ys) / steps).backward()
            opt.step()
        results.append(flat(net))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)


def test_autocast_statistics_are_float32() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = kronfac.KFAC(net)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    a_factor = opt.layers["0"].block.a_factor  # type: ignore[attr-defined]
    rows = torch.cat([x, torch.ones(32, 1)], dim=1)
    assert a_factor.dtype == torch.float32
    torch.testing.assert_close(a_factor, rows.T @ rows / 32, rtol=1e-6, atol=1e-6)  # not a bf16 product


def test_eval_mode_forwards_do_not_feed_the_statistics() -> None:
    factors = []
    for with_eval in (False, True):
        net = model64()
        opt = kronfac.KFAC(net, inverse_every=1)
        for i in range(3):
            x, y = data(seed=i)
            if with_eval:  # a metrics pass between steps, grad enabled, in eval mode
                net.eval()
                net(torch.randn(64, 5, dtype=torch.float64) * 10).sum()
                net.train()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        factors.append(opt.layers["0"].block.a_factor.clone())  # type: ignore[attr-defined]
    assert torch.equal(factors[0], factors[1])


def test_a_step_the_grad_scaler_skips_does_not_fold_into_the_next() -> None:
    finals = []
    for skipped in (False, True):
        net = model64()
        opt = kronfac.KFAC(net, inverse_every=1)
        for i in range(3):
            if skipped and i == 1:  # forward and backward, then no step() (inf gradients), then zero_grad
                x, y = data(seed=99)
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
            x, y = data(seed=i)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        finals.append(flat(net))
    assert torch.equal(finals[0], finals[1])


def test_zero_grad_between_forward_and_backward_keeps_the_statistics() -> None:
    net = model64()
    opt = kronfac.KFAC(net, inverse_every=1)
    x, y = data()
    out = net(x)
    opt.zero_grad()
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    assert opt.layers["0"].block.a_factor is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_empty_batches_are_skipped(name: str) -> None:
    net = model64()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](net, factor_every=1)
    x, y = data()
    net(x[:0]).sum().backward()
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert torch.isfinite(flat(net)).all()


class HFStyle(nn.Module):
    """Returns a dict-like output whose first entry is the loss, as Hugging Face models do with labels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = model64()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Any:
        logits = self.body(x)
        out: dict[str, Tensor] = {}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        out["logits"] = logits

        class Output(dict):
            pass

        result = Output(out)
        result.logits = logits  # type: ignore[attr-defined]
        return result


@pytest.mark.parametrize("fisher_type", ["mc", "type2"])
def test_sampled_fisher_reads_logits_from_model_outputs(fisher_type: str) -> None:
    net = HFStyle()
    opt = kronfac.KFAC(net, fisher_type=fisher_type)
    x, y = data()
    net(x, labels=y)["loss"].backward()
    opt.step()
    assert opt.layers["body.2"].block.g_factor.shape == (3, 3)  # type: ignore[attr-defined]


def test_sampled_fisher_refuses_a_scalar_output() -> None:
    class LossOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model64()

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return nn.functional.cross_entropy(self.body(x), y)

    net = LossOnly()
    opt = kronfac.KFAC(net, fisher_type="mc")
    with pytest.raises(ValueError, match="0-d tensor"):
        net(*data())
    opt.close()


def test_a_discarded_optimizer_removes_its_hooks() -> None:
    net = model64()
    for _ in range(5):  # as Lightning's lr_find does
        kronfac.KFAC(net)
    gc.collect()
    assert all(not m._forward_hooks for m in net.modules())


def test_add_param_group_after_construction_is_refused() -> None:
    net = model64()
    opt = kronfac.KFAC(net)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_checkpoint_keys_do_not_depend_on_wrappers() -> None:
    torch.manual_seed(0)
    net = model64()
    plain = kronfac.KFAC(net)
    assert sorted(kronfac.KFAC(torch.compile(net)).layers) == sorted(plain.layers)
    wrapped_net = model64()
    wrapped = kronfac.KFAC(nn.DataParallel(wrapped_net), inverse_every=1)
    for i in range(2):
        x, y = data(seed=i)
        wrapped.zero_grad()
        nn.functional.cross_entropy(wrapped_net(x), y).backward()
        wrapped.step()
    fresh = model64()
    fresh.load_state_dict(wrapped_net.state_dict())
    resumed = kronfac.KFAC(fresh, inverse_every=1)
    buffer = io.BytesIO()
    torch.save(wrapped.state_dict(), buffer)  # (a live state_dict shares its tensors, as torch.optim's do)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # the wrapped model's checkpoint loads
    for net_, opt in ((wrapped_net, wrapped), (fresh, resumed)):
        x, y = data(seed=7)
        opt.zero_grad()
        nn.functional.cross_entropy(net_(x), y).backward()
        opt.step()
    assert torch.equal(flat(wrapped_net), flat(fresh))


def test_a_callable_grad_scale_is_accepted() -> None:
    net = model64()
    scaler_scale = 1024.0
    opt = kronfac.KFAC(net, grad_scaler=lambda: scaler_scale, inverse_every=1)
    reference = kronfac.KFAC(model64(), inverse_every=1)
    x, y = data()
    (nn.functional.cross_entropy(net(x), y) * scaler_scale).backward()
    for p in net.parameters():
        p.grad /= scaler_scale  # what GradScaler.unscale_ does before step()
    opt.step()
    ref_net = reference.model
    nn.functional.cross_entropy(ref_net(x), y).backward()
    reference.step()
    g_ours = opt.layers["2"].block.g_factor  # type: ignore[attr-defined]
    torch.testing.assert_close(g_ours, reference.layers["2"].block.g_factor, rtol=1e-10, atol=0)  # type: ignore[attr-defined]


def test_include_and_exclude_choose_the_layers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    assert sorted(kronfac.KFAC(net, include=r"[02]").layers) == ["0", "2"]
    assert sorted(kronfac.KFAC(net, exclude=["4"]).layers) == ["0", "2"]
    opt = kronfac.KFAC(net, include=[r"\d"], exclude="2")
    assert sorted(opt.layers) == ["0", "4"] and opt.first_order == ["2.weight", "2.bias"]
    assert opt.summary() == "KFAC: 2 layers preconditioned (0, 4); 2 parameters first-order (2.weight, 2.bias)"
    with pytest.raises(ValueError, match="match none"):
        kronfac.KFAC(net, include=["decoder"])
    with pytest.raises(ValueError, match="Invalid exclude"):
        kronfac.KFAC(net, exclude="(")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded layers are the user's choice: no "no helper" warning
        kronfac.KFAC(net, exclude="2")


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_sequence_logits_with_a_batch_average_are_pointed_out_once(fisher_type: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    tokens = torch.randint(0, 11, (4, 6))
    for average, expected in (("batch", 1), ("batch+sequence", 0)):
        opt = kronfac.KFAC(net, loss_average=average, fisher_type=fisher_type)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                logits = net(tokens)
                nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1)).backward()
                opt.step()
        hints = [w for w in caught if "loss_average='batch+sequence'" in str(w.message)]
        assert len(hints) == expected
        opt.close()
