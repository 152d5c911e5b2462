"""Behaviour every kronfac optimizer shares with torch.optim, run over the registry of all optimizers."""

from __future__ import annotations

import io
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

from settings import OPTIMIZERS, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:kronfac.*first-order update")


make_model = tiny_model


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=sorted(OPTIMIZERS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_state_dict_round_trip_continues_bit_identically(name: str) -> None:
    data = batches(12)
    model = make_model()
    opt = OPTIMIZERS[name](model)
    train(model, opt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[5:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt2 = OPTIMIZERS[name](resumed)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_written_on_a_gpu_resumes_on_the_parameters_device(name: str) -> None:
    """A checkpoint whose tensors were saved from ``cuda:0`` (simulated: torch.save tags every storage so) loads with
    ``torch.load(map_location="cpu")`` on a CPU-only machine, as Hugging Face's Trainer and accelerate load it, and
    resumes bit-identically: the curvature blob's tensors follow the parameters too, not only torch.optim's state."""
    data = batches(10)
    model = make_model()
    opt = OPTIMIZERS[name](model)
    train(model, opt, data[:5])
    buffer = io.BytesIO()
    tag = torch.serialization.location_tag
    with mock.patch.object(
        torch.serialization, "location_tag", lambda storage: "cuda:0" if tag(storage) == "cpu" else tag(storage)
    ):
        torch.save(opt.state_dict(), buffer)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, data[5:])

    buffer.seek(0)
    resumed = make_model()
    resumed.load_state_dict(saved_model)
    opt2 = OPTIMIZERS[name](resumed)
    opt2.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    train(resumed, opt2, data[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_distributed_checkpoint_round_trip_continues_bit_identically(name: str, tmp_path) -> None:
    """The standard DCP path: get_optimizer_state_dict -> dcp.save -> (fresh model and optimizer) dcp.load ->
    set_optimizer_state_dict resumes exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = batches(12)
    model = make_model()
    opt = OPTIMIZERS[name](model)
    train(model, opt, data[:5])
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    train(model, opt, data[5:])

    resumed = make_model()
    opt2 = OPTIMIZERS[name](resumed)
    steps_before = opt2.steps  # type: ignore[attr-defined]
    template = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, opt2)}
    assert opt2.steps == steps_before  # type: ignore[attr-defined]  # no zero-gradient initialisation step ran
    dcp.load(template, checkpoint_id=tmp_path)
    resumed.load_state_dict(template["model"])
    set_optimizer_state_dict(resumed, opt2, template["optim"])
    train(resumed, opt2, data[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_from_another_model_or_optimizer_is_refused(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model)
    train(model, opt, batches(2))
    state = opt.state_dict()
    wider = nn.Sequential(*list(make_model())[:-1], nn.Linear(8, 4))  # same layer names, another head width
    with pytest.raises(ValueError, match="layer '6'"):
        OPTIMIZERS[name](wider).load_state_dict(state)
    other = "kfac" if not name.startswith("kfac") else "singd"
    with pytest.raises(ValueError, match="saved by"):
        OPTIMIZERS[other](make_model()).load_state_dict(state)


def test_param_groups_have_their_own_hyperparameters(name: str) -> None:
    model = make_model()
    frozen = [*model[0].parameters()]
    rest = [p for p in model.parameters() if all(p is not q for q in frozen)]
    opt = OPTIMIZERS[name](model, param_groups=[{"params": frozen, "lr": 0.0}, {"params": rest}])
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(3))
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert moved[:2] == [False, False]
    assert all(moved[2:])


def test_lr_scheduler_drives_the_learning_rate(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model)
    base = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(base * 0.125)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_is_called_and_loss_decreases(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model)
    x, y = batches(1)[0]
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(25):
        losses.append(opt.step(closure).item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    "bad", [{"lr": -1.0}, {"lr": float("nan")}, {"damping": 0.0}, {"weight_decay": -0.1}, {"on_nonfinite": "x"}]
)
def test_bad_arguments_raise_value_error_naming_them(name: str, bad: dict) -> None:
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        OPTIMIZERS[name](make_model(), **bad)


def test_non_finite_gradients_raise_naming_the_layer(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model)
    x, y = batches(1)[0]
    x[0, 0, 0, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"layer '0'"):
        opt.step()


def test_non_finite_gradients_skip_keeps_state_clean(name: str) -> None:
    data = batches(4)
    model = make_model()
    opt = OPTIMIZERS[name](model, on_nonfinite="skip")
    train(model, opt, data[:2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    x, y = data[2]
    x = x.clone()
    x[0, 0, 0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("non-finite" in str(w.message) for w in caught)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(torch.isfinite(t).all() for t in _tensors([opt.state_dict(), opt.curvature_state_dict()]))


def test_consecutive_skips_escalate_naming_the_layer(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model, on_nonfinite="skip", max_skipped=3)
    x, y = batches(1)[0]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        train(model, opt, batches(1))  # a good step resets the count
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(FloatingPointError, match=r"3 consecutive steps skipped.*layer '0'"):
            opt.step()
    assert opt.num_skipped == 4  # type: ignore[attr-defined]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_huge_but_finite_gradients_are_not_reported_as_non_finite(name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad.fill_(3e38)  # each entry finite, every norm overflows float32
    opt.step()  # must not raise
