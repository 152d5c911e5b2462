"""K-FAC's asynchronous refresh: the schedule (one refresh interval stale), determinism, exact resume, errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import kronfac
from kronfac.linalg import InverseRequest, build_inverses

EVERY = 3


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, x, y


def make(model: nn.Module, **kwargs) -> kronfac.KFAC:
    options = {"lr": 0.1, "damping": 1e-2, "inverse_every": EVERY, "factor_every": 1, **kwargs}
    return kronfac.KFAC(model, **options)


def train(model: nn.Module, opt: kronfac.KFAC, x: torch.Tensor, y: torch.Tensor, steps: int, start: int = 0) -> list:
    losses = []
    for i in range(start, start + steps):
        batch = slice(8 * (i % 8), 8 * (i % 8) + 8)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def expected_inverses(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], damping: float) -> dict[str, dict]:
    requests = [InverseRequest(a, g, damping, None, name) for name, (a, g) in factors.items()]
    built = build_inverses(kronfac.CholeskyConfig(), requests)
    return {name: inverse.tensors() for name, inverse in zip(factors, built)}


def snapshot(opt: kronfac.KFAC) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (layer.block.a_factor.clone(), layer.block.g_factor.clone()) for n, layer in opt.layers.items()}


def assert_inverses(opt: kronfac.KFAC, expected: dict[str, dict]) -> None:
    for name, layer in opt.layers.items():
        for key, tensor in layer.block.inverse.tensors().items():
            torch.testing.assert_close(tensor, expected[name][key], atol=1e-6, rtol=1e-5, msg=f"{name}.{key}")


def test_inverses_are_one_refresh_interval_stale() -> None:
    """Steps [k+I, k+2I) precondition with the inverses of the factors of step k; the first refresh is built at
    once, as the synchronous run does."""
    model, x, y = model_and_data()
    opt = make(model, async_refresh=True)
    train(model, opt, x, y, 1)  # step 0: factors and a synchronous first refresh
    first = expected_inverses(snapshot(opt), 1e-2)
    assert_inverses(opt, first)
    train(model, opt, x, y, EVERY - 1, start=1)
    train(model, opt, x, y, 1, start=EVERY)  # step I: its factors go to the background job
    at_refresh = snapshot(opt)
    assert_inverses(opt, first)  # still the first inverses
    train(model, opt, x, y, EVERY - 1, start=EVERY + 1)
    assert_inverses(opt, first)
    train(model, opt, x, y, 1, start=2 * EVERY)  # step 2I installs step I's inverses
    assert_inverses(opt, expected_inverses(at_refresh, 1e-2))
    opt.close()


def test_off_is_the_synchronous_step_and_on_is_deterministic() -> None:
    runs = {}
    for label, kwargs in {
        "default": {},
        "off": {"async_refresh": False},
        "on": {"async_refresh": True},
        "on2": {"async_refresh": True},
    }.items():
        model, x, y = model_and_data()
        opt = make(model, **kwargs)
        runs[label] = train(model, opt, x, y, 4 * EVERY + 1), [p.detach().clone() for p in model.parameters()]
        opt.close()
    for a, b in zip(runs["default"][1], runs["off"][1]):
        assert torch.equal(a, b)
    for a, b in zip(runs["on"][1], runs["on2"][1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs["on"][1], runs["off"][1]))  # stale inverses differ


def test_resume_with_a_pending_refresh_is_exact() -> None:
    """state_dict waits for the job in flight and stores its inverses; the resumed run installs them where the
    uninterrupted run does, so both end bit for bit equal."""
    model, x, y = model_and_data()
    opt = make(model, async_refresh=True)
    train(model, opt, x, y, 2 * EVERY + 1)  # a job from step 2I is pending
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert opt.curvature_state_dict()["pending_inverses"]
    train(model, opt, x, y, 2 * EVERY, start=2 * EVERY + 1)
    expected = [p.detach().clone() for p in model.parameters()]
    opt.close()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model, _, _ = model_and_data(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model, async_refresh=True)
    resumed.load_state_dict(saved["opt"])
    train(resumed_model, resumed, x, y, 2 * EVERY, start=2 * EVERY + 1)
    for a, b in zip(expected, resumed_model.parameters()):
        assert torch.equal(a, b.detach())
    resumed.close()


@pytest.mark.parametrize("inverse", [kronfac.CholeskyConfig(), kronfac.EighConfig(refresh="warm")])
def test_async_trains_as_well_as_sync(inverse: kronfac.InverseConfig) -> None:
    final = {}
    for flag in (False, True):
        model, x, y = model_and_data()
        opt = make(model, async_refresh=flag, inverse=inverse)
        losses = train(model, opt, x, y, 60)
        final[flag] = sum(losses[-8:]) / 8
        opt.close()
    initial = float(nn.functional.cross_entropy(model_and_data()[0](x), y))
    assert final[True] < 0.7 * initial
    assert final[True] < 1.1 * final[False]


def test_async_refuses_a_correction_and_a_bad_flag() -> None:
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="async_refresh=True cannot be combined with a correction"):
        make(model, async_refresh=True, correction=kronfac.KLDWRM())
    assert not any(m._forward_hooks for m in model.modules())  # the refused optimizer removed its hooks
    with pytest.raises(ValueError, match="async_refresh"):
        make(model, async_refresh="yes")
