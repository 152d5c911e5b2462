"""Distributed K-FAC on ``torch.distributed``: strategy config, work assignment, fused communication.

SPD-KFAC (Shi, Zhang and Li, ICDCS 2021) and KAISA (Pauloski et al., SC 2021).
"""

from kronfac.distributed.assignment import FactorSpec, WorkAssignment
from kronfac.distributed.communicator import Communicator, DistributedTimeoutError, FusionPlan, PipelinedAllReduce
from kronfac.distributed.config import DistributedConfig, Strategy
from kronfac.distributed.engine import TIMING_KEYS, DistributedKFAC

__all__ = [
    "TIMING_KEYS",
    "Communicator",
    "DistributedConfig",
    "DistributedKFAC",
    "DistributedTimeoutError",
    "FactorSpec",
    "FusionPlan",
    "PipelinedAllReduce",
    "Strategy",
    "WorkAssignment",
]
