"""Pretrain a small GPT-2 (from a config, bytes as tokens) on standard-library source for a few CPU-minutes.

``python benchmarks/adapters/pretrain.py [--seconds 240]`` writes ``benchmarks/adapters/.cache/pretrained``
(``save_pretrained``; not committed: the recipe is) and ``pretrain.json`` (steps, loss, time) next to this file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from data import CONTEXT, pretraining_corpus

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / ".cache" / "pretrained"
CONFIG = {
    "vocab_size": 256,
    "n_positions": CONTEXT,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    corpus = pretraining_corpus()
    held = corpus[-200_000:]
    corpus = corpus[:-200_000]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < args.seconds:
        idx = torch.randint(0, len(corpus) - CONTEXT, (args.batch,), generator=generator)
        batch = torch.stack([corpus[i : i + CONTEXT] for i in idx.tolist()])
        lr = 3e-3 * min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        windows = held[: (len(held) // CONTEXT) * CONTEXT].reshape(-1, CONTEXT)[:256]
        held_loss = float(model(windows, labels=windows).loss)
    CHECKPOINT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CHECKPOINT)
    record = {
        "config": CONFIG,
        "steps": step,
        "batch": args.batch,
        "seconds": round(seconds, 1),
        "train_loss_last100": sum(losses[-100:]) / len(losses[-100:]),
        "held_out_loss_nats_per_byte": held_loss,
        "params": sum(p.numel() for p in model.parameters()),
    }
    (HERE / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(record)


if __name__ == "__main__":
    main()
