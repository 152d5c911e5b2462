"""One API: the shared capture options have the same names and defaults in every optimizer, nothing is swallowed,
curvature takes the parameters' dtype, every method's defaults train, and imports point one way."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kronfac
from kronfac.curvature.factors import KroneckerFactors
from kronfac.optim.options import CaptureOptions

OPTIMIZER_CLASSES = [
    kronfac.KFAC,
    kronfac.SINGD,
    kronfac.AdaFisher,
    kronfac.AdaFisherW,
    kronfac.CGFAC,
    kronfac.KFACPreconditioner,
]
SRC = Path(kronfac.__file__).resolve().parent


def default_of(field: dataclasses.Field) -> object:
    value = field.default
    return value.value if hasattr(value, "value") else value  # enum defaults are spelled as strings


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_shared_options_are_keyword_only_with_one_default(cls: type) -> None:
    params = inspect.signature(cls.__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), "no **kwargs pass-through"
    for field in dataclasses.fields(CaptureOptions):
        assert field.name in params, f"{cls.__name__} lacks {field.name}"
        param = params[field.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.{field.name} is not keyword-only"
        assert param.default == default_of(field), f"{cls.__name__}.{field.name} default {param.default!r}"
    assert params["factor_every"].default >= 1 and "update_every" not in params


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_a_misspelt_option_raises(cls: type) -> None:
    with pytest.raises(TypeError, match="fisher_typ"):
        cls(nn.Linear(3, 2), fisher_typ="mc")


def test_blocks_take_typed_hyperparameters() -> None:
    block = KroneckerFactors(3, 2)
    block.add_inputs(torch.randn(4, 1, 3))
    block.add_output_grads(torch.randn(4, 1, 2), 1.0, 4)
    with pytest.raises(TypeError):
        block.commit(factor_decay=0.9, damping=1e-3)  # an unknown key is an error, not silently ignored


@pytest.mark.parametrize(
    ("model_dtype", "factor_dtype", "expected"),
    [
        (torch.float64, None, torch.float64),
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.float32),
        (torch.float32, torch.float64, torch.float64),
    ],
)
def test_factor_dtype_follows_the_parameters(
    model_dtype: torch.dtype, factor_dtype: torch.dtype | None, expected: torch.dtype
) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(model_dtype)
    opt = kronfac.KFAC(model, factor_dtype=factor_dtype)
    nn.functional.cross_entropy(model(torch.randn(8, 4, dtype=model_dtype)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert opt.layers["0"].block.a_factor.dtype == expected  # type: ignore[attr-defined]


def test_betas_are_cycled_by_torch_schedulers() -> None:
    model = nn.Linear(4, 3)
    opt = kronfac.AdaFisher(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10, cycle_momentum=True)
    seen = set()
    for _ in range(5):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        sched.step()
        seen.add(opt.param_groups[0]["betas"][0])
    assert len(seen) > 1 and opt.param_groups[0]["betas"][1] == 0.8


def digits_accuracy(make: object, steps: int = 300) -> float:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = make(model)  # type: ignore[operator]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=gen)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((model(x[test]).argmax(1) == y[test]).float().mean())


@functools.cache
def adamw_digits_accuracy() -> float:
    return digits_accuracy(lambda m: torch.optim.AdamW(m.parameters()))


@pytest.mark.parametrize("cls", [kronfac.KFAC, kronfac.SINGD, kronfac.AdaFisher, kronfac.AdaFisherW, kronfac.CGFAC])
def test_defaults_train_like_adamw(cls: type) -> None:
    """``Method(model)`` with nothing else set trains a digits MLP as well as AdamW's defaults (within 2 points);
    SINGD's and AdaFisher's paper defaults (lr 1e-3, T_cov 100) stayed far below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = digits_accuracy(cls)
    adamw = adamw_digits_accuracy()
    assert ours >= adamw - 0.02, f"{cls.__name__}: {ours:.3f} vs AdamW {adamw:.3f}"


# -- imports point one way ----------------------------------------------------------------------------------
def module_imports(path: Path) -> set[str]:
    """Every kronfac module a file imports, anywhere in it (lazy and TYPE_CHECKING imports included)."""
    tree = ast.parse(path.read_text())
    package = ".".join(("kronfac", *path.relative_to(SRC).with_suffix("").parts))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kronfac"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: -node.level]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            if base.startswith("kronfac"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def all_modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("kronfac", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


@pytest.mark.parametrize("folder", ["distributed", "curvature", "linalg", "layers", "nn"])
def test_lower_layers_never_import_optim(folder: str) -> None:
    for path in (SRC / folder).rglob("*.py"):
        bad = sorted(m for m in module_imports(path) if m == "kronfac.optim" or m.startswith("kronfac.optim."))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_no_import_cycles() -> None:
    modules = all_modules()
    graph = {
        name: {m for m in module_imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    for name in graph:  # a package's __init__ re-exporting its submodules is not a circle
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_warnings_point_at_the_users_line(cls: type) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(model, norm_layers=False) if cls in (kronfac.AdaFisher, kronfac.AdaFisherW) else cls(model)
    ours = [w for w in caught if issubclass(w.category, kronfac.KronfacWarning)]
    assert ours and all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in caught]


def test_cli_reports_its_version() -> None:
    from kronfac.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
