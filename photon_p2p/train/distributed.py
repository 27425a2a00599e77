"""One silo over several ranks (torchrun): rank 0 leads, the other ranks follow its decisions in lockstep.

Only rank 0 runs the solo loop or the daemon (and so the swarm: DHT, averager, heartbeat). Every action that
needs all ranks (a training step, an evaluation, gathering or loading state) is announced by rank 0 with a small
control tensor ``[op, arg]`` broadcast to the others, which run ``follow`` and do the same collective. Decisions
(when a round ends under the swarm clock, rollbacks, stop/SIGINT, the schedule position after a sync) are
therefore rank 0's alone and reach the followers as the next op, never as a guess of their own.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from photon_p2p.config import ConfigError, TrainConfig
from photon_p2p.train.device import pick_device

# Control ops rank 0 broadcasts; each names one collective the followers take part in (LocalTrainer.collectives).
OP_STOP, OP_STEP, OP_EVAL, OP_RESET_OPT, OP_PULL, OP_PUSH, OP_SAVE_MODEL, OP_SAVE_TRAINER, OP_LOAD_MODEL, \
    OP_LOAD_TRAINER = range(10)
OP_NAMES = ["stop", "step", "eval", "reset_opt", "pull", "push", "save_model", "save_trainer", "load_model",
            "load_trainer"]


@dataclass
class DistEnv:
    """Where this process sits in its silo: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False  # a process group exists (started by torchrun)
    parallel: str = "none"  # what train/parallel.py wraps the model with: none | ddp | fsdp

    @property
    def leads(self) -> bool:
        """Rank 0 of a silo with followers: its collective actions are announced first."""
        return self.initialized and self.world_size > 1 and self.rank == 0

    @property
    def follows(self) -> bool:
        return self.initialized and self.rank != 0


_ENV: DistEnv | None = None
_MESHES: list[Any] = []  # device meshes made for FSDP2 (device_mesh), released by shutdown


def env() -> DistEnv:
    """This process's place in the silo (one rank on the picked device until init_distributed says otherwise)."""
    return _ENV if _ENV is not None else DistEnv()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def init_distributed(t: TrainConfig) -> DistEnv:
    """Join the silo's process group when started by torchrun (gloo on CPU, NCCL on CUDA); else one rank."""
    global _ENV
    device = pick_device(t)
    if not launched_by_torchrun():
        if t.parallel in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel is {t.parallel} but this process was not started by torchrun; run "
                              f"`torchrun --nproc-per-node N $(which photon-peer) ...` or set train.parallel=auto")
        _ENV = DistEnv(device=device)
        return _ENV
    _die_with_agent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and t.parallel == "none":
        raise ConfigError(f"train.parallel is none but torchrun started {world} ranks; use auto, ddp or fsdp")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=t.dist_timeout))
    _ENV = DistEnv(rank, world, local_rank, device, True)
    return _ENV


def _die_with_agent() -> None:
    """torchrun starts each rank in its own session, so a SIGKILLed agent (a crashed silo) would leave rank 0 in
    the swarm and the followers waiting: each rank dies with its parent instead (Linux PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # not torchrun's child (a script's own process group): its parent is no agent
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent died before the call above
        os._exit(1)


def device_mesh(e: DistEnv) -> Any:
    """The silo's 1-D device mesh over all its ranks (FSDP2 shards over it); shutdown releases it."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(e.device.type, (e.world_size,))
    _MESHES.append(mesh)
    return mesh


def shutdown() -> None:
    """Rank 0 releases its followers (OP_STOP); every rank leaves the process group."""
    global _ENV
    e = env()
    if e.initialized and dist.is_initialized():
        if e.leads:
            command(OP_STOP)
        # Every rank arrives here (followers return on OP_STOP): leaving together keeps one rank from tearing
        # down its gloo pairs while the other still uses them, which aborted rank 0 ("terminate called without
        # an active exception") about once in 15 runs under load.
        dist.barrier()
        # destroy_process_group only unregisters the group; its gloo threads live until the last reference goes.
        # The trainer's DDP/FSDP wrapper holds one, and a trainer sits in a reference cycle (its collectives
        # are bound methods), so without a collection here the group was torn down during interpreter shutdown:
        # once in CI a follower aborted there ("terminate called without an active exception") after a good run.
        # Collected here, the group's threads are joined by destroy_process_group, while Python is whole.
        gc.collect()
        # DTensor's sharding caches keep the FSDP2 mesh alive, and the mesh holds its process group: drop that
        # reference too (the mesh is unusable after destroy_process_group anyway).
        for mesh in _MESHES:
            getattr(mesh, "_pg_registry", {}).clear()
        _MESHES.clear()
        dist.destroy_process_group()
    _ENV = None


def _control_device() -> torch.device:
    return env().device if env().device.type == "cuda" else torch.device("cpu")


def command(op: int, arg: int = 0) -> None:
    """Rank 0 announces a collective action to its followers (nothing to do with one rank)."""
    if env().leads:
        dist.broadcast(torch.tensor([op, arg], dtype=torch.int64, device=_control_device()), src=0)


def receive() -> tuple[int, int]:
    """A follower waits (at most train.dist_timeout) for rank 0's next action."""
    ctl = torch.zeros(2, dtype=torch.int64, device=_control_device())
    dist.broadcast(ctl, src=0)
    return int(ctl[0]), int(ctl[1])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's small Python object on every rank (trainer counters, sampler cursor)."""
    if not (env().initialized and env().world_size > 1):
        return obj
    box = [obj if env().rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_control_device())
    return box[0]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The silo's mean of a per-rank scalar (each rank's loss is over its own windows)."""
    e = env()
    if not (e.initialized and e.world_size > 1):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return x / e.world_size


def in_turn(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first, then on each node's first rank, then on the rest (e.g. preparing the default
    data set into the run dir once per node instead of racing)."""
    e = env()
    if not (e.initialized and e.world_size > 1):
        return fn()
    turn = 0 if e.rank == 0 else (1 if e.local_rank == 0 else 2)
    result = None
    for t in range(3):
        if t == turn:
            result = fn()
        dist.barrier()
    return result


def follow(collectives: dict[int, Callable[[int], Any]]) -> int:
    """A follower's whole job: do what rank 0 announces until it says stop; returns the number of ops done."""
    # Ctrl-C reaches every rank of the terminal's process group, and torchrun forwards SIGTERM: rank 0 decides
    # when to stop (and still needs us for its final checkpoint), so a follower ignores both.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    done = 0
    while True:
        op, arg = receive()
        if op == OP_STOP:
            return done
        if op not in collectives:
            raise RuntimeError(f"rank {env().rank}: unknown control op {op} from rank 0 (mismatched versions?)")
        collectives[op](arg)
        done += 1
