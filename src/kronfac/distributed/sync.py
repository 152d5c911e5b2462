"""Curvature across data-parallel ranks: the communicator that the optimizer hands its curvature commit and its
refresh. It knows blocks, the capture and configs, never an optimizer.

Data-parallel ranks hold equal local batches; DDP averages their gradients. Each rank's batch statistics are
sums over its rows (``Σ a a^T`` with its row count; ``M_r Σ ∇_out ∇_out^T`` with its sample count, where
``∇_out = g / M_r`` is the output gradient of the local loss averaged over ``M_r`` local rows). Summing sums and
counts over ranks gives ``A = Σ_all a a^T / Σ_all rows`` and ``G = (1/M) Σ_all g g^T`` with ``M = Σ_r M_r``:
exactly the factors a single process computes for the global batch whose loss is the mean over all ``W M_r``
rows (the loss DDP's averaged gradient belongs to). The same holds for every block whose statistics are sums
(AdaFisher's diagonals, SINGD's projections ``Π(K^T A K)``, which are linear in ``A``); blocks that keep rows
(CG-FAC) concatenate them in rank order. Inverses and steps then match too.

Strategies (Shi, Zhang and Li, ICDCS 2021; Pauloski et al., SC 2021):

- ``naive``: after backward, one blocking all-reduce per statistic (full matrices), every rank refreshes every
  block;
- ``spd``: each layer's statistics are written into a fused buffer from the capture hook that completes them
  and sent bucket by bucket while backward continues (waited for only before the update); large K-FAC factors
  are inverted once, by the rank :class:`WorkAssignment` names, and broadcast; small ones everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist

from kronfac.curvature.block import PendingStatistics, refresh_blocks
from kronfac.curvature.capture import Capture, TrackedLayer
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed.agreement import AgreementCheck, BackwardCounter, canonical
from kronfac.distributed.assignment import FactorSpec, WorkAssignment
from kronfac.distributed.communicator import Communicator, FusionPlan, PipelinedAllReduce
from kronfac.distributed.config import DistributedConfig, Strategy
from kronfac.distributed.inverse_parts import FactorwiseInverse
from kronfac.distributed.payload import StatisticsPayload

logger = logging.getLogger("kronfac")

__all__ = ["TIMING_KEYS", "CurvatureSync", "process_group_active"]

#: Keys of :attr:`CurvatureSync.timings` (seconds of the last step).
TIMING_KEYS = ("forward_backward", "factor", "comm_wait", "inversion", "precondition", "step")


def process_group_active() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CurvatureSync:
    """Reduces every layer's batch statistics over the ranks and shares the refresh work among them.

    Built by the optimizer (``distributed=`` of every kronfac optimizer; by default whenever a process group
    with more than one rank is initialised).

    Args:
        layers: the tracked layers (their blocks are reduced).
        capture: the capture that feeds them (spd sends a layer's statistics from its completion callback).
        config: the strategy.

    Raises:
        RuntimeError: no process group is initialised.
        DistributedTimeoutError: the other ranks did not build theirs within ``config.timeout``.
    """

    def __init__(self, layers: list[TrackedLayer], capture: Capture, config: DistributedConfig) -> None:
        self.config, self.capture = config, capture
        self.comm = Communicator(timeout=config.timeout, backend=config.backend)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layers = layers
        self.spd = config.strategy is Strategy.SPD
        self.counter = BackwardCounter([layer.params[0] for layer in layers if layer.params])
        self.agreement = AgreementCheck(self.comm, self._static_fields(), config.check_every, self.counter)
        self._calls = 0  # step() calls since construction (the agreement check's clock)
        fused = [layer for layer in layers if StatisticsPayload.supports(layer.block)]
        #: Layers whose statistics are rows of varying length (CG-FAC): gathered, never fused.
        self.gathered = [layer for layer in layers if layer not in fused]
        self.payloads = {layer.name: StatisticsPayload(layer.block, triangular=self.spd) for layer in fused}
        first = layers[0].block if layers else None
        self.dtype = getattr(first, "dtype", torch.float32)
        self.device = next((p.device for layer in layers for p in layer.params), torch.device("cpu"))
        self.factorwise: FactorwiseInverse | None = None
        self.assignment: WorkAssignment | None = None
        placed = [layer for layer in layers if isinstance(layer.block, KFACBlock)]
        if self.spd and placed and len(placed) == len(layers):
            self._place([layer.block for layer in placed])  # type: ignore[misc]
        if self.spd:
            self._set_plan([name for name in reversed(list(self.payloads))])
            self._order_learned = not config.learn_order
            self._completed: list[str] = []
        capture.listener = self  # completions drive spd; both strategies time the capture hooks
        self._round: PipelinedAllReduce | None = None
        self._written: dict[str, tuple[int, int]] = {}
        # "hooks": factor time inside forward/backward (capture hooks, packing); "factor": inside step().
        self._acc = dict.fromkeys(("hooks", "factor", "comm_wait", "inversion", "curvature"), 0.0)
        self._step_begin: float | None = None
        self._last_end: float | None = None
        self.timings: dict[str, float] = {}

    def _place(self, blocks: list[KFACBlock]) -> None:
        configs = {type(block.inverse_config) for block in blocks}
        config = blocks[0].inverse_config
        if len(configs) != 1 or not FactorwiseInverse.supports(config):
            logger.info(
                "kronfac: no per-factor split for %s: every rank inverts every factor (placement needs "
                "EighConfig or CholeskyConfig)",
                type(config).__name__,
            )
            return
        self.factorwise = FactorwiseInverse(config)
        specs = []
        for layer in self.layers:
            block = layer.block
            assert isinstance(block, KFACBlock)
            specs.append(FactorSpec(layer.name, "A", block.d_in, block.diagonal_a))
            specs.append(FactorSpec(layer.name, "G", block.d_out))
        threshold = self.config.small_factor_threshold
        self.assignment = WorkAssignment(specs, self.world_size, small_factor_threshold=threshold)

    # -- agreement of the ranks ------------------------------------------------------------------------
    def _static_fields(self) -> dict[str, str]:
        """What the sync itself needs equal on every rank: its config and the layers."""
        config = self.config
        fields = {
            f"distributed.{name}": canonical(getattr(config, name))
            for name in ("strategy", "bucket_bytes", "small_factor_threshold", "learn_order", "check_every")
        }
        for layer in self.layers:
            d_in, d_out = layer.helper.dims(layer.module)
            block = layer.block
            fields[f"layer {layer.name!r}"] = (
                f"{type(block).__name__} d_in={d_in} d_out={d_out} diag={layer.helper.diagonal_a} "
                f"dtype={getattr(block, 'dtype', None)} inverse={canonical(getattr(block, 'inverse_config', None))}"
            )
        return fields

    def check_due(self) -> bool:
        """Whether this step() call compares the ranks (the first call, then every ``check_every``)."""
        return self.agreement.due(self._calls)

    def check_agreement(self, fields: Mapping[str, Any]) -> None:
        """Compare ``fields`` (plus the layers, the config and the backward passes) over the ranks; raises
        :class:`~kronfac.distributed.RankMismatchError` on every rank if any differs. Called by the optimizer at
        construction and on :meth:`check_due` steps; every rank must call it alike.

        Args:
            fields: ``{name: value}`` of what must agree; a ``"step"`` entry names the step in the message.

        Raises:
            RankMismatchError: a field differs between ranks (raised on every rank, naming each value).
            DistributedTimeoutError: another rank did not check within the timeout.
        """
        try:
            self._acc["comm_wait"] += self.agreement.check(fields, self._calls)
        except Exception:
            if self._calls == 0:
                self.close()  # the optimizer is not built: leave the model without our hooks
            raise

    def close(self) -> None:
        """Remove the hooks that count backward passes."""
        self.counter.close()

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
        payload, name = self.payloads.get(layer.name), layer.name
        if not self.spd or payload is None:
            return
        start = perf_counter()
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
        """Blocking all-reduce of the named layers' full payloads (one message, or one per statistic)."""
        if fused:
            sizes = [self.payloads[n].numel for n in names]
            flat = torch.zeros(sum(sizes), dtype=self.dtype, device=self.device)
            for name, part in zip(names, flat.split(sizes)):
                self.payloads[name].write(part)
            self._acc["comm_wait"] += self.comm.wait(self.comm.all_reduce(flat, "re-sent curvature statistics"))
            for name, part in zip(names, flat.split(sizes)):
                self.payloads[name].read(part)
            return
        for name in names:
            payload = self.payloads[name]
            flat = torch.zeros(payload.numel, dtype=self.dtype, device=self.device)
            payload.write(flat)
            # One blocking message per statistic (the first with both counts), as naive distributed K-FAC does.
            for what, start, end in payload.spans():
                handle = self.comm.all_reduce(flat[start:end], f"the {what} statistics of layer {name!r}")
                self._acc["comm_wait"] += self.comm.wait(handle)
            payload.read(flat)

    def _gather_rows(self, layer: TrackedLayer) -> None:
        """All-gather a layer's rows (padded to the longest rank's) and sums; rows are concatenated by rank."""
        mine = layer.block.pending_statistics()
        names = sorted(mine.rows)
        lengths = torch.tensor([mine.a_count, mine.g_count, *(mine.rows[n].shape[0] for n in names)])
        if dist.get_backend(self.comm.group) == "nccl":
            lengths = lengths.to(self.device)
        every = torch.stack(self.comm.all_gather(lengths, f"the row counts of layer {layer.name!r}")).cpu()
        rows: dict[str, torch.Tensor] = {}
        for k, name in enumerate(names):
            local, longest = mine.rows[name], int(every[:, 2 + k].max())
            padded = local.new_zeros((longest, *local.shape[1:]))
            padded[: local.shape[0]] = local
            parts = self.comm.all_gather(padded, f"the {name} rows of layer {layer.name!r}")
            rows[name] = torch.cat([part[: int(n)] for part, n in zip(parts, every[:, 2 + k])])
        sums = {}
        for name, tensor in mine.sums.items():
            total = tensor.clone()
            self._acc["comm_wait"] += self.comm.wait(self.comm.all_reduce(total, f"the {name} sums of {layer.name!r}"))
            sums[name] = total
        counts = every[:, :2].sum(0).tolist()
        layer.block.set_pending_statistics(PendingStatistics(int(counts[0]), int(counts[1]), sums=sums, rows=rows))

    # -- called by the optimizer ------------------------------------------------------------------------
    def reduce_statistics(self) -> None:
        """Make every rank's pending statistics the global ones (once per curvature step, before the commit)."""
        start = perf_counter()
        if self.spd:
            self._sync_spd()
        else:
            self._reduce_each(list(self.payloads), fused=False)
        for layer in self.gathered:
            self._gather_rows(layer)
        self._end_round()
        self._acc["curvature"] += perf_counter() - start

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks (one fused blocking all-reduce)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])
        self._acc["comm_wait"] += self.comm.wait(self.comm.all_reduce(flat, "averaged correction terms"))
        flat /= self.world_size
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.reshape(tensor.shape))

    def statistics_dropped(self) -> None:
        """The blocks dropped their pending statistics outside a step (a step a GradScaler skipped). Buckets sent
        already are not recalled (that would change the sequence of collectives); they count as stale, so the
        next step re-sends the statistics that replace them, as for gradient accumulation."""
        self._written.clear()

    def discard(self) -> None:
        """A skipped step: finish the round's collectives (every rank skips alike) and drop the statistics."""
        if self._round is not None:
            self._round.flush()
            self._acc["comm_wait"] += self._round.wait()
        self._end_round()

    def _end_round(self) -> None:
        self._round = None
        self._written.clear()
        self._acc["hooks"] += self.capture.factor_seconds
        self.capture.reset_completion()

    def refresh(self, work: list[tuple[TrackedLayer, float]]) -> None:
        """Refresh every ``(layer, damping)``: with spd placement, owners invert and broadcast and small factors
        are inverted everywhere; otherwise every rank refreshes every block (the same reduced statistics give
        the same result on every rank)."""
        start = perf_counter()
        if self.factorwise is None:
            refresh_blocks([(layer.block, damping) for layer, damping in work])
            self._acc["inversion"] += perf_counter() - start
        else:
            self._refresh_placed(work)
        self._acc["curvature"] += perf_counter() - start

    def _refresh_placed(self, work: list[tuple[TrackedLayer, float]]) -> None:
        factorwise, assignment = self.factorwise, self.assignment
        assert factorwise is not None and assignment is not None
        damping = {layer.name: d for layer, d in work}
        blocks: dict[str, KFACBlock] = {layer.name: layer.block for layer, _ in work}  # type: ignore[misc]
        active = {n for n, b in blocks.items() if b.a_factor is not None and b.g_factor is not None}
        pieces: dict[tuple[str, str], torch.Tensor] = {}
        tick = perf_counter()
        for spec in assignment.owned(self.rank):
            if spec.layer in active:
                block = blocks[spec.layer]
                pieces[(spec.layer, spec.factor)] = factorwise.compute(block, spec.factor, damping[spec.layer])
        elapsed = perf_counter() - tick
        handles, buffers = [], []
        dtype = torch.promote_types(self.dtype, torch.float32)
        for src in range(self.world_size):
            specs = [s for s in assignment.owned(src) if s.layer in active]
            if not specs:
                continue
            if src == self.rank:
                flat = torch.cat([pieces[(s.layer, s.factor)] for s in specs])
            else:
                flat = torch.empty(sum(factorwise.numel(s.dim) for s in specs), dtype=dtype, device=self.device)
            buffers.append((specs, flat))
            handles.append(self.comm.broadcast(flat, src, f"the K-FAC inverses owned by rank {src}"))
        tick = perf_counter()
        for spec in assignment.replicated():
            if spec.layer in active:
                block = blocks[spec.layer]
                pieces[(spec.layer, spec.factor)] = factorwise.compute(block, spec.factor, damping[spec.layer])
        self._acc["inversion"] += elapsed + perf_counter() - tick
        self._acc["comm_wait"] += sum(self.comm.wait(h) for h in handles)
        for specs, flat in buffers:
            for spec, piece in zip(specs, flat.split([factorwise.numel(s.dim) for s in specs])):
                pieces[(spec.layer, spec.factor)] = piece
        for layer, _ in work:
            if layer.name in active:
                both = {"A": pieces[(layer.name, "A")], "G": pieces[(layer.name, "G")]}
                inverse = factorwise.assemble(blocks[layer.name], both, damping[layer.name], layer.name)
                if inverse is not None:
                    blocks[layer.name].adopt_inverse(inverse)

    # -- timing -----------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._calls += 1
        self.comm.begin_step()
        self._step_begin = perf_counter()

    def end_step(self) -> None:
        """Close the step's time breakdown (see :attr:`timings`)."""
        now = perf_counter()
        self.comm.end_step()
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
