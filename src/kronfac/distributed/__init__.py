"""Curvature on ``torch.distributed``: strategy config, work assignment, fused communication, the sync, the
ranks' agreement check.

SPD-KFAC (Shi, Zhang and Li, ICDCS 2021) and KAISA (Pauloski et al., SC 2021).
"""

from kronfac.distributed.agreement import RankMismatchError
from kronfac.distributed.assignment import FactorSpec, WorkAssignment
from kronfac.distributed.communicator import Communicator, DistributedTimeoutError, FusionPlan, PipelinedAllReduce
from kronfac.distributed.config import DistributedConfig, Strategy
from kronfac.distributed.sync import TIMING_KEYS, CurvatureSync, process_group_active

__all__ = [
    "TIMING_KEYS",
    "Communicator",
    "CurvatureSync",
    "DistributedConfig",
    "DistributedTimeoutError",
    "FactorSpec",
    "FusionPlan",
    "PipelinedAllReduce",
    "RankMismatchError",
    "Strategy",
    "WorkAssignment",
    "process_group_active",
]
