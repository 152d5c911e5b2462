"""Single-process tests of the ranks' agreement check (the multi-process scenarios are in
``test_distributed_faults.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronfac.distributed import RankMismatchError
from kronfac.distributed.agreement import BACKWARD_PASSES, MAX_LISTED, BackwardCounter, canonical, mismatch
from kronfac.optim.options import CaptureOptions


def test_canonical_text_is_exact_and_free_of_addresses() -> None:
    assert canonical(0.1) != canonical(0.1 + 2**-56)  # to the last bit
    assert canonical(torch.tensor(0.5)) == canonical(0.5)  # a tensor lr is its number, not "tensor(0.5000)"
    close = torch.tensor([1e-2, 1.000001e-2])  # equal in torch's 4-digit repr, different numbers
    assert canonical(close[0]) != canonical(close[1]) and "tensor" not in canonical(close)
    assert canonical(CaptureOptions().fisher_type) == "'empirical'"  # enums by value
    assert canonical((0.9, 0.999)) == "(0.9, 0.999)"

    class Rule:
        pass

    assert "0x" not in canonical(Rule()) and canonical(Rule()) == canonical(Rule())


def test_mismatch_names_each_differing_field_with_its_value_per_rank() -> None:
    every = [{"step": "4", "lr": "0.1", "damping": "0.01"} for _ in range(4)]
    every[2] = {**every[2], "damping": "0.02"}
    every[3] = {**every[3], "damping": "0.02", "extra": "1"}
    error = mismatch(every, calls=5)
    assert isinstance(error, ValueError) and error.where == "at step 4"
    assert error.fields == {"damping": ["0.01", "0.01", "0.02", "0.02"], "extra": ["<absent>"] * 3 + ["1"]}
    assert "damping: ranks 0, 1: 0.01, ranks 2, 3: 0.02; extra: ranks 0-2: <absent>, rank 3: 1" in str(error)


def test_mismatch_lists_a_few_fields_hints_and_the_step_clock() -> None:
    every = [{f"f{i}": str(i) for i in range(10)}, {f"f{i}": str(-i - 1) for i in range(10)}]
    every[0].update({"step": "3", BACKWARD_PASSES: "3"})
    every[1].update({"step": "2", BACKWARD_PASSES: "4"})
    error = mismatch(every, calls=3)
    assert error.where == "at step() call 3 since construction"  # the ranks disagree on the step itself
    assert len(error.fields) == 12 and f"and {12 - MAX_LISTED} more fields" in str(error)
    assert mismatch([{"step": "0", "a": "1"}, {"step": "0", "a": "2"}], calls=0).where == "at construction"
    hinted = mismatch([{BACKWARD_PASSES: "3"}, {BACKWARD_PASSES: "4"}], calls=2)
    assert "without calling step()" in str(hinted)


def test_backward_counter_counts_passes_not_layers_and_forgets_its_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    counter = BackwardCounter([model[0].weight, model[2].weight])
    for _ in range(3):
        model(torch.randn(5, 3)).sum().backward()
    model[2](torch.randn(5, 4)).sum().backward()  # a pass that reaches one layer only
    assert counter.passes == 4
    torch.autograd.grad(model(torch.randn(5, 3)).sum(), list(model.parameters()))  # no .grad: not counted
    assert counter.passes == 4
    counter.close()
    model(torch.randn(5, 3)).sum().backward()
    assert counter.passes == 4


@pytest.mark.usefixtures("one_rank")
def test_one_rank_agrees_with_itself() -> None:
    import kronfac

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = kronfac.KFAC(model, distributed=kronfac.DistributedConfig(check_every=1))
    assert opt.sync is not None and opt.agreement_fields()["inverse_every"] == 10
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        opt.step()
    assert opt.sync.counter.passes == 2
    opt.close()
    assert not opt.sync.counter.handles
    assert RankMismatchError.__mro__[1] is ValueError
