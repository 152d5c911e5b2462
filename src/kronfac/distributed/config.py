"""``DistributedConfig``: how K-FAC shares curvature work across data-parallel ranks.

Strategies follow SPD-KFAC (Shi, Zhang and Li, "Accelerating Distributed K-FAC with Smart Parallelism of
Computing and Communication Tasks", ICDCS 2021) and KAISA (Pauloski et al., "KAISA: An Adaptive Second-Order
Optimizer Framework for Deep Neural Networks", SC 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kronfac.validation import check_bool, check_int, check_positive_int, check_range

__all__ = ["DistributedConfig", "Strategy"]

#: Default fusion bound: a 4 MiB message spends ~0.3 ms on a 100 Gb/s link, ~10x a typical start-up latency,
#: while a ResNet-50 step still yields several buckets to overlap with the backward pass.
DEFAULT_BUCKET_BYTES = 4 * 2**20
#: Factors of dimension <= 128 cost < 1 ms to decompose on a GPU; broadcasting their result would cost a
#: round trip each, so every rank inverts them itself (SPD-KFAC's "small tensors are computed redundantly").
DEFAULT_SMALL_FACTOR = 128
#: Seconds the collectives of one step (or one collective outside a step) may wait for the other ranks before a
#: DistributedTimeoutError is raised.
DEFAULT_TIMEOUT = 300.0
#: The ranks compare what must agree every 10 step() calls: K-FAC's default inverse_every, and one 8-byte
#: all-gather per 10 steps costs well under 0.1% of a step (docs/reliability_distributed.md measures it).
DEFAULT_CHECK_EVERY = 10


class Strategy(str, Enum):
    """``naive``: blocking all-reduce of every factor after backward, every rank inverts everything.
    ``spd``: pipelined, fused, load-balanced (SPD-KFAC)."""

    NAIVE = "naive"
    SPD = "spd"


@dataclass(kw_only=True)
class DistributedConfig:
    """Distributed K-FAC under ``torch.distributed`` (pass as ``KFAC(model, distributed=...)``).

    The process group must already be initialised (``torchrun`` + ``dist.init_process_group``). K-FAC talks on
    a group of its own (same ranks), so its collectives never interleave with DDP's gradient all-reduce.

    Args:
        strategy: ``"naive"`` or ``"spd"`` (see :class:`Strategy`).
        bucket_bytes: upper bound on the bytes of one fused all-reduce message (spd). Small buckets start
            communicating earlier in the backward pass; large ones pay the start-up latency α fewer times.
        small_factor_threshold: factors with dimension ``d <= small_factor_threshold`` are inverted on every
            rank; larger ones by one owner rank chosen by :class:`~kronfac.distributed.WorkAssignment`, which
            then broadcasts the result (spd).
        timeout: seconds the collectives of one ``step()`` may wait in all (outside a step: one collective)
            before :class:`DistributedTimeoutError` is raised (a dead or hung rank); building the optimizer waits
            at most as long for the other ranks. Pass a matching ``timeout=`` to ``init_process_group`` for
            DDP's own traffic.
        check_every: the ranks compare everything that must agree (layers, periods, options, each group's
            hyperparameters at the step, the step, the backward passes) at construction, at the first
            ``step()`` call and every ``check_every`` calls; a difference raises
            :class:`~kronfac.distributed.RankMismatchError` on every rank. ``0``: at construction only.
        learn_order: order the fused buffer by the order in which layers completed in the first curvature
            step (rank 0's), so buckets fill in backward order (spd); else reverse registration order.
        backend: backend of K-FAC's group (``"gloo"``, ``"nccl"``); ``None`` takes the default group's.
        shard_curvature: keep each layer's factors and inverse only on one owner rank, which computes the layer's
            direction and broadcasts it (``kronfac.distributed.placement``): per-rank curvature memory about
            1/ranks. ``None`` (default): when the model's parameters are FSDP2 shards and the method's blocks
            allow it (K-FAC, CG-FAC, without a correction); ``True`` requires that; ``False``: replicated.
    """

    strategy: Strategy | str = Strategy.SPD
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    small_factor_threshold: int = DEFAULT_SMALL_FACTOR
    timeout: float = DEFAULT_TIMEOUT
    check_every: int = DEFAULT_CHECK_EVERY
    learn_order: bool = True
    backend: str | None = None
    shard_curvature: bool | None = None

    def __post_init__(self) -> None:
        try:
            self.strategy = Strategy(self.strategy)
        except ValueError:
            raise ValueError(f"Invalid strategy: {self.strategy!r} (must be 'naive' or 'spd')") from None
        self.bucket_bytes = check_positive_int("bucket_bytes", self.bucket_bytes)
        self.small_factor_threshold = check_int("small_factor_threshold", self.small_factor_threshold, 0)
        self.timeout = check_range("timeout (seconds)", self.timeout, 0.0, low_open=True)
        self.learn_order = check_bool("learn_order", self.learn_order)
        self.check_every = check_int("check_every", self.check_every, 0)
        if self.shard_curvature is not None:
            self.shard_curvature = check_bool("shard_curvature", self.shard_curvature)
        if self.backend is not None and self.backend not in ("gloo", "nccl", "mpi", "ucc"):
            raise ValueError(f"Invalid backend: {self.backend!r} (must be None, 'gloo', 'nccl', 'mpi' or 'ucc')")
