"""The distributed K-FAC engine: plugs a :class:`DistributedConfig` strategy into a :class:`~kronfac.KFAC`.

Data-parallel ranks hold equal local batches; DDP averages their gradients. Each rank's batch statistics are
sums over its rows (``Σ a a^T`` with its row count; ``M_r Σ ∇_out ∇_out^T`` with its sample count, where
``∇_out = g / M_r`` is the output gradient of the local loss averaged over ``M_r`` local rows). Summing sums and
counts over ranks gives ``A = Σ_all a a^T / Σ_all rows`` and ``G = (1/M) Σ_all g g^T`` with ``M = Σ_r M_r``:
exactly the factors single-process K-FAC computes for the global batch whose loss is the mean over all
``W M_r`` rows (the loss DDP's averaged gradient belongs to). Inverses and steps then match too.

Strategies (Shi, Zhang and Li, ICDCS 2021; Pauloski et al., SC 2021):

- ``naive``: after backward, one blocking all-reduce per factor (full matrices), every rank inverts every
  factor;
- ``spd``: each layer's statistics are written into a fused buffer from the capture hook that completes them
  and sent bucket by bucket while backward continues (waited for only before the update); large factors are
  inverted once, by the rank :class:`WorkAssignment` names, and broadcast; small ones everywhere.
"""

from __future__ import annotations

import warnings
import zlib
from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kronfac.curvature.capture import TrackedLayer
from kronfac.curvature.factors import KroneckerFactors
from kronfac.distributed.assignment import FactorSpec, WorkAssignment
from kronfac.distributed.communicator import Communicator, FusionPlan, PipelinedAllReduce
from kronfac.distributed.config import DistributedConfig, Strategy
from kronfac.distributed.inverse_parts import FactorwiseInverse
from kronfac.distributed.payload import StatisticsPayload

if TYPE_CHECKING:
    from kronfac.optim.kfac import KFAC

__all__ = ["TIMING_KEYS", "DistributedKFAC"]

#: Keys of :attr:`DistributedKFAC.timings` (seconds of the last step).
TIMING_KEYS = ("forward_backward", "factor", "comm_wait", "inversion", "precondition", "step")


class DistributedKFAC:
    """Runs K-FAC's curvature work across ranks for one optimizer (built by ``KFAC(..., distributed=...)``).

    Args:
        optimizer: the K-FAC optimizer (its layers and capture are set up).
        config: the strategy.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: the ranks hold different models or configs.
        TypeError: a layer's block does not keep Kronecker factors.
    """

    def __init__(self, optimizer: KFAC, config: DistributedConfig) -> None:
        self.opt, self.config = optimizer, config
        self.comm = Communicator(timeout=config.timeout, backend=config.backend)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layers: list[TrackedLayer] = list(optimizer.layers.values())
        for layer in self.layers:
            if not isinstance(layer.block, KroneckerFactors):
                raise TypeError(f"kronfac: distributed K-FAC needs Kronecker factors; layer {layer.name!r} has none")
        self.spd = config.strategy is Strategy.SPD
        self._check_same_model()
        self.payloads = {
            layer.name: StatisticsPayload(self._block(layer), triangular=self.spd) for layer in self.layers
        }
        first = self._block(self.layers[0]) if self.layers else None
        self.dtype = first.dtype if first is not None else torch.float32
        self.device = next((p.device for layer in self.layers for p in layer.params), torch.device("cpu"))
        self.factorwise: FactorwiseInverse | None = None
        specs = []
        for layer in self.layers:
            block = self._block(layer)
            specs.append(FactorSpec(layer.name, "A", block.d_in, block.diagonal_a))
            specs.append(FactorSpec(layer.name, "G", block.d_out))
        threshold = config.small_factor_threshold
        self.assignment = WorkAssignment(specs, self.world_size, small_factor_threshold=threshold)
        if self.spd:
            if FactorwiseInverse.supports(optimizer.inverse_config):
                self.factorwise = FactorwiseInverse(optimizer.inverse_config)
            else:
                warnings.warn(
                    f"kronfac: no per-factor split for {type(optimizer.inverse_config).__name__}: every rank "
                    "inverts every factor (placement needs EighConfig or CholeskyConfig)",
                    UserWarning,
                    stacklevel=3,
                )
            order = [layer.name for layer in reversed(self.layers)]
            self._set_plan(order)
            self._order_learned = not config.learn_order
            self._completed: list[str] = []
        optimizer.capture.listener = self  # completions drive spd; both strategies time the capture hooks
        self._round: PipelinedAllReduce | None = None
        self._written: dict[str, tuple[int, int]] = {}
        # "hooks": factor time inside forward/backward (capture hooks, packing); "factor": inside step().
        self._acc = dict.fromkeys(("hooks", "factor", "comm_wait", "inversion", "curvature"), 0.0)
        self._synced = False  # statistics of the current step already reduced
        self._step_begin: float | None = None
        self._last_end: float | None = None
        self.timings: dict[str, float] = {}

    @staticmethod
    def _block(layer: TrackedLayer) -> KroneckerFactors:
        assert isinstance(layer.block, KroneckerFactors)
        return layer.block

    # -- start-up checks --------------------------------------------------------------------------------
    def _signature(self) -> list[str]:
        config = self.config
        head = f"strategy={Strategy(config.strategy).value} bucket_bytes={config.bucket_bytes} "
        head += f"small_factor_threshold={config.small_factor_threshold} dtype={self.opt.factor_dtype}"
        items = [head]
        for layer in self.layers:
            block = self._block(layer)
            items.append(f"layer {layer.name!r}: d_in={block.d_in} d_out={block.d_out} diag={block.diagonal_a}")
        return items

    def _check_same_model(self) -> None:
        items = self._signature()
        digest = torch.tensor([len(items), zlib.crc32("\n".join(items).encode())], dtype=torch.int64)
        if dist.get_backend(self.comm.group) == "nccl":
            digest = digest.cuda()
        gathered = self.comm.all_gather(digest, "the start-up model check")
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, items, group=self.comm.group)
        lines = []
        for rank, theirs in enumerate(every):
            diff = next((f"{a} vs {b}" for a, b in zip(every[0], theirs) if a != b), None)
            if diff is None and len(theirs) != len(every[0]):
                diff = f"{len(every[0]) - 1} layers vs {len(theirs) - 1}"
            if diff is not None:
                lines.append(f"rank 0 vs rank {rank}: {diff}")
        raise ValueError("kronfac: the ranks hold different models or distributed configs: " + "; ".join(lines))

    # -- fused statistics (spd) -------------------------------------------------------------------------
    def _set_plan(self, order: list[str]) -> None:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        segments = [(name, self.payloads[name].numel) for name in order]
        self.plan = FusionPlan(segments, max(1, self.config.bucket_bytes // itemsize))

    def _open_round(self) -> PipelinedAllReduce:
        if self._round is None:
            self._round = PipelinedAllReduce(self.plan, self.comm, dtype=self.dtype, device=self.device)
        return self._round

    def statistics_complete(self, layer: TrackedLayer) -> None:
        """Capture callback: write the layer's sums into its segment and send every bucket that is full."""
        if not self.spd:
            return
        start = perf_counter()
        payload, name = self.payloads[layer.name], layer.name
        current = self._open_round()
        if current.launched(name) or not payload.has_data():
            return  # already sent (a further backward pass): the sync step re-sends it
        payload.write(current.segment(name))
        self._written[name] = payload.counts()
        if not self._order_learned and name not in self._completed:
            self._completed.append(name)
        current.mark_ready(name)
        self._acc["hooks"] += perf_counter() - start

    def _sync_spd(self) -> None:
        current = self._open_round()
        # A layer whose statistics grew after they were sent (gradient accumulation, a further backward) on
        # any rank is re-sent whole; the flag vector makes every rank agree on which ones.
        stale = torch.zeros(len(self.plan.order), dtype=self.dtype, device=self.device)
        for i, name in enumerate(self.plan.order):
            payload, written = self.payloads[name], self._written.get(name)
            if written is not None and written == payload.counts():
                continue
            if current.launched(name):
                stale[i] = 1.0
            else:
                payload.write(current.segment(name))  # never completed here (unused layer) or changed since
        current.flush()
        flags = self.comm.all_reduce(stale, "the K-FAC stale-statistics flags")
        self._acc["comm_wait"] += current.wait() + self.comm.wait(flags)
        start = perf_counter()
        resend = [name for name, flag in zip(self.plan.order, stale.tolist()) if flag > 0]
        for name in self.plan.order:
            if name not in resend:
                self.payloads[name].read(current.segment(name))
        if resend:
            self._reduce_each(resend, fused=True)
        self._acc["factor"] += perf_counter() - start
        if not self._order_learned:
            self._learn_order()

    def _learn_order(self) -> None:
        """Adopt rank 0's completion order for the buffer from now on (same plan on every rank)."""
        self._order_learned = True
        index = {name: i for i, name in enumerate(self.plan.order)}
        seen = [index[n] for n in self._completed]
        rest = [i for i in range(len(self.plan.order)) if i not in set(seen)]
        order = torch.tensor(seen + rest, dtype=torch.int64)
        if dist.get_backend(self.comm.group) == "nccl":
            order = order.cuda()
        self._acc["comm_wait"] += self.comm.wait(self.comm.broadcast(order, 0, "the K-FAC bucket order"))
        self._set_plan([self.plan.order[i] for i in order.tolist()])

    # -- naive statistics -------------------------------------------------------------------------------
    def _reduce_each(self, names: list[str], *, fused: bool) -> None:
        """Blocking all-reduce of the named layers' full payloads (one message, or one per factor)."""
        if fused:
            sizes = [self.payloads[n].numel for n in names]
            flat = torch.zeros(sum(sizes), dtype=self.dtype, device=self.device)
            for name, part in zip(names, flat.split(sizes)):
                self.payloads[name].write(part)
            self._acc["comm_wait"] += self.comm.wait(self.comm.all_reduce(flat, "re-sent K-FAC statistics"))
            for name, part in zip(names, flat.split(sizes)):
                self.payloads[name].read(part)
            return
        for name in names:
            payload = self.payloads[name]
            flat = torch.zeros(payload.numel, dtype=self.dtype, device=self.device)
            payload.write(flat)
            a_end = payload.COUNTS + payload.a_numel
            # One blocking message per factor (A with both counts, then G), as naive distributed K-FAC does.
            for piece, what in ((flat[:a_end], "A"), (flat[a_end:], "G")):
                handle = self.comm.all_reduce(piece, f"the {what} factor of layer {name!r}")
                self._acc["comm_wait"] += self.comm.wait(handle)
            payload.read(flat)

    # -- hooks called by the optimizer ------------------------------------------------------------------
    def synchronize_statistics(self) -> None:
        """Make every rank's pending statistics the global ones (on curvature steps, once per step)."""
        if self._synced:
            return
        self._synced = True
        start = perf_counter()
        if self.spd:
            self._sync_spd()
        else:
            self._reduce_each([layer.name for layer in self.layers], fused=False)
        self._end_round()
        self._acc["curvature"] += perf_counter() - start

    def discard(self) -> None:
        """A skipped step: finish the round's collectives (every rank skips alike) and drop the statistics."""
        if self._round is not None:
            self._round.flush()
            self._acc["comm_wait"] += self._round.wait()
        self._end_round()

    def _end_round(self) -> None:
        self._round = None
        self._written.clear()
        self._acc["hooks"] += self.opt.capture.factor_seconds
        self.opt.capture.reset_completion()

    def refresh_inverses(self) -> None:
        """Recompute every layer's inverse: owners invert and broadcast, small factors everywhere (spd)."""
        start = perf_counter()
        if self.factorwise is None:
            for group, layers in zip(self.opt.param_groups, self.opt.layer_groups):
                damping = self.opt.group_value(group, "damping")
                for layer in layers:
                    layer.block.refresh(damping=damping)  # type: ignore[attr-defined]
            self._acc["inversion"] += perf_counter() - start
            self._acc["curvature"] += perf_counter() - start
            return
        self._refresh_placed()
        self._acc["curvature"] += perf_counter() - start

    def _refresh_placed(self) -> None:
        factorwise = self.factorwise
        assert factorwise is not None
        damping: dict[str, float] = {}
        for group, layers in zip(self.opt.param_groups, self.opt.layer_groups):
            for layer in layers:
                damping[layer.name] = self.opt.group_value(group, "damping")
        blocks = {layer.name: self._block(layer) for layer in self.layers}
        active = {n for n, b in blocks.items() if b.a_factor is not None and b.g_factor is not None}
        pieces: dict[tuple[str, str], torch.Tensor] = {}
        tick = perf_counter()
        owned = [s for s in self.assignment.owned(self.rank) if s.layer in active]
        for spec in owned:
            pieces[(spec.layer, spec.factor)] = factorwise.compute(blocks[spec.layer], spec.factor, damping[spec.layer])
        elapsed = perf_counter() - tick
        handles, buffers = [], []
        dtype = torch.promote_types(self.dtype, torch.float32)
        for src in range(self.world_size):
            specs = [s for s in self.assignment.owned(src) if s.layer in active]
            if not specs:
                continue
            if src == self.rank:
                flat = torch.cat([pieces[(s.layer, s.factor)] for s in specs])
            else:
                flat = torch.empty(sum(factorwise.numel(s.dim) for s in specs), dtype=dtype, device=self.device)
            buffers.append((specs, flat))
            if self.world_size > 1:
                handles.append(self.comm.broadcast(flat, src, f"the K-FAC inverses owned by rank {src}"))
        tick = perf_counter()
        for spec in self.assignment.replicated():
            if spec.layer in active:
                block = blocks[spec.layer]
                pieces[(spec.layer, spec.factor)] = factorwise.compute(block, spec.factor, damping[spec.layer])
        self._acc["inversion"] += elapsed + perf_counter() - tick
        self._acc["comm_wait"] += sum(self.comm.wait(h) for h in handles)
        for specs, flat in buffers:
            for spec, piece in zip(specs, flat.split([factorwise.numel(s.dim) for s in specs])):
                pieces[(spec.layer, spec.factor)] = piece
        for name in sorted(active, key=[layer.name for layer in self.layers].index):
            block = blocks[name]
            both = {"A": pieces[(name, "A")], "G": pieces[(name, "G")]}
            inverse = factorwise.assemble(block, both, damping[name], name)
            if inverse is not None:
                block.inverse = inverse  # type: ignore[attr-defined]

    # -- timing -----------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._step_begin = perf_counter()

    def end_step(self) -> None:
        """Close the step's time breakdown (see :attr:`timings`)."""
        now = perf_counter()
        self._synced = False
        if self._step_begin is None:
            return
        acc = self._acc
        step = now - self._step_begin
        timings = {
            "factor": acc["hooks"] + acc["factor"],
            "comm_wait": acc["comm_wait"],
            "inversion": acc["inversion"],
            "precondition": max(step - acc["curvature"], 0.0),
            "step": step,
        }
        if self._last_end is not None:
            timings["forward_backward"] = max(self._step_begin - self._last_end - acc["hooks"], 0.0)
        self.timings = timings
        self._last_end, self._step_begin = now, None
        self._acc = dict.fromkeys(acc, 0.0)
