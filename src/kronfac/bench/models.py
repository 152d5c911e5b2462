"""Small models of the benchmark tasks: MLP, CNNs for 8x8 images and for mnist1d, an LSTM over mnist1d as a
sequence, and a character-level causal transformer.

Every model is built from layers kronfac preconditions: the transformer uses ``nn.Linear`` for every projection
(no fused ``in_proj_weight``), the 1-D CNN uses ``nn.Conv2d`` with ``1 x k`` kernels, and the LSTM is unrolled
over ``nn.Linear`` gate maps (its recurrent map is called once per time step, and K-FAC sums the rows of all the
calls, the independence-across-time approximation of Martens, Ba & Johnson 2018). LayerNorms get the
first-order update.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CharTransformer", "LinearLSTM", "cnn1d", "mlp", "small_cnn"]


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """Two 3x3 convolutions and a linear head for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


def cnn1d(length: int = 40, channels: int = 32, num_classes: int = 10) -> nn.Sequential:
    """Three 1-D convolutions (kernel 5, the last two with stride 2) and a linear head for length-``length``
    signals, written as ``Conv2d`` over a ``1 x length`` image."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 1, length)),
        nn.Conv2d(1, channels, (1, 5), padding=(0, 2)),
        nn.ReLU(),
        nn.Conv2d(channels, channels, (1, 5), stride=(1, 2), padding=(0, 2)),
        nn.ReLU(),
        nn.Conv2d(channels, channels, (1, 5), stride=(1, 2), padding=(0, 2)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * ((length + 3) // 4), num_classes),
    )


class LinearLSTM(nn.Module):
    """A one-layer LSTM reading a ``(batch, time * input_size)`` signal ``input_size`` values per step; a linear
    head on the last state.

    The input map runs once over all time steps; the recurrent map ``hh`` once per step (ten steps of four values
    for mnist1d: one value per step costs 5x the time on a CPU for no gain in what the task measures).
    """

    def __init__(self, hidden: int = 64, num_classes: int = 10, input_size: int = 4) -> None:
        super().__init__()
        self.hidden, self.input_size = hidden, input_size
        self.ih = nn.Linear(input_size, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        gates_in = self.ih(x.reshape(n, -1, self.input_size))
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        for t in range(gates_in.shape[1]):
            i, f, g, o = (gates_in[:, t] + self.hh(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    """A GPT-style causal character model: token + position embeddings, pre-norm blocks, linear head."""

    def __init__(self, vocab: int, width: int = 64, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        # Positions expanded over the batch so that each sample is a row of the embedding's factors.
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
