"""Strict configuration: every constructor and config dataclass refuses what it cannot run, naming the argument,
and accepts what torch.optim accepts (numpy scalars, 0-d tensors). A hypothesis suite drives every constructor."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kronfac
from kronfac.linalg.thermodynamic import HardwareModel, SolverSchedule, ThermodynamicConfig
from kronfac.optim import checkpoint

OPTIMIZERS = {
    "KFAC": kronfac.KFAC,
    "SINGD": kronfac.SINGD,
    "AdaFisher": kronfac.AdaFisher,
    "AdaFisherW": kronfac.AdaFisherW,
    "CGFAC": kronfac.CGFAC,
    "KFACPreconditioner": kronfac.KFACPreconditioner,
}
#: Numeric arguments of each optimizer (all must be finite).
NUMERIC = {
    "KFAC": ["lr", "momentum", "weight_decay", "damping", "factor_decay", "kl_clip"],
    "SINGD": ["lr", "momentum", "weight_decay", "damping", "lr_cov", "alpha1"],
    "AdaFisher": ["lr", "weight_decay", "damping"],
    "AdaFisherW": ["lr", "weight_decay", "damping"],
    "CGFAC": ["lr", "momentum", "weight_decay", "damping", "tol", "factor_decay", "kl_clip"],
    "KFACPreconditioner": ["damping", "factor_decay", "lr"],
}
INTEGER = {
    "KFAC": ["factor_every", "inverse_every", "mc_samples", "max_skipped", "seed"],
    "SINGD": ["factor_every", "mc_samples", "max_skipped", "seed"],
    "AdaFisher": ["factor_every", "mc_samples", "max_skipped", "seed"],
    "AdaFisherW": ["factor_every", "mc_samples", "max_skipped", "seed"],
    "CGFAC": ["factor_every", "max_iters", "history", "mc_samples", "max_skipped", "seed"],
    "KFACPreconditioner": ["factor_every", "inverse_every", "mc_samples", "max_skipped", "seed"],
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def two_steps(opt: torch.optim.Optimizer, net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        # an absurd but valid setting (lr 1e8) may overflow the parameters on the last step; the next step must
        # then refuse the non-finite values by name, never train on silently
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()


CASES = [(name, arg, bad) for name, args in NUMERIC.items() for arg in args for bad in (math.inf, -math.inf, math.nan)]
CASES += [(name, arg, bad) for name, args in INTEGER.items() for arg in args for bad in (True, 2.5, "3")]


@pytest.mark.parametrize(("name", "arg", "bad"), CASES)
def test_bad_values_are_refused_naming_the_argument(name: str, arg: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        OPTIMIZERS[name](model(), **{arg: bad})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("convert", [np.float64, np.float32, lambda v: torch.tensor(v)], ids=["np64", "np32", "tensor"])
def test_numpy_scalars_and_0d_tensors_are_accepted(name: str, convert: Any) -> None:
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](net, lr=convert(0.01), damping=convert(0.01), factor_every=np.int64(1))
        two_steps(opt, net)
    assert type(opt.param_groups[0]["lr"]) is float  # stored as a plain float: weights_only checkpoints load


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: kronfac.KFAC(model(), seed="a"), "seed"),
        (lambda: kronfac.KFAC(model(), factor_dtype="float32"), "factor_dtype"),
        (lambda: kronfac.SINGD(model(), preconditioner_dtype=torch.int32), "preconditioner_dtype"),
        (lambda: kronfac.SINGD(model(), kfac_like=1), "kfac_like"),
        (lambda: kronfac.AdaFisher(model(), norm_layers="yes"), "norm_layers"),
        (lambda: kronfac.AdaFisher(model(), betas=(0.9, math.inf)), "betas"),
        (lambda: kronfac.CGFAC(model(), warm_start=0), "warm_start"),
        (lambda: kronfac.KFAC(model(), output_fn=3), "output_fn"),
        (lambda: kronfac.KLDWRM("qe", inner_steps=1.5), "inner_steps"),
        (lambda: kronfac.KLDWRM("so", rho=math.nan), "rho"),
        (lambda: kronfac.KLDWRM("qe", inner_preconditioned=1), "inner_preconditioned"),
        (lambda: kronfac.DistributedConfig(timeout=True), "timeout"),
        (lambda: kronfac.DistributedConfig(timeout=math.inf), "timeout"),
        (lambda: kronfac.DistributedConfig(bucket_bytes=1.5), "bucket_bytes"),
        (lambda: kronfac.DistributedConfig(learn_order="no"), "learn_order"),
        (lambda: kronfac.EighConfig(min_eigenvalue=math.inf), "min_eigenvalue"),
        (lambda: kronfac.CholeskyConfig(pi_correction="yes"), "pi_correction"),
        (lambda: SolverSchedule(num_samples=2.5), "num_samples"),
        (lambda: SolverSchedule(num_chains=True), "num_chains"),
        (lambda: SolverSchedule(duration=1e30), "SolverSchedule"),
        (lambda: SolverSchedule(dt=1e-9), "SolverSchedule"),
        (lambda: HardwareModel(solver_dim=2.0), "solver_dim"),
        (lambda: HardwareModel(time_constant=math.inf), "time_constant"),
        (lambda: ThermodynamicConfig(method=True), "method"),
        (lambda: ThermodynamicConfig(seed=1.5), "seed"),
    ],
)
def test_config_arguments_are_checked(make: Any, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize("key", ["lr", "damping"])
def test_schedules_are_checked_at_every_step(key: str) -> None:
    net = model()
    opt = kronfac.KFAC(net, inverse_every=1, **{key: lambda step: 0.01 if step < 2 else -0.01})
    two_steps(opt, net)
    with pytest.raises(ValueError, match=f"Invalid {key} at step 2"):
        two_steps(opt, net)


def test_a_crafted_solver_schedule_in_a_checkpoint_is_refused_at_load() -> None:
    """A checkpoint whose thermodynamic settings would make the simulated solver run for ever fails to load
    instead of hanging at the next step."""
    config = ThermodynamicConfig(method=2, schedule=SolverSchedule(num_samples=16, num_chains=2))
    net = model()
    opt = kronfac.KFAC(net, inverse_every=1, inverse=config)
    two_steps(opt, net)
    state = opt.state_dict()
    curvature = opt.curvature_state_dict()
    settings_tensor = curvature["layers"]["0"]["inverse"]["tensors"]["settings"]
    text = bytes(settings_tensor.tolist()).decode().replace('"duration": null', '"duration": 1e+30')
    curvature["layers"]["0"]["inverse"]["tensors"]["settings"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    state["state"][0][checkpoint.KEY] = checkpoint.encode(curvature)
    fresh = kronfac.KFAC(model(), inverse_every=1, inverse=config)
    with pytest.raises(ValueError, match="SolverSchedule"):
        fresh.load_state_dict(state)


# -- hypothesis: every constructor either builds and steps finitely, or refuses naming an argument -----------
VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=1e-4, max_value=0.5),
    st.integers(min_value=-3, max_value=12),
    st.booleans(),
    st.none(),
    st.sampled_from(["x", "1", (0.9, 0.8), torch.float64, torch.int32]),
)
EVERY_ARGUMENT = {name: NUMERIC[name] + INTEGER[name] for name in OPTIMIZERS}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_configurations_build_and_step_or_name_the_argument(name: str, data: st.DataObject) -> None:
    args = data.draw(st.lists(st.sampled_from(EVERY_ARGUMENT[name]), min_size=1, max_size=4, unique=True))
    kwargs = {arg: data.draw(VALUE, label=arg) for arg in args}
    net = model()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = OPTIMIZERS[name](net, **kwargs)
    except (ValueError, TypeError) as exc:
        assert any(arg in str(exc) for arg in kwargs), f"{name}({kwargs}): {exc} names none of the arguments"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            two_steps(opt, net)
        except FloatingPointError:
            pass  # a valid but divergent setting (lr 0.5 without damping ...) is reported, not silently wrong
