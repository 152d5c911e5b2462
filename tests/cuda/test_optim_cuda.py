"""The optimizers on a CUDA device (skipped without one, see conftest.py)."""

from __future__ import annotations

import torch
from torch import nn

import kronfac


def test_adafisher_cuda_steps_match_cpu() -> None:
    def build() -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
            nn.Linear(3 * 6 * 6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4),
        )  # fmt: skip

    data = [(torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))) for _ in range(5)]
    finals = []
    for device in ("cpu", "cuda"):
        model = build().to(device)
        opt = kronfac.AdaFisherW(model, lr=1e-2, weight_decay=0.1, factor_every=2, factor_dtype=torch.float64)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        assert all(b.a_diag.device.type == device for b in (layer.block for layer in opt.layers.values()))
        finals.append([p.detach().cpu() for p in model.parameters()])
    for p_cpu, p_cuda in zip(*finals):
        torch.testing.assert_close(p_cuda, p_cpu, atol=1e-9, rtol=1e-7)
