"""Multi-process tests of distributed K-FAC: gloo on CPU, ranks spawned by the tests themselves."""

from __future__ import annotations

import dist_workers as workers
import pytest
import torch

F64, F32 = torch.float64, torch.float32


def _check_equal(results: list[dict], runs: list[tuple[str, str, torch.dtype, int]], world: int) -> None:
    for strategy, variant, dtype, micro in runs:
        key = f"{strategy}-{variant}-{dtype}-{micro}"
        expected = workers.reference(world, variant, dtype, micro)
        rtol = 1e-8 if dtype == F64 else 1e-4
        if variant == "warm":
            # A warm refresh starts from the last basis, and eigh's basis of a degenerate (rank-deficient) factor's
            # null space is arbitrary: round-off-level differences of the reduced statistics pick another one, so
            # the warm bases agree with one process only to the warm iteration's accuracy. Replicas stay identical.
            rtol = 0.25
            for result in results[1:]:
                for name, value in results[0][key]["params"].items():
                    assert torch.equal(result[key]["params"][name], value), f"{key}: replicas differ in {name}"
        for rank, result in enumerate(results):
            got = result[key]["params"]
            for name, value in expected.items():
                scale = value.abs().max().clamp_min(1.0)
                err = float((got[name] - value).abs().max() / scale)
                assert err <= rtol, f"{key} rank {rank} param {name}: relative error {err:.2e}"
            timings = result[key]["timings"]
            assert set(timings) >= {"forward_backward", "factor", "comm_wait", "inversion", "precondition", "step"}
            assert all(v >= 0 for v in timings.values())
        if strategy == "spd":
            assert results[0][key]["buckets"] > 3  # the 1 KiB bound splits the statistics into many messages
        if strategy == "spd" and variant in ("eigh", "cholesky"):
            # Pipelining: once the bucket order is learnt (first step), the capture hooks have sent every
            # bucket by the time backward() returns, before step() is called.
            assert len(results[0][key]["sent_before_step"]) == workers.STEPS
            for sent, total in results[0][key]["sent_before_step"][1:]:
                assert sent == total


def test_two_ranks_match_single_process() -> None:
    """naive and spd (eigh, Cholesky, type-2 Fisher, gradient accumulation, float32) equal one process."""
    runs = [
        ("naive", "eigh", F64, 1),
        ("spd", "eigh", F64, 1),
        ("spd", "cholesky", F64, 1),
        ("spd", "eigh", F64, 2),  # two micro-batches: statistics grow after their bucket was sent
        ("spd", "type2", F64, 1),
        ("spd", "kldwrm", F64, 1),  # a correction that reads the batch statistics sees the global ones
        ("spd", "eigh", F32, 1),
        ("naive", "eigh", F32, 1),
        ("naive", "warm", F64, 1),  # warm eigenbasis refreshes, batched over equal shapes
        ("spd", "warm", F64, 1),  # warm eigenbasis refreshes of placed factors, from the adopted bases
    ]
    _check_equal(workers.launch(workers.equality_worker, 2, runs), runs, 2)


def test_four_ranks_match_single_process() -> None:
    runs = [("naive", "eigh", F64, 1), ("spd", "eigh", F64, 1), ("spd", "cholesky", F64, 1), ("spd", "every2", F64, 1)]
    _check_equal(workers.launch(workers.equality_worker, 4, runs), runs, 4)


@pytest.mark.parametrize("strategy", ["naive", "spd"])
def test_unused_layers_and_mismatched_models(strategy: str) -> None:
    results = workers.launch(workers.unused_worker, 2, strategy)
    for result in results:
        assert result["mismatch"] is not None and "different models" in result["mismatch"]
        assert "d_out=8" in result["mismatch"] and "d_out=9" in result["mismatch"]
        assert result["never_a"] is None  # no rank ever fed it: no factors anywhere
    # Ranks saw different data and different layer usage but hold the same factors and parameters.
    assert torch.equal(results[0]["branch_a"], results[1]["branch_a"])
    assert torch.equal(results[0]["params"], results[1]["params"])


@pytest.mark.parametrize("world", [2, 4])
def test_every_optimizer_keeps_ddp_replicas_identical(world: int) -> None:
    """Plain DDP, different data per rank, default arguments: every registered optimizer averages its curvature
    over the ranks by itself, so the replicas stay identical, and (deterministic methods, float64) equal one
    process on the global batch."""
    from settings import DETERMINISTIC, OPTIMIZERS

    names = sorted(OPTIMIZERS)
    results = workers.launch(workers.replica_worker, world, names)
    for name in names:
        for rank in range(1, world):
            diff = float((results[rank][name] - results[0][name]).abs().max())
            assert diff == 0.0, f"{name}: rank {rank} differs from rank 0 by {diff:.2e}"
        if name in DETERMINISTIC:
            single = workers.replica_train(name, world, slice(None), ddp=False)
            err = float((results[0][name] - single).abs().max() / single.abs().max())
            # CG stops at a residual tolerance: round-off in the summed rows can change where, so CG-FAC agrees
            # to the size of its stopping criterion's sensitivity rather than to round-off.
            tol = 1e-7 if name == "cgfac" else 1e-9
            assert err <= tol, f"{name}: DDP differs from one process on the global batch by {err:.2e}"
    # distributed=False is the documented switch to per-rank curvature: the replicas then drift apart.
    assert not torch.equal(results[0]["kfac per-rank"], results[1]["kfac per-rank"])


def test_distributed_checkpoint_resumes_on_two_ranks_and_in_one_process() -> None:
    """DCP save on 2 ranks; the resume on 2 ranks continues bit-identically, and one process resuming the same
    checkpoint on the global batch continues to round-off (the curvature state is the same on every rank)."""
    from settings import DETERMINISTIC

    names = sorted(DETERMINISTIC)
    results = workers.launch(workers.dcp_worker, 2, names)
    for name in names:
        for rank in (0, 1):
            saved, resumed = results[rank][f"{name} saved"], results[rank][f"{name} resumed"]
            assert torch.equal(saved, resumed), f"{name}: the 2-rank resume differs on rank {rank}"
        single = results[0][f"{name} one process"]
        err = float((single - results[0][f"{name} saved"]).abs().max() / single.abs().max())
        assert err <= (1e-7 if name == "cgfac" else 1e-9), f"{name}: one-process resume off by {err:.2e}"


def test_tied_weights_under_ddp_keep_replicas_identical() -> None:
    """A shared parameter's fitted block is averaged over the ranks like any statistics: replicas stay equal."""
    results = workers.launch(workers.tied_worker, 2, ["kfac", "singd", "adafisher"])
    for key, weight in results[0].items():
        assert torch.isfinite(weight).all(), key
        torch.testing.assert_close(results[1][key], weight, rtol=0, atol=0, msg=key)
