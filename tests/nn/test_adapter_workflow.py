"""The PEFT-style workflow of KronA adapters on transformers models built from configs: targets (names, regex,
"all-linear"), named adapters, disabling, modules_to_save, directories, merge_and_unload + save_pretrained."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kronfac
from kronfac import nn as knn
from kronfac.nn.adapter_files import CONFIG_FILE

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for host in knn.adapter_hosts(model).values():
            for adapter in host.adapters.values():
                for p in adapter.parameters():
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_targets_by_regex_suffix_and_all_linear() -> None:
    per_layer = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    report = knn.add_kron_adapters(gpt2(), target_modules="all-linear")
    assert [a.name for a in report.adapters] == [f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer]
    report = knn.add_kron_adapters(gpt2(), target_modules=r"transformer\.h\.\d+\.attn\.c_attn")
    assert [a.name for a in report.adapters] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert report.adapters[0].factor_shapes == ((8, 4), (6, 4))  # Conv1D 16 -> 48
    report = knn.add_kron_adapters(gpt2(), target_modules=["c_fc"])
    assert len(report.adapters) == 2
    with pytest.raises(ValueError, match="regular expression 'c_fc' matches no module name in full"):
        knn.add_kron_adapters(gpt2(), target_modules="c_fc")
    report = knn.add_kron_adapters(gpt2(), target_modules=["mlp"], variant="krona_block_res", factors=4)
    assert [a.variant for a in report.adapters] == ["krona_block_res"] * 2  # GPT2MLP: Conv1D 16 -> 64 -> 16


def test_gpt2_merge_and_unload_round_trips_save_pretrained_exactly(tmp_path: Path) -> None:
    model = gpt2()
    keys = set(model.state_dict())
    knn.add_kron_adapters(model, target_modules="all-linear", scale=0.5)
    randomize(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(gpt2()))
    merged = knn.merge_and_unload(model)
    assert type(merged) is transformers.GPT2LMHeadModel and set(merged.state_dict()) == keys
    assert not knn.adapter_hosts(merged)
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    again, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(again.eval()), logits(merged))
    for key, value in merged.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_bert_with_a_trained_head_saves_loads_and_merges(tmp_path: Path) -> None:
    model = bert().train()
    report = knn.add_kron_adapters(model, target_modules="all-linear", modules_to_save=["classifier"])
    assert "classifier" not in [a.name for a in report.adapters]
    assert report.modules_to_save == ["classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.KronfacWarning)
        opt = kronfac.KFAC(model, lr=0.05, damping=1e-2)
    preconditioned = set(opt.layers)
    assert "classifier.copies.default" in preconditioned
    assert "bert.encoder.layer.0.attention.self.query.adapters.default.kron_a" in preconditioned
    labels = torch.tensor([0, 2])
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=labels).loss.backward()
        opt.step()
    opt.close()
    model.eval()
    trained = logits(model)
    knn.save_adapters(model, tmp_path / "adapter")
    fresh = bert()
    knn.load_adapters(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), trained)
    with pytest.raises(ValueError, match=r"trained on a transformers.*BertForSequenceClassification"):
        knn.load_adapters(gpt2(), tmp_path / "adapter")
    merged = knn.merge_and_unload(fresh)
    assert isinstance(merged.classifier, nn.Linear)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(again), logits(merged))
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=1e-5)


def test_named_adapters_switch_disable_and_delete(tmp_path: Path) -> None:
    model = gpt2()
    base = logits(model)
    knn.add_kron_adapters(model, target_modules=["c_attn"], adapter_name="a")
    knn.add_kron_adapters(model, target_modules=["c_fc", "c_attn"], adapter_name="b", factors=4)
    randomize(model)
    assert knn.adapter_names(model) == ["a", "b"] and knn.active_adapters(model) == ["a"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    out_a = logits(model)
    knn.set_adapter(model, "b")
    out_b = logits(model)
    assert all(".adapters.b." in n for n, p in model.named_parameters() if p.requires_grad)
    assert not torch.allclose(out_a, out_b)
    with knn.adapters_disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), out_b)
    knn.disable_adapters(model)
    assert torch.equal(logits(model), base)
    knn.enable_adapters(model)
    knn.set_adapter(model, ["a", "b"])
    both = logits(model)
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)

    knn.save_adapters(model, tmp_path)
    assert (tmp_path / "a" / CONFIG_FILE).is_file() and (tmp_path / "b" / CONFIG_FILE).is_file()
    with pytest.raises(ValueError, match=r"subdirectories: \['a', 'b'\]"):
        knn.load_adapters(gpt2(), tmp_path)
    fresh = gpt2()
    knn.load_adapters(fresh, tmp_path / "a")
    knn.load_adapters(fresh, tmp_path / "b")
    assert knn.active_adapters(fresh) == ["a"]
    assert torch.equal(logits(fresh), out_a)
    knn.set_adapter(fresh, "b")
    assert torch.equal(logits(fresh), out_b)

    knn.delete_adapter(model, "b")
    assert knn.adapter_names(model) == ["a"]
    assert isinstance(model.transformer.h[0].mlp.c_fc, transformers.pytorch_utils.Conv1D)  # only b was there
    assert torch.equal(logits(model), out_a)
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        knn.add_kron_adapters(model, target_modules=["c_attn"], adapter_name="a")
    with pytest.raises(ValueError, match="they do not nest"):
        knn.add_kron_adapters(model, target_modules=["attn"], variant="krona_block", adapter_name="c")


def test_merged_adapters_refuse_switching_and_disabling() -> None:
    model = gpt2()
    knn.add_kron_adapters(model, target_modules=["c_attn"])
    randomize(model)
    adapted = logits(model)
    knn.merge_adapters(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        knn.disable_adapters(model)
    with pytest.raises(ValueError, match="merged"):
        knn.set_adapter(model, "default")
    knn.unmerge_adapters(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
