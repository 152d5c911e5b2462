from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kronfac.nn import (
    KronABlock,
    KronALinear,
    add_kron_adapters,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    unmerge_adapters,
)
from kronfac.nn.adapter_files import WEIGHTS_FILE
from kronfac.nn.adapters import adapter_modules

DT = torch.float64


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), _Block(8), _Block(8), nn.Linear(8, 3)).to(DT)


def _randomize_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for w in adapter_modules(model).values():
            for p in w.adapter.parameters():
                p.normal_()


X = torch.randn(4, 5, 6, dtype=DT)

CASES = [
    ("krona", ["ffn.0", "ffn.2"]),
    ("krona_block", ["ffn"]),
    ("krona_block_res", ["ffn"]),
]


@pytest.mark.parametrize(("variant", "targets"), CASES)
def test_init_keeps_outputs_and_only_adapters_train(variant: str, targets: list[str]) -> None:
    model = _model()
    before = model(X)
    report = add_kron_adapters(model, target_modules=targets, variant=variant, factors=2)  # type: ignore[arg-type]
    assert len(report.adapters) == (4 if variant == "krona" else 2)
    torch.testing.assert_close(model(X), before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    assert report.trainable_params == sum(a.params for a in report.adapters)
    model(X).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    # The zero factor A receives gradient, so training can move away from ΔW = 0.
    assert any(float(w.adapter.kron_a.weight.grad.abs().sum()) > 0 for w in adapter_modules(model).values())


def test_merge_unmerge_restores_weights_and_outputs_agree() -> None:
    model = _model()
    add_kron_adapters(model, target_modules=["ffn.0", "ffn.2", "4"], factors=None, scale=0.5)
    _randomize_adapters(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    unmerged_out = model(X)
    merge_adapters(model)
    assert all(w.merged for w in adapter_modules(model).values())
    torch.testing.assert_close(model(X), unmerged_out, rtol=1e-10, atol=1e-10)
    merge_adapters(model)  # idempotent
    torch.testing.assert_close(model(X), unmerged_out, rtol=1e-10, atol=1e-10)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if ".adapters." not in n:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(X), unmerged_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["krona_block", "krona_block_res"])
def test_block_variants_refuse_to_merge(variant: str) -> None:
    model = _model()
    add_kron_adapters(model, target_modules=["ffn"], variant=variant)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no weight"):
        merge_adapters(model)
    unmerge_adapters(model)  # nothing is merged: nothing to do


@pytest.mark.parametrize(("variant", "targets"), CASES)
def test_save_load_round_trip(tmp_path: Path, variant: str, targets: list[str]) -> None:
    model = _model()
    add_kron_adapters(model, target_modules=targets, variant=variant, factors=2, scale=0.3)  # type: ignore[arg-type]
    _randomize_adapters(model)
    expected = model(X)
    path = tmp_path / "adapters"
    save_adapters(model, path)
    stored = load_file(str(path / WEIGHTS_FILE))
    assert stored and all(k.rsplit(".", 1)[-1] in {"kron_a", "kron_b", "res_scale"} for k in stored)
    n_adapter = sum(p.numel() for w in adapter_modules(model).values() for p in w.adapter.parameters())
    assert sum(t.numel() for t in stored.values()) == n_adapter

    fresh = _model()  # same seed: same base weights, no adapters
    report = load_adapters(fresh, path)
    torch.testing.assert_close(fresh(X), expected, rtol=0, atol=0)
    assert report.trainable_params == n_adapter

    again = _model()
    add_kron_adapters(again, target_modules=targets, variant=variant, factors=2, scale=0.3)  # type: ignore[arg-type]
    load_adapters(again, path)
    torch.testing.assert_close(again(X), expected, rtol=0, atol=0)


def test_load_mismatch_and_merged_errors(tmp_path: Path) -> None:
    model = _model()
    add_kron_adapters(model, target_modules=["ffn.0"], factors=2)
    path = tmp_path / "a"
    save_adapters(model, path)
    other = _model()
    add_kron_adapters(other, target_modules=["ffn.0"], factors=4)
    with pytest.raises(ValueError, match="does not match"):
        load_adapters(other, path)
    merge_adapters(model)
    with pytest.raises(ValueError, match="unmerge"):
        save_adapters(model, path)


def test_target_errors_and_factor_specs() -> None:
    with pytest.raises(ValueError, match="match no module"):
        add_kron_adapters(_model(), target_modules=["attention"])
    with pytest.raises(ValueError, match=r"not nn\.Linear"):
        add_kron_adapters(_model(), target_modules=["ffn"], variant="krona")
    with pytest.raises(ValueError, match="variant"):
        add_kron_adapters(_model(), target_modules=["ffn.0"], variant="lora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divide"):
        add_kron_adapters(_model(), target_modules=["ffn.0"], factors=3)
    with pytest.raises(ValueError, match="krona_block_res needs in == out"):
        add_kron_adapters(_model(), target_modules=["ffn.0"], variant="krona_block_res")
    model = _model()
    report = add_kron_adapters(
        model,
        target_modules=["ffn.0", "ffn.2"],
        factors={"*.ffn.0": ((2, 4), (8, 2)), "ffn.2": 4},
        modules_to_save=["4"],
    )
    shapes = {a.name: a.factor_shapes for a in report.adapters}
    assert shapes["2.ffn.0"] == ((2, 4), (8, 2))
    assert shapes["2.ffn.2"] == ((4, 4), (2, 4))
    assert all(p.requires_grad for p in model[4].copies["default"].parameters())
    assert not any(p.requires_grad for p in model[4].original.parameters())
    with pytest.raises(ValueError, match="already has an adapter"):
        add_kron_adapters(model, target_modules=["ffn.0"])


def test_remove_adapters_with_and_without_merge() -> None:
    model = _model()
    add_kron_adapters(model, target_modules=["ffn.0", "ffn.2"])
    _randomize_adapters(model)
    adapted = model(X)
    remove_adapters(model, merge=True)
    assert not adapter_modules(model)
    assert isinstance(model[2].ffn[0], nn.Linear)
    torch.testing.assert_close(model(X), adapted, rtol=1e-10, atol=1e-10)
    plain = _model()
    reference = plain(X)
    add_kron_adapters(plain, target_modules=["ffn"], variant="krona_block")
    _randomize_adapters(plain)
    assert isinstance(plain[2].ffn, KronABlock)
    remove_adapters(plain)
    torch.testing.assert_close(plain(X), reference, rtol=0, atol=0)
    assert not isinstance(plain[2].ffn, KronALinear)


@pytest.mark.parametrize(
    ("scale", "problem"),
    [(0.0, "non-zero"), (float("nan"), "finite"), (float("inf"), "finite"), ("0.5", "number"), (True, "number")],
)
def test_invalid_scale_is_refused_before_the_model_changes(scale: object, problem: str) -> None:
    model = _model()
    before = [(n, p.requires_grad) for n, p in model.named_parameters()], [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=f"'2.ffn.0': Invalid scale: .*{problem}"):
        add_kron_adapters(model, target_modules=["ffn.0"], scale=scale)  # type: ignore[arg-type]
    assert (
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [n for n, _ in model.named_modules()],
    ) == before


def test_scale_must_fit_the_dtype_and_may_be_negative() -> None:
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        add_kron_adapters(_model().float(), target_modules=["ffn.0"], scale=1e39)
    model = _model()
    add_kron_adapters(model, target_modules=["ffn.0"], scale=-0.5)  # s (A ⊗ B) = |s| ((-A) ⊗ B): allowed
    assert all(w.adapter.scale == -0.5 for w in adapter_modules(model).values())
