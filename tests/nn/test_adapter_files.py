"""Adapter directories load all or nothing (kronfac.nn.adapter_files).

A table of corrupted directories: each case saves a valid adapter directory, corrupts it one way and loads it into
a fresh base model and into a model that already has matching adapters. Every case must be refused with a ``ValueError``
that names the file, the module (where the problem has one) and the problem, and leave the model bit-identical:
every parameter and buffer (bits, dtype, ``requires_grad``), the module tree with its types, and the adapters'
scales and merged flags. The valid file, and valid variations of it, must load exactly.

``python tests/nn/test_adapter_files.py --table`` runs the same cases and rewrites docs/reliability_adapters.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kronfac.nn import add_kron_adapters, load_adapters, merge_adapters, save_adapters
from kronfac.nn.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from kronfac.nn.adapters import adapter_hosts, saved_modules

DT = torch.float64
TABLE = Path(__file__).resolve().parents[2] / "docs" / "reliability_adapters.md"
X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=DT)


def base_model() -> nn.Module:
    """A Linear projection, a BatchNorm (buffers), two FFN blocks and a head; the same values on every call."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    norm.running_mean.normal_()
    layers = OrderedDict(
        proj=nn.Linear(6, 8),
        act=nn.Tanh(),
        norm=norm,
        ffn=nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
        mlp=nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
        head=nn.Linear(8, 3),
    )
    return nn.Sequential(layers).to(DT)


def adapted_model(seed: int) -> nn.Module:
    """The base model with one adapter of each variant and the head in modules_to_save, values from ``seed``."""
    model = base_model()
    add_kron_adapters(model, target_modules=["proj"], variant="krona", factors=2, scale=0.5, modules_to_save=["head"])
    add_kron_adapters(model, target_modules=["ffn"], variant="krona_block_res", factors=2, scale=0.3)
    add_kron_adapters(model, target_modules=["mlp"], variant="krona_block", factors=((4, 2), (2, 4)), scale=-2.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for host in adapter_hosts(model).values():
            for p in host.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=DT))
        for p in model.head.copies["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=DT))
    return model


TARGETS: dict[str, Callable[[], nn.Module]] = {
    "fresh base model": base_model,
    "model with adapters": lambda: adapted_model(seed=2),
}


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything a load may change, as plain comparable values."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "module tree": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        **{n: (t.dtype, tuple(t.shape), t.requires_grad, _bits(t)) for n, t in tensors},
        "adapters": {
            n: ({k: a.scale for k, a in h.adapters.items()}, h.merged_adapters, h.active_adapters, h.disabled)
            for n, h in adapter_hosts(model).items()
        },
        "saved": {n: (list(m.copies), m.active_adapters, m.disabled) for n, m in saved_modules(model).items()},
    }


def changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# --- corrupting a valid directory --------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads((path / CONFIG_FILE).read_text())


def _copy(path: Path) -> Path:
    out = path.with_name("corrupted")
    shutil.copytree(path, out)
    return out


Corruption = Callable[[Path], Path]


def edit(
    *,
    tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
    config: Callable[[dict], object] | None = None,
    metadata: Callable[[dict], object] | None = None,
) -> Corruption:
    """A corruption that edits in place, in this order, the tensors, the config's ``adapters`` entries, the
    whole config."""

    def corrupt(path: Path) -> Path:
        stored, raw = _read(path)
        if tensors is not None:
            tensors(stored)
        if config is not None:
            config(raw["adapters"])
        if metadata is not None:
            metadata(raw)
        out = _copy(path)
        save_file(stored, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(raw))
        return out

    return corrupt


def edit_bytes(name: str, change: Callable[[bytes], bytes]) -> Corruption:
    def corrupt(path: Path) -> Path:
        out = _copy(path)
        (out / name).write_bytes(change((out / name).read_bytes()))
        return out

    return corrupt


def remove(name: str) -> Corruption:
    def corrupt(path: Path) -> Path:
        out = _copy(path)
        (out / name).unlink()
        return out

    return corrupt


def rename(old: str, new: str) -> Corruption:
    """Move module ``old``'s entry and tensors to the name ``new``."""

    def move(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith(old + ".")]:
            tensors[new + key[len(old) :]] = tensors.pop(key)

    return edit(tensors=move, config=lambda c: c.update({new: c.pop(old)}))


def empty_directory(path: Path) -> Path:
    out = path.with_name("adapters_dir")
    out.mkdir()
    return out


def a_file(path: Path) -> Path:
    return path / WEIGHTS_FILE


def set_value(key: str, value: float) -> Corruption:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key].view(-1)[0] = value

    return edit(tensors=change)


def duplicate_entry(path: Path) -> Path:
    out = _copy(path)
    text = (out / CONFIG_FILE).read_text()
    entry = json.dumps(json.loads(text)["adapters"]["proj"])
    (out / CONFIG_FILE).write_text(text.replace('"adapters": {', '"adapters": {"proj": ' + entry + ", ", 1))
    return out


# A self-consistent proj adapter for 8 -> 8 features; the module maps 6 -> 8.
grow_proj_input = edit(
    tensors=lambda t: t.update({"proj.kron_b": torch.randn(4, 4, dtype=DT)}),
    config=lambda c: c["proj"].update(in_features=8, factors=[[2, 2], [4, 4]]),
)
# A second, valid-looking adapter on ffn.0, inside the block ffn that the file also adapts.
add_nested = edit(
    tensors=lambda t: t.update(
        {"ffn.0.kron_a": torch.randn(2, 2, dtype=DT), "ffn.0.kron_b": torch.randn(8, 4, dtype=DT)}
    ),
    config=lambda c: c.update(
        {"ffn.0": {"variant": "krona", "factors": [[2, 2], [8, 4]], "scale": 1.0, "in_features": 8, "out_features": 16}}
    ),
)


@dataclass(frozen=True)
class Case:
    """One corruption; ``problem`` is a regex the message must match, ``module`` a name it must quote."""

    name: str
    corrupt: Corruption
    problem: str
    module: str | None = None

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


NAN, INF = float("nan"), float("inf")
CASES = [
    # the directory and its files
    Case("directory without files", empty_directory, r"no krona_config\.json"),
    Case("path does not exist", lambda p: p.with_name("missing"), r"no such directory"),
    Case("path is a file", a_file, r"not a directory"),
    Case("no config file", remove(CONFIG_FILE), r"no krona_config\.json"),
    Case("no weights file", remove(WEIGHTS_FILE), r"no krona_model\.safetensors"),
    Case("truncated safetensors file", edit_bytes(WEIGHTS_FILE, lambda b: b[:-7]), r"not a readable safetensors"),
    Case("empty safetensors file", edit_bytes(WEIGHTS_FILE, lambda b: b""), r"not a readable safetensors"),
    Case("text file, not safetensors", edit_bytes(WEIGHTS_FILE, lambda b: b'{"proj": 1}'), r"not a readable"),
    # the config as a whole
    Case("bad JSON", edit_bytes(CONFIG_FILE, lambda b: b[:-3]), r"not valid JSON"),
    Case("config not UTF-8", edit_bytes(CONFIG_FILE, lambda b: b"\xff" + b), r"not valid JSON"),
    Case("JSON not an object", edit_bytes(CONFIG_FILE, lambda b: b"[1, 2]"), r"JSON object"),
    Case("no format_version", edit(metadata=lambda m: m.pop("format_version")), r"missing key.*format_version"),
    Case("unknown format_version", edit(metadata=lambda m: m.update(format_version="99")), r"format_version"),
    Case("no adapters listed", edit(metadata=lambda m: m.update(adapters={})), r"no adapters"),
    Case("adapters not an object", edit(metadata=lambda m: m.update(adapters=[1])), r"JSON object"),
    Case("duplicate module name", duplicate_entry, r"duplicate key.*proj"),
    Case("adapter_name with a dot", edit(metadata=lambda m: m.update(adapter_name="a.b")), r"adapter_name"),
    Case("base_model not an object", edit(metadata=lambda m: m.update(base_model="gpt2")), r"base_model"),
    Case(
        "another base model class",
        edit(metadata=lambda m: m["base_model"].update({"class": "transformers.GPT2Model"})),
        r"trained on a transformers\.GPT2Model",
    ),
    Case(
        "another base model shape",
        edit(metadata=lambda m: m["base_model"].update(fingerprint="sha256:0")),
        r"names and shapes differ",
    ),
    Case("modules_to_save not a list", edit(metadata=lambda m: m.update(modules_to_save="head")), r"list"),
    Case(
        "modules_to_save lists an adapted module",
        edit(metadata=lambda m: m.update(modules_to_save=["head", "proj"])),
        r"both adapted and in modules_to_save|no tensor of it",
        "proj",
    ),
    # one adapter's entry
    Case("entry not an object", edit(config=lambda c: c.update(proj=3)), r"JSON object", "proj"),
    Case("missing key 'factors'", edit(config=lambda c: c["proj"].pop("factors")), r"missing key.*factors", "proj"),
    Case("missing key 'scale'", edit(config=lambda c: c["ffn"].pop("scale")), r"missing key.*scale", "ffn"),
    Case("unknown key", edit(config=lambda c: c["proj"].update(rank=4)), r"unknown key.*rank", "proj"),
    Case("wrong variant", edit(config=lambda c: c["proj"].update(variant="lora")), r"variant 'lora'", "proj"),
    Case("factors not two pairs", edit(config=lambda c: c["proj"].update(factors=[[2, 2]])), r"factors", "proj"),
    Case(
        "factors not integers",
        edit(config=lambda c: c["proj"].update(factors=[[2.5, 2], [4, 3]])),
        r"factors",
        "proj",
    ),
    Case(
        "in_features not an integer",
        edit(config=lambda c: c["proj"].update(in_features="6")),
        r"in_features",
        "proj",
    ),
    Case(
        "factors disagree with in_features",
        edit(config=lambda c: c["proj"].update(in_features=7)),
        r"in_features",
        "proj",
    ),
    # scale
    Case("NaN scale", edit(config=lambda c: c["proj"].update(scale=NAN)), r"scale.*finite", "proj"),
    Case("inf scale", edit(config=lambda c: c["ffn"].update(scale=INF)), r"scale.*finite", "ffn"),
    Case("-inf scale", edit(config=lambda c: c["mlp"].update(scale=-INF)), r"scale.*finite", "mlp"),
    Case("1e308 scale", edit(config=lambda c: c["mlp"].update(scale=1e308)), r"overflows", "mlp"),
    Case("zero scale", edit(config=lambda c: c["proj"].update(scale=0.0)), r"scale.*non-zero", "proj"),
    Case("scale as a string", edit(config=lambda c: c["proj"].update(scale="0.5")), r"scale.*number", "proj"),
    Case("scale as a boolean", edit(config=lambda c: c["proj"].update(scale=True)), r"scale.*number", "proj"),
    Case("scale null", edit(config=lambda c: c["proj"].update(scale=None)), r"scale.*number", "proj"),
    # module names
    Case("empty module name", rename("proj", ""), r"empty module name", ""),
    Case("unknown module name", rename("proj", "proj2"), r"no such module|does not match", "proj2"),
    Case("name of a parameter", rename("proj", "proj.weight"), r"no such module|does not match", "proj.weight"),
    Case("nested module names", add_nested, r"inside|does not match", "ffn.0"),
    Case(
        "block variant on a module without Linear",
        rename("mlp", "act"),
        r"no nn\.Linear|does not match",
        "act",
    ),
    Case(
        "'krona' on a block",
        edit(config=lambda c: c["mlp"].update(variant="krona")),
        r"not nn\.Linear|does not match",
        "mlp",
    ),
    Case("features do not fit the module", grow_proj_input, r"maps 6 -> 8|does not match", "proj"),
    # tensors
    Case("missing tensor", edit(tensors=lambda t: t.pop("proj.kron_b")), r"missing tensor.*proj\.kron_b", "proj"),
    Case(
        "missing res_scale",
        edit(tensors=lambda t: t.pop("ffn.res_scale")),
        r"missing tensor.*ffn\.res_scale",
        "ffn",
    ),
    Case(
        "extra tensor of a module",
        edit(tensors=lambda t: t.update({"proj.lora_a": torch.zeros(2, 2, dtype=DT)})),
        r"unexpected tensor.*proj\.lora_a",
        "proj",
    ),
    Case(
        "tensor of no listed module",
        edit(tensors=lambda t: t.update({"act.kron_a": torch.zeros(2, 2, dtype=DT)})),
        r"act\.kron_a.*belongs to no adapter",
    ),
    Case(
        "wrong shape (B transposed)",
        edit(tensors=lambda t: t.update({"proj.kron_b": t["proj.kron_b"].T.contiguous()})),
        r"shape \(3, 4\).*\(4, 3\)",
        "proj",
    ),
    Case(
        "wrong shape of res_scale",
        edit(tensors=lambda t: t.update({"ffn.res_scale": t["ffn.res_scale"].reshape(1)})),
        r"shape \(1,\).*\(\)",
        "ffn",
    ),
    Case("NaN in A", set_value("proj.kron_a", NAN), r"non-finite", "proj"),
    Case("inf in B", set_value("mlp.kron_b", INF), r"non-finite", "mlp"),
    Case("NaN res_scale", set_value("ffn.res_scale", NAN), r"non-finite", "ffn"),
    Case(
        "integer dtype",
        edit(tensors=lambda t: t.update({"proj.kron_a": t["proj.kron_a"].round().to(torch.int64)})),
        r"dtype torch\.int64",
        "proj",
    ),
    Case(
        "boolean dtype",
        edit(tensors=lambda t: t.update({"mlp.kron_b": t["mlp.kron_b"] > 0})),
        r"dtype torch\.bool",
        "mlp",
    ),
    # modules_to_save
    Case(
        "saved module without tensors",
        edit(tensors=lambda t: [t.pop(k) for k in ("head.weight", "head.bias")]),
        r"no tensor of it",
        "head",
    ),
    Case(
        "saved module missing a tensor",
        edit(tensors=lambda t: t.pop("head.bias")),
        r"missing tensor.*head\.bias",
        "head",
    ),
    Case(
        "saved module with an extra tensor",
        edit(tensors=lambda t: t.update({"head.scale": torch.ones(3, dtype=DT)})),
        r"unexpected tensor.*head\.scale",
        "head",
    ),
    Case(
        "saved module wrong shape",
        edit(tensors=lambda t: t.update({"head.weight": torch.zeros(3, 9, dtype=DT)})),
        r"shape \(3, 9\).*\(3, 8\)",
        "head",
    ),
    Case("NaN in a saved module", set_value("head.weight", NAN), r"non-finite", "head"),
    Case(
        "saved module of no such module",
        edit(
            tensors=lambda t: t.update({"tail.weight": t.pop("head.weight"), "tail.bias": t.pop("head.bias")}),
            metadata=lambda m: m.update(modules_to_save=["tail"]),
        ),
        r"no such module|differ from the model's",
        "tail",
    ),
]


# --- running a case -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What loading one corrupted file did; ``problems`` is empty when it was refused cleanly."""

    message: str
    problems: tuple[str, ...]


def valid_file(directory: Path) -> Path:
    path = directory / "adapters"
    save_adapters(adapted_model(seed=1), path)
    return path


def run_case(case: Case, target: str, directory: Path) -> Outcome:
    path = case.corrupt(valid_file(directory))
    model = TARGETS[target]()
    before = snapshot(model)
    try:
        load_adapters(model, path)
    except ValueError as err:
        message, problems = str(err), []
        if str(path) not in message:
            problems.append("message does not name the file")
        if case.module is not None and repr(case.module) not in message:
            problems.append(f"message does not name module {case.module!r}")
        if not re.search(case.problem, message, flags=re.IGNORECASE):
            problems.append(f"message does not match {case.problem!r}")
    except Exception as err:  # any other exception is a failure of the case, recorded by the table
        message, problems = f"{type(err).__name__}: {err}", [f"raised {type(err).__name__}, not ValueError"]
    else:
        message, problems = "", ["accepted"]
    changed = changes(before, snapshot(model))
    if changed:
        problems.append(f"model changed: {changed[:4]}{' ...' if len(changed) > 4 else ''}")
    return Outcome(message.replace(str(path), "<file>"), tuple(problems))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_corrupted_file_is_refused_and_model_unchanged(tmp_path: Path, case: Case, target: str) -> None:
    outcome = run_case(case, target, tmp_path)
    assert not outcome.problems, f"{case.name}: {'; '.join(outcome.problems)}. Message: {outcome.message}"


# --- valid files --------------------------------------------------------------------------------------------------


def _as_float32(tensors: dict[str, torch.Tensor]) -> None:
    tensors.update({k: t.to(torch.float32) for k, t in tensors.items()})


VALID: dict[str, Corruption] = {
    "the file as saved": lambda p: p,
    "negative scale": edit(config=lambda c: c["proj"].update(scale=-c["proj"]["scale"])),
    "integer scale": edit(config=lambda c: c["proj"].update(scale=2)),
    "float32 tensors into a float64 model": edit(tensors=_as_float32),
    "extra top-level config key": edit(metadata=lambda m: m.update(peft_type="KRONA")),
}


def reference_model(path: Path) -> nn.Module:
    """The model the file describes, built without load_adapters: the adapted model with the file's values."""
    tensors, config = _read(path)
    model = adapted_model(seed=1)
    with torch.no_grad():
        for name, host in adapter_hosts(model).items():
            adapter = host.adapter
            adapter.scale = float(config["adapters"][name]["scale"])
            adapter.kron_a.weight.copy_(tensors[f"{name}.kron_a"])
            adapter.kron_b.weight.copy_(tensors[f"{name}.kron_b"])
            if adapter.res_scale is not None:
                adapter.res_scale.copy_(tensors[f"{name}.res_scale"])
        for key, p in model.head.copies["default"].named_parameters():
            p.copy_(tensors[f"head.{key}"])
    return model


def run_valid(name: str, target: str, directory: Path) -> Outcome:
    path = VALID[name](valid_file(directory))
    expected = reference_model(path)
    model = TARGETS[target]()
    try:
        report = load_adapters(model, path)
    except Exception as err:  # recorded as a failure
        return Outcome(f"{type(err).__name__}: {err}".replace(str(path), "<file>"), ("refused",))
    problems = [f"differs from the file: {diff}" for diff in changes(snapshot(expected), snapshot(model))[:4]]
    if not torch.equal(model.eval()(X), expected.eval()(X)):
        problems.append("outputs differ")
    expected_trainable = sum(p.numel() for h in adapter_hosts(model).values() for p in h.adapter.parameters())
    if report.trainable_params != expected_trainable + sum(
        p.numel() for p in model.head.copies["default"].parameters()
    ):
        problems.append("trainable parameters are not exactly the adapters and the saved head")
    return Outcome("", tuple(problems))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(VALID))
def test_valid_file_loads_exactly(tmp_path: Path, name: str, target: str) -> None:
    outcome = run_valid(name, target, tmp_path)
    assert not outcome.problems, f"{name}: {'; '.join(outcome.problems)}. {outcome.message}"


def test_saved_file_round_trips_bit_for_bit(tmp_path: Path) -> None:
    path = valid_file(tmp_path)
    model = base_model()
    load_adapters(model, path)
    again = tmp_path / "again"
    save_adapters(model, again)
    first, second = _read(path), _read(again)
    assert first[1] == second[1]
    assert first[0].keys() == second[0].keys()
    assert all(_bits(first[0][k]) == _bits(second[0][k]) for k in first[0])


def _huge_a(model: nn.Module) -> None:
    with torch.no_grad():
        model.proj.adapter.kron_a.weight[0, 0] = 1e300


def _huge_scale(model: nn.Module) -> None:
    model.mlp.adapter.scale = 1e39


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_huge_a, r"module 'proj': tensor 'proj\.kron_a' has 1 non-finite value.*once cast to torch\.float32"),
        (_huge_scale, r"module 'mlp': Invalid scale: 1e\+39; overflows torch\.float32"),
    ],
)
def test_values_must_stay_finite_in_the_model_dtype(
    tmp_path: Path, change: Callable[[nn.Module], None], problem: str
) -> None:
    model = adapted_model(seed=1)
    change(model)
    path = tmp_path / "adapters"
    save_adapters(model, path)  # valid in float64
    target = base_model().float()
    before = snapshot(target)
    with pytest.raises(ValueError, match=problem):
        load_adapters(target, path)
    assert changes(before, snapshot(target)) == []


def test_save_refuses_a_file_that_load_would_refuse(tmp_path: Path) -> None:
    model = adapted_model(seed=1)
    with torch.no_grad():
        model.ffn.adapter.kron_b.weight[0, 0] = float("nan")
    path = tmp_path / "adapters"
    with pytest.raises(ValueError, match=r"Cannot save adapters to .*module 'ffn'.*non-finite"):
        save_adapters(model, path)
    assert not path.exists()


def test_load_into_merged_adapters_is_refused(tmp_path: Path) -> None:
    model = base_model()
    add_kron_adapters(model, target_modules=["proj", "head"])
    path = tmp_path / "adapters"
    save_adapters(model, path)
    merge_adapters(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapters"):
        load_adapters(model, path)
    assert changes(before, snapshot(model)) == []


def test_new_adapters_take_the_training_mode_of_their_module(tmp_path: Path) -> None:
    path = valid_file(tmp_path)
    model = base_model().eval()
    load_adapters(model, path)
    assert not any(m.training for m in model.modules())


# --- the reliability table ----------------------------------------------------------------------------------------


def _cell(outcome: Outcome) -> str:
    return "refused cleanly" if not outcome.problems else "**failed**: " + "; ".join(outcome.problems)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reliability_table() -> str:
    """Run every case against every target model; the markdown page of docs/reliability_adapters.md."""
    results: dict[str, dict[str, Outcome]] = {}
    valid: dict[str, dict[str, Outcome]] = {}
    for target in TARGETS:
        for case in CASES:
            with tempfile.TemporaryDirectory() as directory:
                results.setdefault(case.name, {})[target] = run_case(case, target, Path(directory))
        for name in VALID:
            with tempfile.TemporaryDirectory() as directory:
                valid.setdefault(name, {})[target] = run_valid(name, target, Path(directory))
    lines = [
        "# Reliability: KronA adapter directories",
        "",
        "Generated by `PYTHONPATH=src python tests/nn/test_adapter_files.py --table` from the cases of",
        "`tests/nn/test_adapter_files.py` (the same cases the tests run); do not edit by hand.",
        "",
        "Each case saves a valid adapter directory (`krona_config.json` + `krona_model.safetensors`: one `krona`,",
        "one `krona_block_res` and one `krona_block` adapter, and the head in `modules_to_save`), corrupts it one",
        "way and calls `load_adapters` on a fresh base model and on a model that already has matching adapters.",
        "*Refused cleanly*: a `ValueError` whose message names the directory, the module (where the problem has",
        "one) and the problem, and the model bit-identical afterwards (every parameter and buffer with its dtype",
        "and `requires_grad`, the module tree with its types and train/eval modes, the adapters' scales, merged,",
        "active and disabled state, and the saved modules' copies).",
        "",
        "The scale `s` of `ΔW = s (A ⊗ B)` must be a finite non-zero number: with `s = 0` the gradients of `A` and",
        "`B` vanish, so the adapter could never train. A negative `s` is valid (`s (A ⊗ B) = |s| ((-A) ⊗ B)`).",
        "In the adapter's dtype `s` must be representable and `|s| ‖A‖∞ ‖B‖∞ = ‖ΔW‖∞` at most the largest value,",
        "so that `ΔW` maps inputs in `[-1, 1]` to finite outputs (see `kronfac/nn/adapter_files.py`).",
        "",
        "| target model | cases tried | refused cleanly | failed |",
        "|---|---:|---:|---:|",
    ]
    for target in TARGETS:
        clean = sum(not r[target].problems for r in results.values())
        lines.append(f"| {target} | {len(results)} | {clean} | {len(results) - clean} |")
    lines += ["", "Valid files (they must load exactly: parameters, scales and outputs equal to the saved model):", ""]
    lines += ["| target model | files tried | loaded exactly | failed |", "|---|---:|---:|---:|"]
    for target in TARGETS:
        exact = sum(not r[target].problems for r in valid.values())
        lines.append(f"| {target} | {len(valid)} | {exact} | {len(valid) - exact} |")
    first, second = TARGETS
    lines += ["", "## Cases", "", f"| case | {first} | {second} | message ({first}) |", "|---|---|---|---|"]
    for name, outcome in results.items():
        row = [name, _cell(outcome[first]), _cell(outcome[second]), f"`{outcome[first].message}`"]
        lines.append("| " + " | ".join(_escape(cell) for cell in row) + " |")
    lines += ["", "| valid file | " + " | ".join(TARGETS) + " |", "|---|---|---|"]
    for name, outcome in valid.items():
        row = [
            name,
            *("loaded exactly" if not o.problems else "**failed**: " + "; ".join(o.problems) for o in outcome.values()),
        ]
        lines.append("| " + " | ".join(_escape(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help=f"rewrite {TABLE.relative_to(TABLE.parents[1])}")
    args = parser.parse_args()
    table = reliability_table()
    if args.table:
        TABLE.write_text(table)
        print(f"wrote {TABLE}")
    else:
        print(table)


if __name__ == "__main__":
    main()
