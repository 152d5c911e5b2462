"""Benchmarks: bundled datasets, small models, methods, the runner and its reports (`kronfac bench`), and the
thermodynamic cost-model predictions (`kronfac thermo-cost`)."""

from kronfac.bench import peers as _peers  # noqa: F401 - registers the peer methods
from kronfac.bench.methods import METHODS, Method, register_method
from kronfac.bench.runner import run_method, run_one
from kronfac.bench.tasks import TASKS, Task, get_task

__all__ = ["METHODS", "TASKS", "Method", "Task", "get_task", "register_method", "run_method", "run_one"]
