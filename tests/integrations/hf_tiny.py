"""Tiny Hugging Face models built from configs, token data sets and helpers shared by the integration tests.

The models are small enough that a ``Trainer`` step takes milliseconds: GPT-2 (``Conv1D`` layers, ``wte`` tied to
``lm_head``) and BERT for sequence classification. The data sets carry ``position_ids`` of shape ``(seq,)`` per
sample, so a batch has them per sample: the models' default position ids are one row broadcast over the batch,
which gives the position embedding the gradient summed over the batch instead of one row per sample (see
docs/integrations.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

VOCAB, SEQ = 32, 12


def tiny_gpt2(*, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 LM, width 16, 2 heads, vocabulary 32 (its ``lm_head`` is tied to ``wte``); seeded."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(dtype)


def tiny_bert(*, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    """A 2-layer BERT classifier (2 classes), width 16, 2 heads, vocabulary 32; seeded."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForSequenceClassification(config).to(dtype)


class TokenData(torch.utils.data.Dataset):
    """``n`` random token sequences; labels are the tokens (``task="lm"``) or whether the first token is in the
    upper half of the vocabulary (``task="classify"``)."""

    def __init__(self, task: str, n: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
        self.labels = self.tokens if task == "lm" else (self.tokens[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.labels[i], "position_ids": torch.arange(SEQ)}


def make_model(kind: str, **kw: Any) -> nn.Module:
    return tiny_gpt2(**kw) if kind == "gpt2" else tiny_bert(**kw)


def task_of(kind: str) -> str:
    return "lm" if kind == "gpt2" else "classify"


def loss_average_of(kind: str) -> str:
    """GPT-2's loss is a mean over every token, BERT's over the sequences of the batch."""
    return "batch+sequence" if kind == "gpt2" else "batch"


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def curvature_tensors(optimizer: Any) -> dict[str, Tensor]:
    """Every tensor of the optimizer's curvature state (per layer), keyed by its path."""
    out: dict[str, Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)

    walk("layers", optimizer.curvature_state_dict()["layers"])
    return out


def assert_same_curvature(got: Any, expected: Any, **tolerance: float) -> None:
    """The curvature states of two optimizers agree tensor by tensor: exactly without a tolerance; with one, the
    statistics only (K-FAC's eigendecompositions are left out: round-off may flip an eigenvector's sign)."""
    a, b = curvature_tensors(got), curvature_tensors(expected)
    assert a.keys() == b.keys()
    assert a, "no curvature was captured"
    for key in a:
        if tolerance and ".inverse." in key:
            continue
        if tolerance:
            torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tolerance)
        else:
            assert torch.equal(a[key], b[key]), key
