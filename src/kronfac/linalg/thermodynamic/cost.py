"""Wall-clock cost model: per-step time of Adam, digital K-FAC and thermodynamic K-FAC as layers widen.

Donatella et al. 2025 ("Scalable Thermodynamic Second-order Optimization") argue that offloading K-FAC's
inversions to a thermodynamic solver turns the O(n^3) per-layer cost of digital K-FAC into O(n^2 κ^2) at most,
so that the advantage grows with the layer width n. This module makes that argument quantitative with every
assumption a named field of :class:`CostModel`. Per layer (factor sizes ``d_in``, ``d_out``, ``T`` tokens per
step), in seconds per optimizer step:

* shared by all methods: forward + backward ``6 T d_in d_out / matmul_flops``; the elementwise update
  (momentum / Adam moments) ``adam_bytes_per_param * d_in d_out / memory_bandwidth``;
* digital K-FAC: factors ``2 T (d_in^2 + d_out^2) / matmul_flops / factor_every``; eigendecompositions
  ``eigh_flop_constant (d_in^3 + d_out^3) / inverse_flops / inverse_every``; preconditioning
  ``2 d_in d_out (d_in + d_out) / matmul_flops``;
* thermodynamic method 1 (device inverses, digital preconditioning): the factors and preconditioning as
  above; per factor of size n, device time ``τ κ (b + (n + 1) / ε^2)`` (burn-in of ``b`` relaxation times
  ``κ τ``, then ``(n+1)/ε^2`` effective samples, one per relaxation time, for a sample covariance with relative
  Frobenius error ε) and I/O of the upper triangle in and out, both divided by ``inverse_every``;
* thermodynamic method 2 (device solves every step): factors as above; programming the damped factors every
  ``inverse_every`` steps; ``d_in`` solves on ``G`` and ``d_out`` on ``A``, each ``τ (κ b + 6 κ^2 / (β ε^2))``
  (burn-in, then time averaging: with unit-range inputs the averaged error of the worst-aligned right-hand side
  is ``6 κ^2 / (β T)`` in relative squared norm), and the gradient sent and read back twice.

Per layer this is O(n^3) for digital K-FAC, O(n κ / ε^2) device time plus O(n^2) I/O plus the O(n^3) matmuls
(at matmul speed) for method 1, and O(n κ^2 / (β ε^2)) device time plus O(n^2) I/O for method 2, within the
paper's O(n^2 κ^2). A factor larger than ``hardware.solver_dim`` is processed as diagonal blocks, one after
the other. The defaults are our assumptions, not measurements; the CLI prints them next to every table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kronfac.linalg.thermodynamic.hardware import HardwareModel, block_slices

__all__ = [
    "METHODS",
    "WORKLOADS",
    "CostModel",
    "Layer",
    "crossover_width",
    "gnn_like",
    "square_layer",
    "sweep",
    "vit_like",
]

#: Methods whose per-step time the model predicts.
METHODS = ("adam", "kfac", "thermo1", "thermo2")


@dataclass(frozen=True)
class Layer:
    """A dense layer as the cost model sees it: factor sizes, tokens through it per step, how many there are."""

    d_in: int
    d_out: int
    tokens: int
    count: int = 1
    name: str = ""


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


@dataclass(kw_only=True)
class CostModel:
    """Named assumptions of the per-step wall-clock model (see the module docstring for the formulas).

    Args:
        matmul_flops: sustained dense matmul rate of the digital accelerator, FLOP/s (our assumption: 1e14,
            about a third of an H100's dense bf16 peak).
        inverse_flops: sustained rate of symmetric eigendecompositions, FLOP/s (our assumption: 1e12; GPU
            eigensolvers run far below matmul peak).
        eigh_flop_constant: FLOPs of an eigendecomposition with eigenvectors per n^3 (about 9).
        memory_bandwidth: bytes/s for the elementwise optimizer update (our assumption: 2e12).
        adam_bytes_per_param: bytes moved per parameter by the elementwise update (read p, g, m, v, write p, m,
            v in float32: 28).
        factor_every: K-FAC factor update interval.
        inverse_every: K-FAC inverse (method 2: programming) interval.
        condition_number: κ of the damped factors on the device (our assumption: 100; damping bounds it).
        target_error: relative error ε asked of each device read-out (our assumption: 0.1; our benchmark shows
            how much error K-FAC tolerates).
        burn_in: relaxation times ``κ τ`` waited before sampling.
        beta: signal-to-thermal-noise ratio β of unit-range inputs (method 2 only; our assumption: 1e3).
        hardware: time constant τ, I/O bandwidth, bit widths and solver size (:class:`HardwareModel`;
            here 1 ns, 100 Gbit/s, 8-bit in and out, unlimited size by default).
    """

    matmul_flops: float = 1e14
    inverse_flops: float = 1e12
    eigh_flop_constant: float = 9.0
    memory_bandwidth: float = 2e12
    adam_bytes_per_param: float = 28.0
    factor_every: int = 1
    inverse_every: int = 10
    condition_number: float = 100.0
    target_error: float = 0.1
    burn_in: float = 5.0
    beta: float = 1e3
    hardware: HardwareModel = field(
        default_factory=lambda: HardwareModel(input_bits=8, output_bits=8, time_constant=1e-9)
    )

    def __post_init__(self) -> None:
        for name in ("matmul_flops", "inverse_flops", "eigh_flop_constant", "memory_bandwidth", "beta"):
            _positive(name, getattr(self, name))
        _positive("adam_bytes_per_param", self.adam_bytes_per_param)
        for name in ("factor_every", "inverse_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if not (math.isfinite(self.condition_number) and self.condition_number >= 1):
            raise ValueError(f"Invalid condition_number: {self.condition_number} (must be >= 1)")
        if not (0 < self.target_error < 1):
            raise ValueError(f"Invalid target_error: {self.target_error} (must be in (0, 1))")
        if not (math.isfinite(self.burn_in) and self.burn_in >= 0):
            raise ValueError(f"Invalid burn_in: {self.burn_in} (must be >= 0)")

    def assumptions(self) -> dict[str, Any]:
        """All assumptions as a flat dict (hardware fields prefixed ``hardware.``)."""
        flat = {k: v for k, v in asdict(self).items() if k != "hardware"}
        flat.update({f"hardware.{k}": v for k, v in asdict(self.hardware).items()})
        return flat

    def _blocks(self, n: int) -> list[int]:
        return [b.stop - b.start for b in block_slices(n, self.hardware.solver_dim)]

    def device_inverse_seconds(self, n: int) -> float:
        """Device time to estimate the inverse of one ``n x n`` factor (sum over its blocks)."""
        tau, kappa, eps = self.hardware.time_constant, self.condition_number, self.target_error
        return sum(tau * kappa * (self.burn_in + (m + 1) / eps**2) for m in self._blocks(n))

    def device_solve_seconds(self, n: int) -> float:
        """Device time to solve one right-hand side against an ``n x n`` factor (sum over its blocks)."""
        tau, kappa, eps = self.hardware.time_constant, self.condition_number, self.target_error
        per_block = tau * (kappa * self.burn_in + 6 * kappa**2 / (self.beta * eps**2))
        return per_block * len(self._blocks(n))

    def _matrix_bits(self, n: int, bits: int) -> float:
        return sum(m * (m + 1) / 2 for m in self._blocks(n)) * bits

    def layer_terms(self, layer: Layer) -> dict[str, float]:
        """Seconds per step of every cost term for one instance of ``layer``."""
        d_in, d_out, tokens = layer.d_in, layer.d_out, layer.tokens
        hw, every = self.hardware, self.inverse_every
        params = d_in * d_out
        in_bits, out_bits = hw.input_value_bits, hw.output_value_bits
        return {
            "forward_backward": 6 * tokens * params / self.matmul_flops,
            "elementwise_update": self.adam_bytes_per_param * params / self.memory_bandwidth,
            "factors": 2 * tokens * (d_in**2 + d_out**2) / self.matmul_flops / self.factor_every,
            "eigh": self.eigh_flop_constant * (d_in**3 + d_out**3) / self.inverse_flops / every,
            "precondition": 2 * params * (d_in + d_out) / self.matmul_flops,
            "thermo1_device": (self.device_inverse_seconds(d_in) + self.device_inverse_seconds(d_out)) / every,
            "thermo1_io": (self._matrix_bits(d_in, in_bits + out_bits) + self._matrix_bits(d_out, in_bits + out_bits))
            / hw.io_bandwidth
            / every,
            "thermo2_device": d_in * self.device_solve_seconds(d_out) + d_out * self.device_solve_seconds(d_in),
            "thermo2_io": (
                (self._matrix_bits(d_in, in_bits) + self._matrix_bits(d_out, in_bits)) / every
                + 2 * params * (in_bits + out_bits)
            )
            / hw.io_bandwidth,
        }

    def layer_times(self, layer: Layer) -> dict[str, float]:
        """Seconds per step of each method for one instance of ``layer``."""
        t = self.layer_terms(layer)
        base = t["forward_backward"] + t["elementwise_update"]
        return {
            "adam": base,
            "kfac": base + t["factors"] + t["eigh"] + t["precondition"],
            "thermo1": base + t["factors"] + t["thermo1_device"] + t["thermo1_io"] + t["precondition"],
            "thermo2": base + t["factors"] + t["thermo2_device"] + t["thermo2_io"],
        }

    def step_times(self, layers: list[Layer]) -> dict[str, float]:
        """Seconds per step of each method for a whole layer list (layers run one after the other)."""
        totals = dict.fromkeys(METHODS, 0.0)
        for layer in layers:
            for method, seconds in self.layer_times(layer).items():
                totals[method] += layer.count * seconds
        return totals


def square_layer(width: int, tokens: int = 1024) -> list[Layer]:
    """One ``width x width`` layer seeing ``tokens`` rows per step: the cleanest view of the scaling."""
    return [Layer(width, width, tokens, name="square")]


def vit_like(
    width: int = 384, depth: int = 12, mlp_ratio: int = 4, batch: int = 1024, image: int = 224, patch: int = 16
) -> list[Layer]:
    """Layers of a ViT (defaults: ViT-S/16 on 224px ImageNet, batch 1024, as in the AlgoPerf ViT workload the
    paper's vision case study uses; our reading). Factor sizes include the bias row of ``A``."""
    tokens = batch * ((image // patch) ** 2 + 1)
    hidden = mlp_ratio * width
    return [
        Layer(3 * patch * patch + 1, width, batch * (image // patch) ** 2, name="patch_embed"),
        Layer(width + 1, 3 * width, tokens, depth, "qkv"),
        Layer(width + 1, width, tokens, depth, "attn_out"),
        Layer(width + 1, hidden, tokens, depth, "mlp_in"),
        Layer(hidden + 1, width, tokens, depth, "mlp_out"),
        Layer(width + 1, 1000, batch, name="head"),
    ]


def gnn_like(
    width: int = 256,
    steps: int = 5,
    graphs: int = 512,
    nodes_per_graph: int = 26,
    edges_per_graph: int = 56,
    tasks: int = 128,
) -> list[Layer]:
    """Layers of a graph network (defaults: the AlgoPerf OGBG-molpcba GNN of the paper's graph case study, our
    reading: latent 256, 5 message-passing steps, each with two-layer edge, node and global MLPs)."""
    nodes, edges = graphs * nodes_per_graph, graphs * edges_per_graph
    return [
        Layer(9 + 1, width, nodes, name="node_encoder"),
        Layer(3 + 1, width, edges, name="edge_encoder"),
        Layer(4 * width + 1, width, edges, steps, "edge_mlp_in"),
        Layer(width + 1, width, edges, steps, "edge_mlp_out"),
        Layer(3 * width + 1, width, nodes, steps, "node_mlp_in"),
        Layer(width + 1, width, nodes, steps, "node_mlp_out"),
        Layer(3 * width + 1, width, graphs, steps, "global_mlp_in"),
        Layer(width + 1, width, graphs, steps, "global_mlp_out"),
        Layer(width + 1, tasks, graphs, name="decoder"),
    ]


#: Built-in layer lists, each a function of the width.
WORKLOADS: dict[str, Callable[[int], list[Layer]]] = {
    "square": square_layer,
    "vit": lambda width: vit_like(width=width),
    "gnn": lambda width: gnn_like(width=width),
}


def sweep(model: CostModel, workload: str, widths: list[int]) -> list[dict[str, float]]:
    """Per-step seconds of each method and the speedups of thermodynamic K-FAC, one row per width."""
    if workload not in WORKLOADS:
        raise ValueError(f"Unknown workload {workload!r}; known: {sorted(WORKLOADS)}")
    rows = []
    for width in widths:
        times = model.step_times(WORKLOADS[workload](width))
        rows.append(
            {
                "width": float(width),
                **times,
                "speedup1_vs_kfac": times["kfac"] / times["thermo1"],
                "speedup2_vs_kfac": times["kfac"] / times["thermo2"],
                "thermo1_vs_adam": times["thermo1"] / times["adam"],
                "kfac_vs_adam": times["kfac"] / times["adam"],
            }
        )
    return rows


def crossover_width(
    model: CostModel, workload: str = "square", method: str = "thermo1", max_width: int = 1 << 22
) -> int | None:
    """Width from which on ``method`` is predicted faster per step than digital K-FAC.

    Evaluates the widths 1, 2, 4, ... up to ``max_width``, takes the last one where ``method`` loses (small
    widths can win spuriously when fixed-size layers such as a ViT's patch embedding dominate), and bisects
    between it and the next. Returns ``None`` if ``method`` still loses at ``max_width``, 1 if it never loses.
    """
    if method not in ("thermo1", "thermo2"):
        raise ValueError(f"Invalid method: {method!r} (must be 'thermo1' or 'thermo2')")
    if workload not in WORKLOADS:
        raise ValueError(f"Unknown workload {workload!r}; known: {sorted(WORKLOADS)}")

    def wins(width: int) -> bool:
        times = model.step_times(WORKLOADS[workload](width))
        return times[method] < times["kfac"]

    grid = [1 << k for k in range(max_width.bit_length()) if 1 << k <= max_width]
    losing = [width for width in grid if not wins(width)]
    if not losing:
        return 1
    low = losing[-1]
    if low == grid[-1]:
        return None
    high = 2 * low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if wins(mid) else (mid, high)
    return high
