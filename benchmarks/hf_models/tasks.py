"""The two Hugging Face tasks of ``benchmarks/hf_models``: data read offline from the installed standard library,
models built from configs (never downloaded).

* ``gpt2-stdlib``: a tiny ``GPT2LMHeadModel`` (tied ``wte``/``lm_head``, ``Conv1D`` layers) as a character language
  model on the standard library's top-level ``.py`` files (``kronfac.bench.data.load_stdlib_text``: sorted file
  list, first 80% of the text trains, next 10% validates, last 10% tests). Metric: validation loss in nats/char.
* ``bert-stdlib-pkg``: a tiny ``BertForSequenceClassification`` that tells which of eight standard-library packages
  a 32-token source snippet comes from. Tokens are identifiers and punctuation (a regex), the vocabulary the 2,000
  most frequent training tokens; each package's text is split 80/10/10 in file order (so the splits share few
  files) and every class gets the same number of snippets in every split, so the majority class is 1/8.
"""

from __future__ import annotations

import collections
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kronfac.bench.data import load_stdlib_text

__all__ = ["PACKAGES", "HFTask", "bert_task", "gpt2_task"]

#: The classes of the BERT task: packages of CPython 3.10-3.13 with at least 180 kB of source each.
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PAD, _CLS, _UNK = 0, 1, 2


@dataclass
class HFTask:
    """A task: splits, a model builder, the training loss and the evaluation.

    ``kind`` is ``"lm"`` (metric: validation loss, lower is better) or ``"cls"`` (metric: accuracy, higher is
    better); ``loss_average`` is the ``loss_average`` kronfac needs for this task's loss.
    """

    name: str
    kind: str
    description: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    build: Callable[[], nn.Module]
    batch_size: int
    loss_average: str
    config: dict

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(input_ids=x).logits

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = self.logits(model, x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, chunk: int = 256) -> dict[str, float]:
        """Mean loss (per token for the LM) and accuracy over ``x``, in eval mode."""
        was_training = model.training
        model.eval()
        loss, correct, count = 0.0, 0, 0
        for i in range(0, len(x), chunk):
            logits = self.logits(model, x[i : i + chunk])
            logits, target = logits.reshape(-1, logits.shape[-1]), y[i : i + chunk].reshape(-1)
            loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        model.train(was_training)
        return {"loss": loss / count, "accuracy": correct / count}

    def majority_accuracy(self) -> float:
        """Accuracy of always predicting the most frequent training label, on the validation split."""
        majority = int(torch.bincount(self.y_train.reshape(-1)).argmax())
        return float((self.y_val == majority).float().mean())


def gpt2_task(*, num_chars: int = 300_000, seq_len: int = 64, width: int = 64, layers: int = 2) -> HFTask:
    from transformers import GPT2Config, GPT2LMHeadModel

    split, vocab = load_stdlib_text(num_chars=num_chars, seq_len=seq_len)
    config = {"vocab": len(vocab), "n_positions": seq_len, "n_embd": width, "n_layer": layers, "n_head": 4}

    def build() -> nn.Module:
        cfg = GPT2Config(
            vocab_size=len(vocab), n_positions=seq_len, n_embd=width, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)

    return HFTask(
        "gpt2-stdlib", "lm", f"GPT2LMHeadModel {layers}x{width}, char LM on {num_chars} chars of stdlib source",
        split.x_train, split.y_train, split.x_val, split.y_val, split.x_test, split.y_test,
        build, batch_size=16, loss_average="batch+sequence", config=config,
    )  # fmt: skip


def _package_tokens(root: Path, package: str) -> list[str]:
    files = sorted(
        f for f in (root / package).rglob("*.py") if not any(p.startswith("test") for p in f.relative_to(root).parts)
    )
    return [t for f in files for t in _TOKEN.findall(f.read_text(encoding="utf-8", errors="replace"))]


def bert_task(
    *, seq_len: int = 32, per_class: tuple[int, int, int] = (800, 100, 100), vocab_size: int = 2000, width: int = 64
) -> HFTask:
    from transformers import BertConfig, BertForSequenceClassification

    root = Path(sysconfig.get_paths()["stdlib"])
    tokens = {p: _package_tokens(root, p) for p in PACKAGES}
    counts = collections.Counter(t for ts in tokens.values() for t in ts[: int(0.8 * len(ts))])
    index = {t: i + 3 for i, (t, _) in enumerate(counts.most_common(vocab_size))}
    parts: dict[str, list[tuple[Tensor, int]]] = {"train": [], "val": [], "test": []}
    for label, package in enumerate(PACKAGES):
        ids = torch.tensor([index.get(t, _UNK) for t in tokens[package]])
        bounds = (0, int(0.8 * len(ids)), int(0.9 * len(ids)), len(ids))
        for k, (part, wanted) in enumerate(zip(parts, per_class)):
            chunk = ids[bounds[k] : bounds[k + 1]]
            windows = chunk[: len(chunk) // seq_len * seq_len].reshape(-1, seq_len)
            if len(windows) < wanted:
                raise RuntimeError(f"{package}: only {len(windows)} {part} snippets of {seq_len} tokens")
            pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(label))[:wanted]
            parts[part].append((windows[pick], label))

    def stack(part: str) -> tuple[Tensor, Tensor]:
        x = torch.cat([w for w, _ in parts[part]])
        y = torch.cat([torch.full((len(w),), label) for w, label in parts[part]])
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(len(x)))  # classes interleaved
        return torch.cat([torch.full((len(x), 1), _CLS), x], dim=1)[order], y[order]

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = stack("train"), stack("val"), stack("test")
    config = {"vocab": len(index) + 3, "hidden": width, "layers": 2, "heads": 4, "intermediate": 2 * width}

    def build() -> nn.Module:
        cfg = BertConfig(
            vocab_size=len(index) + 3, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * width, max_position_embeddings=seq_len + 1, num_labels=len(PACKAGES),
        )  # fmt: skip
        return BertForSequenceClassification(cfg)

    return HFTask(
        "bert-stdlib-pkg", "cls",
        f"BertForSequenceClassification 2x{width}: which of {len(PACKAGES)} stdlib packages a {seq_len}-token "
        f"snippet is from ({per_class[0]} train snippets per class)",
        x_tr, y_tr, x_va, y_va, x_te, y_te, build, batch_size=32, loss_average="batch", config=config,
    )  # fmt: skip
