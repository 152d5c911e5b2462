"""Single-process unit tests of the distributed pieces: config, placement balance, fusion buckets, payloads, the
step's wait budget."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch
from torch import nn

import kronfac
from kronfac.curvature.factors import KroneckerFactors
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed import (
    Communicator,
    DistributedConfig,
    DistributedTimeoutError,
    FactorSpec,
    FusionPlan,
    PipelinedAllReduce,
    WorkAssignment,
)
from kronfac.distributed.inverse_parts import FactorwiseInverse
from kronfac.distributed.payload import StatisticsPayload
from kronfac.linalg import build_inverse


def resnet50_factors() -> list[FactorSpec]:
    """K-FAC factors of ResNet-50 (bias-free convs: A is C_in k^2, G is C_out; fc with bias)."""
    layers = [("conv1", 3 * 49, 64)]
    c_in = 64
    for stage, (mid, out, blocks) in enumerate([(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)]):
        for b in range(blocks):
            name = f"layer{stage + 1}.{b}"
            layers += [(f"{name}.conv1", c_in, mid), (f"{name}.conv2", mid * 9, mid), (f"{name}.conv3", mid, out)]
            if b == 0:
                layers.append((f"{name}.downsample", c_in, out))
            c_in = out
    layers.append(("fc", 2049, 1000))
    return [FactorSpec(n, "A", a) for n, a, _ in layers] + [FactorSpec(n, "G", g) for n, _, g in layers]


def bert_factors() -> list[FactorSpec]:
    specs = []
    for i in range(12):
        for proj, (d_in, d_out) in {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768),
                                    "ffn1": (768, 3072), "ffn2": (3072, 768)}.items():  # fmt: skip
            specs += [FactorSpec(f"{i}.{proj}", "A", d_in + 1), FactorSpec(f"{i}.{proj}", "G", d_out)]
    return specs


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("threshold", [0, 128, 512])
def test_resnet50_placement_is_balanced(world: int, threshold: int) -> None:
    work = WorkAssignment(resnet50_factors(), world, small_factor_threshold=threshold)
    costs = work.rank_costs()
    mean = sum(costs) / world
    # Greedy LPT is within 10% of the best any placement of indivisible factors can do ...
    assert max(costs) <= 1.1 * work.lower_bound()
    if world == 4:
        assert work.imbalance() <= 1.1
    else:
        # ... and at 8 ranks the best possible is > 1.1: each 4608-dim conv A factor alone exceeds the mean.
        assert work.lower_bound() / mean > 1.1
        assert max(costs) == pytest.approx(work.lower_bound())


@pytest.mark.parametrize("world", [4, 8])
def test_bert_placement_is_balanced(world: int) -> None:
    assert WorkAssignment(bert_factors(), world, small_factor_threshold=128).imbalance() <= 1.1


def test_assignment_answers_one_question() -> None:
    specs = resnet50_factors()
    work = WorkAssignment(specs, 4, small_factor_threshold=256)
    again = WorkAssignment(list(reversed(specs)), 4, small_factor_threshold=256)
    for spec in specs:
        worker = work.inv_worker(spec.layer, spec.factor)
        assert worker == again.inv_worker(spec.layer, spec.factor)  # every rank computes the same answer
        assert (worker is None) == (spec.dim <= 256)
    owned = [s for r in range(4) for s in work.owned(r)]
    assert sorted(map(str, owned + work.replicated())) == sorted(map(str, specs))
    # The largest factor goes to rank 0 first, the next ones to the other (still empty) ranks.
    big = sorted((s for s in specs if s.dim > 256), key=lambda s: -s.cost)
    assert [work.inv_worker(s.layer, s.factor) for s in big[:4]] == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="nope"):
        work.inv_worker("nope", "A")
    with pytest.raises(ValueError, match="appears twice"):
        WorkAssignment(specs + specs[:1], 2, small_factor_threshold=0)


def test_diagonal_factors_are_replicated() -> None:
    work = WorkAssignment([FactorSpec("emb", "A", 50000, diagonal=True)], 2, small_factor_threshold=0)
    assert work.inv_worker("emb", "A") is None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bucket", [1, 7, 64, 1000])
def test_buckets_respect_their_bound_and_cover_the_buffer(seed: int, bucket: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 300, (12,), generator=gen).tolist()
    plan = FusionPlan([(f"l{i}", n) for i, n in enumerate(sizes)], bucket)
    assert all(0 < end - start <= bucket for start, end in plan.buckets)
    assert [s for s, _ in plan.buckets] == [0] + [e for _, e in plan.buckets[:-1]]
    assert (plan.buckets[-1][1] if plan.buckets else 0) == sum(sizes)
    for (start, end), (first, last) in zip(plan.buckets, plan.members):
        overlapping = [i for i, (o, n) in enumerate(zip(plan.offsets, plan.sizes)) if o < end and o + n > start]
        assert overlapping and first <= min(overlapping) and max(overlapping) == last


class _RecordingComm:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def all_reduce(self, tensor: torch.Tensor, what: str) -> tuple[Any, str]:
        self.sent.append((tensor.storage_offset(), tensor.numel()))
        return None, what

    def wait(self, handle: tuple[Any, str]) -> float:
        return 0.0


def test_pipelined_buckets_launch_in_buffer_order_as_segments_complete() -> None:
    plan = FusionPlan([("c", 10), ("b", 10), ("a", 10)], 8)  # buckets [0,8) [8,16) [16,24) [24,30)
    comm = _RecordingComm()
    rounds = PipelinedAllReduce(plan, comm, dtype=torch.float32, device=torch.device("cpu"))  # type: ignore[arg-type]
    rounds.mark_ready("b")
    assert comm.sent == []  # bucket 0 waits for "c", and later buckets wait for bucket 0
    rounds.mark_ready("c")
    assert comm.sent == [(0, 8), (8, 8)]  # [16,24) still needs "a"
    assert rounds.launched("c") and rounds.launched("b") and not rounds.launched("a")
    rounds.flush()
    assert comm.sent == [(0, 8), (8, 8), (16, 8), (24, 6)]


@pytest.mark.parametrize("triangular", [True, False])
@pytest.mark.parametrize("diagonal_a", [True, False])
def test_payload_round_trip(triangular: bool, diagonal_a: bool) -> None:
    block = KroneckerFactors(5, 4, diagonal_a=diagonal_a, dtype=torch.float64)
    block.add_inputs(torch.randint(0, 5, (3, 2)) if diagonal_a else torch.randn(3, 2, 5, dtype=torch.float64))
    block.add_output_grads(torch.randn(3, 2, 4, dtype=torch.float64), 3.0, 1)
    before = block.pending_statistics()
    payload = StatisticsPayload(block, triangular=triangular)
    flat = torch.zeros(payload.numel, dtype=torch.float64)
    payload.write(flat)
    assert payload.numel == 2 + (5 if diagonal_a else (15 if triangular else 25)) + (10 if triangular else 16)
    payload.read(flat * 2)  # two identical ranks
    new = block.pending_statistics()
    assert torch.allclose(new.sums["A"], 2 * before.sums["A"]) and torch.allclose(new.sums["G"], 2 * before.sums["G"])
    assert (new.a_count, new.g_count) == (2 * before.a_count, 2 * before.g_count)
    payload.read(torch.zeros(payload.numel, dtype=torch.float64))  # no rank had data
    assert not block.has_pending()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"strategy": "ring"}, "strategy"),
        ({"bucket_bytes": 0}, "bucket_bytes"),
        ({"small_factor_threshold": -1}, "small_factor_threshold"),
        ({"timeout": 0}, "timeout"),
        ({"check_every": -1}, "check_every"),
        ({"check_every": 2.0}, "check_every"),
        ({"backend": "tcp"}, "backend"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        DistributedConfig(**kwargs)


def test_config_needs_a_process_group_and_single_process_is_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert DistributedConfig(strategy="naive").strategy.value == "naive"  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="init_process_group"):
        kronfac.KFAC(model, distributed=DistributedConfig())
    with pytest.raises(ValueError, match="Invalid distributed"):
        kronfac.KFAC(model, distributed="spd")  # type: ignore[arg-type]
    opt = kronfac.KFAC(model)
    assert opt.capture.listener is None and opt.timings == {}


class _Work:
    """A collective that completes after ``seconds`` (a slow peer); records the timeout it was waited with."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.timeout = seconds, 0.0

    def wait(self, timeout: timedelta) -> bool:
        self.timeout = timeout.total_seconds()
        time.sleep(min(self.seconds, self.timeout))
        if self.timeout < self.seconds:
            raise RuntimeError("Operation timed out!")
        return True


@pytest.mark.usefixtures("one_rank")
def test_the_waits_of_one_step_share_the_timeout() -> None:
    comm = Communicator(timeout=1.0)
    comm.begin_step()
    first, second, third = _Work(0.3), _Work(0.3), _Work(0.6)
    w1 = comm.wait((first, "a"))
    w2 = comm.wait((second, "b"))
    assert first.timeout == pytest.approx(1.0) and second.timeout == pytest.approx(1.0 - w1, abs=0.01)
    with pytest.raises(DistributedTimeoutError, match=r"failed waiting for c \(timeout 1s for all the waits of one"):
        comm.wait((third, "c"))  # about 0.4 s left of the step's budget: the slow third collective fails
    assert third.timeout == pytest.approx(1.0 - w1 - w2, abs=0.01)
    with pytest.raises(DistributedTimeoutError, match="already waited its whole timeout"):
        comm.wait((_Work(0.0), "d"))
    comm.end_step()  # outside a step every wait has the whole timeout
    outside = _Work(0.3)
    comm.wait((outside, "e"))
    assert outside.timeout == pytest.approx(1.0)


def test_factorwise_warm_refresh_equals_one_process_build() -> None:
    """The per-factor pieces of a warm eigenbasis refresh (placement) assemble into the inverse that
    build_inverse makes from the same block and previous inverse (same warm start, same age)."""
    torch.manual_seed(0)
    config = kronfac.EighConfig(refresh="warm", full_every=3)
    block = KFACBlock(6, 4, name="fc", inverse=config, dtype=torch.float64)
    factorwise = FactorwiseInverse(config)
    for step in range(4):
        x, g = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
        block.add_inputs(x.unsqueeze(1))
        block.add_output_grads(g.unsqueeze(1), 1.0, 20)
        block.commit(factor_decay=0.9)
        expected = build_inverse(config, block.a_factor, block.g_factor, 1e-2, previous=block.inverse, layer="fc")
        pieces = {f: factorwise.compute(block, f, 1e-2) for f in ("A", "G")}
        inverse = factorwise.assemble(block, pieces, 1e-2, "fc")
        assert inverse is not None and expected is not None
        assert int(inverse.age) == int(expected.age) == [0, 1, 2, 0][step]
        for name, value in expected.tensors().items():
            torch.testing.assert_close(inverse.tensors()[name], value, atol=1e-12, rtol=0)
        block.adopt_inverse(inverse)
