"""Faults on 2 gloo ranks (scenarios in ``fault_workers.py``): what must agree differs between the ranks, a rank
skips a step() call, hangs or dies. Every scenario ends in a clear error within a bounded time; the table of
``docs/reliability_distributed.md`` is these scenarios' records (``benchmarks/reliability/distributed_faults.py``).
"""

from __future__ import annotations

from typing import Any

import fault_workers as faults
import pytest

#: scenario -> (iteration at which each rank raises, None: in the constructor), the field, its value per rank.
MISMATCHES: dict[str, tuple[tuple[int | None, int | None], str, list[str]]] = {
    "damping differs": ((None, None), "param_groups[0].damping", ["0.01", "0.02"]),
    "damping schedule diverges": ((4, 4), "param_groups[0].damping", ["0.01", "0.02"]),
    "factor_every differs": ((None, None), "factor_every", ["1", "2"]),
    "inverse_every differs": ((None, None), "inverse_every", ["2", "3"]),
    # Rank 1's third step() call is batch 3: it skipped the call of batch 1.
    "a rank skips a step() call": ((2, 3), "backward passes", ["3", "4"]),
    "a rank resumes another checkpoint": ((0, 0), "step", ["4", "2"]),
}


@pytest.fixture(scope="module")
def mismatches() -> dict[str, list[dict[str, Any]]]:
    return faults.run_mismatches(list(MISMATCHES))


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_a_mismatch_raises_on_every_rank_naming_the_field_and_values(
    mismatches: dict[str, list[dict[str, Any]]], name: str
) -> None:
    iterations, field, values = MISMATCHES[name]
    for rank, record in enumerate(mismatches[name]):
        assert record["error"] == "RankMismatchError", record
        assert record["fields"] == {field: values}
        assert f"{field}: rank 0: {values[0]}, rank 1: {values[1]}" in record["message"]
        assert record["iteration"] == iterations[rank]
        # Found by the check, not by a timeout of the collectives (which would take MISMATCH_TIMEOUT = 20 s).
        assert record["seconds"] < 5.0


@pytest.mark.parametrize(
    "name",
    ["a rank hangs in step()", "a rank dies in step()", "a rank hangs before building", "a rank dies before building"],
)
def test_a_dead_or_hung_rank_raises_within_the_timeout(name: str) -> None:
    healthy, faulty = faults.run_fault(name)
    assert faulty == ({"hung": True} if "hangs" in name else {"died": True})
    assert healthy["error"] == "DistributedTimeoutError", healthy
    assert "rank 0 failed waiting for" in healthy["message"] and "another rank" in healthy["message"]
    if "building" in name:
        assert "the other ranks to build their kronfac optimizer" in healthy["message"]
    assert healthy["seconds"] < faults.FAULT_TIMEOUT + 3.0  # not the 60 s of the default group


def test_a_rank_that_skips_step_under_ddp_ends_within_the_timeout() -> None:
    """Under DDP the ranks wait for each other before any check can run (rank 0 in kronfac's collectives of the
    step, rank 1 in DDP's all-reduce of the next batch): kronfac's timeout ends it, on rank 0 with its error and
    on rank 1 when rank 0's process exits."""
    healthy, skipper = faults.run_fault("a rank skips a step() call under DDP")
    assert healthy["error"] == "DistributedTimeoutError" and healthy["iteration"] == 1, healthy
    assert "call step() for every batch" in healthy["message"]
    assert healthy["seconds"] < faults.FAULT_TIMEOUT + 3.0
    assert skipper["error"] == "RuntimeError" and skipper["iteration"] == 2, skipper
    assert skipper["seconds"] < faults.FAULT_TIMEOUT + 5.0
