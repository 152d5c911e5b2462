"""Worker functions for the multi-process tests (spawned with torch.multiprocessing; gloo on CPU)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import kronfac

LOCAL_BATCH = 4
STEPS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(worker: Callable[..., None], world: int, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, out_dir, *args)`` on ``world`` gloo ranks; return each rank's result."""
    # forkserver: children fork from a server that imported torch once (fast), never from the test process.
    mp.set_forkserver_preload(["torch", "torch._dynamo", "kronfac", "dist_workers"])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry,
            args=(worker, world, free_port(), out_dir, args),
            nprocs=world,
            join=True,
            start_method="forkserver",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, worker: Callable[..., Any], world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["KRONFAC_TEST_OUT"] = out_dir
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    result = worker(rank, world, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if getattr(worker, "hard_exit", False):
        os._exit(0)  # a peer may be gone: skip the collective teardown
    dist.destroy_process_group()


# -- models and data -----------------------------------------------------------------------------------
class Net(nn.Module):
    """Conv2d + Linear layers, and an Embedding branch (diagonal A)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 5 * 5 + 6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.embed = nn.Embedding(7, 6)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        e = self.embed(tokens).mean(dim=1)
        return self.fc2(torch.tanh(self.fc1(torch.cat([h, e], dim=1))))


def make_data(world: int, dtype: torch.dtype, steps: int = STEPS, micro: int = 1) -> list[list[tuple]]:
    gen = torch.Generator().manual_seed(1)
    n = world * LOCAL_BATCH
    return [
        [
            (
                torch.randn(n, 2, 5, 5, generator=gen, dtype=dtype),
                torch.randint(0, 7, (n, 3), generator=gen),
                torch.randint(0, 3, (n,), generator=gen),
            )
            for _ in range(micro)
        ]
        for _ in range(steps)
    ]


def make_optimizer(model: nn.Module, variant: str, dtype: torch.dtype, distributed: Any = None) -> kronfac.KFAC:
    inverse = kronfac.CholeskyConfig() if variant == "cholesky" else kronfac.EighConfig()
    if variant == "warm":  # refresh every step: full, warm, warm, full, warm
        inverse = kronfac.EighConfig(refresh="warm", full_every=3)
    return kronfac.KFAC(
        model,
        lr=0.1,
        damping=1e-2,
        weight_decay=1e-3,
        factor_every=2 if variant == "every2" else 1,
        inverse_every={"every2": 3, "warm": 1}.get(variant, 2),
        kl_clip=1e-2,
        inverse=inverse,
        factor_dtype=dtype,
        fisher_type="type2" if variant == "type2" else "empirical",
        correction=kronfac.KLDWRM("q", rho=0.5) if variant == "kldwrm" else None,
        distributed=distributed,
    )


def train(model: nn.Module, opt: kronfac.KFAC, data: list, rows: slice, ddp: Any = None) -> list[tuple[int, int]]:
    """Train; returns, per step, (buckets already sent when backward returned, buckets) for spd."""
    sent: list[tuple[int, int]] = []
    for micro_batches in data:
        for i, (x, tokens, y) in enumerate(micro_batches):
            run = ddp if ddp is not None else model
            last = i == len(micro_batches) - 1
            ctx = ddp.no_sync() if ddp is not None and not last else _nullcontext()
            with ctx:
                loss = nn.functional.cross_entropy(run(x[rows], tokens[rows]), y[rows])
                loss.backward()
        engine = opt.sync
        if engine is not None and engine.spd and engine._round is not None:
            sent.append((engine._round.next_bucket, len(engine.plan.buckets)))
        opt.step()
        opt.zero_grad()
    return sent


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def reference(world: int, variant: str, dtype: torch.dtype, micro: int = 1) -> dict[str, Tensor]:
    """Single-process K-FAC on the global batch."""
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = make_optimizer(model, variant, dtype)
    train(model, opt, make_data(world, dtype, micro=micro), slice(None))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- workers -------------------------------------------------------------------------------------------
def equality_worker(rank: int, world: int, runs: list[tuple[str, str, torch.dtype, int]]) -> dict:
    """Train ``Net`` under DDP for each ``(strategy, variant, dtype, micro)``; return parameters and timings."""
    out: dict[str, Any] = {}
    for strategy, variant, dtype, micro in runs:
        torch.manual_seed(0)
        model = Net().to(dtype)
        ddp = DistributedDataParallel(model)
        config = kronfac.DistributedConfig(strategy=strategy, bucket_bytes=1024, small_factor_threshold=4)
        opt = make_optimizer(model, variant, dtype, distributed=config)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        sent = train(model, opt, make_data(world, dtype, micro=micro), rows, ddp)
        out[f"{strategy}-{variant}-{dtype}-{micro}"] = {
            "sent_before_step": sent,
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "timings": opt.timings,
            "buckets": len(opt.sync.plan.buckets) if strategy == "spd" else 0,
        }
        opt.close()
    return out


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.branch = nn.Linear(6, 6)
        self.never = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor, use_branch: bool) -> Tensor:
        h = torch.tanh(self.inp(x))
        if use_branch:
            h = h + self.branch(h)
        return self.out(h)


def unused_worker(rank: int, world: int, strategy: str) -> dict:
    """A layer used by some ranks only on some steps, one never used; plus a mismatched-model start."""
    result: dict[str, Any] = {}
    wrong = nn.Linear(4, 8 if rank == 0 else 9)
    try:
        kronfac.KFAC(wrong, distributed=kronfac.DistributedConfig(strategy=strategy, timeout=20))
        result["mismatch"] = None
    except ValueError as exc:
        result["mismatch"] = str(exc)
    torch.manual_seed(0)
    model = Branchy().double()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    config = kronfac.DistributedConfig(strategy=strategy, bucket_bytes=128, small_factor_threshold=0, timeout=20)
    opt = kronfac.KFAC(model, lr=0.1, damping=1e-2, inverse_every=1, factor_dtype=torch.float64, distributed=config)
    gen = torch.Generator().manual_seed(10 + rank)
    for step in range(6):
        x, y = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 2, (4,), generator=gen)
        use = rank == 0 or step % 2 == 0
        nn.functional.cross_entropy(ddp(x, use), y).backward()
        opt.step()
        opt.zero_grad()
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    block = opt.layers["branch"].block
    result["branch_a"] = block.a_factor.clone()  # type: ignore[attr-defined]
    result["never_a"] = opt.layers["never"].block.a_factor  # type: ignore[attr-defined]
    return result


# -- every registered optimizer under plain DDP, default arguments ------------------------------------------
REPLICA_STEPS = 4


def replica_model() -> nn.Module:
    from settings import tiny_model

    return tiny_model().double()


def replica_data(world: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    n = world * LOCAL_BATCH
    return [
        (torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
        for _ in range(REPLICA_STEPS)
    ]


def shard(model: nn.Module, how: str) -> nn.Module:
    """FSDP2 on the tiny model: ``"layers"``: each Conv2d/Linear and the root; ``"root"``: the root only;
    ``"some"``: the first Linear and the root (the rest sharded as one group)."""
    from torch.distributed.fsdp import fully_shard

    subs = {"layers": [0, 3, 6], "root": [], "some": [3]}[how]
    for i in subs:
        fully_shard(model[i])
    fully_shard(model)
    return model


def replica_train(name: str, world: int, rows: slice, ddp: bool, fsdp: str | None = None, **overrides: Any) -> Tensor:
    """Train the registry's ``name`` (default distributed handling) and return its flat parameters (under DDP,
    or FSDP2 as :func:`shard` says, or in one process)."""
    import warnings

    from kronfac.distributed.sharded import full
    from settings import OPTIMIZERS

    model = replica_model()
    if fsdp is not None:
        shard(model, fsdp)
    run: nn.Module = DistributedDataParallel(model) if ddp else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # first-order fallbacks and placement notes
        opt = OPTIMIZERS[name](model, **overrides)
        for x, y in replica_data(world):
            opt.zero_grad()
            nn.functional.cross_entropy(run(x[rows]), y[rows]).backward()
            opt.step()
    close = getattr(opt, "close", None)
    if close is not None:
        close()
    return torch.cat([full(p.detach()).reshape(-1) for p in model.parameters()])


def fsdp_worker(rank: int, world: int, names: list[str], layouts: list[str]) -> dict[str, Tensor]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return {f"{name} {how}": replica_train(name, world, rows, ddp=False, fsdp=how) for name in names for how in layouts}


def replica_worker(rank: int, world: int, names: list[str]) -> dict[str, Tensor]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    result = {name: replica_train(name, world, rows, ddp=True) for name in names}
    result["kfac per-rank"] = replica_train("kfac", world, rows, ddp=True, distributed=False)
    return result


# -- torch.distributed.checkpoint on 2 ranks, resumed on 2 ranks and in one process -----------------------------
def dcp_run(name: str, world: int, rank: int, ddp: bool, checkpoint: str, mode: str, fsdp: str | None = None) -> Tensor:
    """``mode="save"``: train 3 steps, DCP-save, train 3 more; ``"resume"``: DCP-load, train the last 3 steps
    (under DDP, or FSDP2 as :func:`shard` says with ``fsdp``, or in one process when neither). Returns the flat
    parameters at the end."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from kronfac.distributed.sharded import full
    from settings import OPTIMIZERS

    distributed = ddp or fsdp is not None
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if distributed else slice(None)
    data = replica_data(world) + replica_data(world)[:2]
    model = replica_model()
    if fsdp is not None:
        shard(model, fsdp)
    run: nn.Module = DistributedDataParallel(model) if ddp else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](model) if distributed else OPTIMIZERS[name](model, distributed=False)

        def train(batches: list[tuple[Tensor, Tensor]]) -> None:
            for x, y in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(run(x[rows]), y[rows]).backward()
                opt.step()

        if mode == "save":
            train(data[:3])
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=checkpoint)
        else:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=checkpoint, no_dist=not distributed)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        train(data[3:])
    close = getattr(opt, "close", None)
    if close is not None:
        close()
    return torch.cat([full(p.detach()).reshape(-1) for p in model.parameters()])


def dcp_worker(rank: int, world: int, names: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    root = Path(os.environ["KRONFAC_TEST_OUT"])
    for name in names:
        checkpoint = str(root / f"dcp-{name}")
        out[f"{name} saved"] = dcp_run(name, world, rank, True, checkpoint, "save")
        out[f"{name} resumed"] = dcp_run(name, world, rank, True, checkpoint, "resume")
        if rank == 0:  # the same checkpoint resumed by one process (world size 1) on the global batch
            out[f"{name} one process"] = dcp_run(name, world, rank, False, checkpoint, "resume")
        dist.barrier()
    return out


# -- a tied embedding and head under DDP ----------------------------------------------------------------
class TiedNet(nn.Module):
    """Embedding -> tanh -> Linear head sharing the embedding's weight (GPT-2's wte / lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(tokens)))


def tied_worker(rank: int, world: int, names: list[str]) -> dict[str, Tensor]:
    """Train ``TiedNet`` under DDP (each rank its own rows) with each optimizer and strategy; return the weight."""
    out = {}
    gen = torch.Generator().manual_seed(2)
    data = [torch.randint(0, 9, (world * LOCAL_BATCH, 6), generator=gen) for _ in range(STEPS)]
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for name in names:
        for strategy in ("naive", "spd"):
            torch.manual_seed(0)
            model = TiedNet().double()
            ddp = DistributedDataParallel(model)
            factory = {
                "kfac": lambda m, d: kronfac.KFAC(m, lr=0.1, damping=1e-2, inverse_every=2, distributed=d, **tied),
                "singd": lambda m, d: kronfac.SINGD(m, lr=0.05, damping=1e-2, factor_every=1, distributed=d, **tied),
                "adafisher": lambda m, d: kronfac.AdaFisher(m, lr=1e-2, factor_every=1, distributed=d, **tied),
            }[name]
            opt = factory(model, kronfac.DistributedConfig(strategy=strategy))
            for tokens in data:
                opt.zero_grad()
                logits = ddp(tokens[rows, :-1])
                nn.functional.cross_entropy(logits.reshape(-1, 9), tokens[rows, 1:].reshape(-1)).backward()
                opt.step()
            out[f"{name}-{strategy}"] = model.emb.weight.detach().clone()
            opt.close()
    return out


tied: dict[str, Any] = {"loss_average": "batch+sequence", "factor_dtype": torch.float64}


def fsdp_extras_worker(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 beyond the registry: QE refused clearly, bf16 mixed precision keeps float32 curvature, the MC Fisher
    keeps the shards consistent."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from kronfac.distributed.sharded import full

    out: dict[str, Any] = {}
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    try:
        kronfac.KFAC(shard(replica_model(), "layers"), correction=kronfac.KLDWRM("qe"))
    except ValueError as exc:
        out["qe"] = str(exc)
    torch.manual_seed(0)
    model = replica_model().float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i in (0, 3, 6):
        fully_shard(model[i], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronfac.KFAC(model, lr=0.05, damping=1e-2, inverse_every=1)
        for x, y in replica_data(world)[:2]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[rows].float()).float(), y[rows]).backward()
            opt.step()
    owned = [layer.block for layer in opt.layers.values() if layer.block.a_factor is not None]
    out["bf16 factor dtypes"] = {(b.a_factor.dtype, b.g_factor.dtype) for b in owned}
    out["bf16 params"] = torch.cat([full(p.detach()).reshape(-1) for p in model.parameters()])
    opt.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["mc"] = replica_train("kfac-mc", world, rows, ddp=False, fsdp="layers")
    try:
        kronfac.SINGD(shard(replica_model(), "layers"), distributed=kronfac.DistributedConfig(shard_curvature=True))
    except ValueError as exc:
        out["singd placed"] = str(exc)
    # placement asked for under DDP (plain parameters): same math, the owners broadcast the directions
    out["ddp placed"] = replica_train(
        "kfac", world, rows, ddp=True, distributed=kronfac.DistributedConfig(shard_curvature=True)
    )
    # curvature memory per rank: placed by layer (the FSDP2 default) against replicated
    for label, choice in (("placed", None), ("replicated", False)):
        model = shard(replica_model(), "layers")
        config = kronfac.DistributedConfig(shard_curvature=choice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kronfac.KFAC(model, lr=0.05, damping=1e-2, inverse_every=1, distributed=config)
            for x, y in replica_data(world)[:2]:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
                opt.step()
        held = [
            t for layer in opt.layers.values() for t in (layer.block.a_factor, layer.block.g_factor) if t is not None
        ]
        out[f"{label} bytes"] = sum(t.numel() * t.element_size() for t in held)
        out[f"{label} layers"] = sorted(n for n, layer in opt.layers.items() if layer.block.a_factor is not None)
        opt.close()
    return out


def fsdp_dcp_worker(rank: int, world: int, names: list[str]) -> dict[str, Tensor]:
    """DCP save of an FSDP2 run, resumed under FSDP2 on the same ranks and by one process on the global batch."""
    out: dict[str, Tensor] = {}
    root = Path(os.environ["KRONFAC_TEST_OUT"])
    for name in names:
        checkpoint = str(root / f"fsdp-dcp-{name}")
        out[f"{name} saved"] = dcp_run(name, world, rank, False, checkpoint, "save", fsdp="layers")
        out[f"{name} resumed"] = dcp_run(name, world, rank, False, checkpoint, "resume", fsdp="layers")
        dist.barrier()
        if rank == 0:  # a different world size: the sharded checkpoint resumed by one process
            out[f"{name} one process"] = dcp_run(name, world, rank, False, checkpoint, "resume")
        dist.barrier()
    return out
