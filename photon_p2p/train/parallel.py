"""Wrap the (parallelism-agnostic) model for a silo's ranks: DDP, FSDP2 with mixed precision, activation
checkpointing; full (unsharded) state dicts so a checkpoint resumes on any number of ranks (torchtitan style:
model.py never knows about any of this)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from photon_p2p.checkpoint import CheckpointError
from photon_p2p.config import TrainConfig
from photon_p2p.model import Transformer, count_params
from photon_p2p.train.distributed import OP_PULL, OP_PUSH, DistEnv, command, device_mesh

ADAMW_BYTES_PER_PARAM = 16  # fp32 weights + grads + two AdamW moments
FIT_FRACTION = 0.5  # auto picks ddp when that much state takes at most this share of the device (activations)


def choose_parallel(t: TrainConfig, model: Transformer, e: DistEnv) -> str:
    """ddp | fsdp | none for this silo: what the config asks, auto = fsdp only for a model that would not fit."""
    if not e.initialized:
        return "none"
    if t.parallel != "auto":
        return t.parallel
    if e.world_size == 1:
        return "none"
    if e.device.type == "cuda":
        need = count_params(model.cfg) * ADAMW_BYTES_PER_PARAM
        if need > FIT_FRACTION * torch.cuda.get_device_properties(e.device).total_memory:
            return "fsdp"
    return "ddp"


def checkpoint_blocks(model: Transformer) -> None:
    """Activation checkpointing per transformer block: recompute its forward in backward. The block's forward is
    replaced on the instance, so parameter names (checkpoint keys, averaging order) stay exactly as they were."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: Transformer, t: TrainConfig, e: DistEnv, mode: str) -> torch.nn.Module:
    """The module the trainer calls forward on; ``model`` keeps its parameters' names (FSDP2 shards in place)."""
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    if mode == "ddp":
        ids = [e.device.index] if e.device.type == "cuda" else None
        # The model's only buffers are the rotary tables, derived from the config: nothing to broadcast per step
        # (torch 2.13 renamed the switch; setup.cfg allows torch >= 2.1).
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        return ddp(model, device_ids=ids, **{no_sync: False})
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under its former name
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = t.precision == "bf16" or (t.precision == "auto" and e.device.type == "cuda")
        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 sharded master weights (torchtitan's policy)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        mesh = device_mesh(e)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings (tied with lm_head) and the final norm
        return model
    return model


def no_grad_sync(wrapped: torch.nn.Module, mode: str) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if mode == "ddp":
        return wrapped.no_sync()
    if mode == "fsdp":
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(wrapped: Any):
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


# ---- full state dicts: gathered to rank 0 on the host, loaded on rank 0 and broadcast -------------------------
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options(e: DistEnv) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=e.initialized and e.world_size > 1)


def _reshard(wrapped: torch.nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded after a forward without backward (an evaluation, a step whose
    loss was refused); state-dict loads want the sharded (DTensor) ones, so reshard every FSDP module first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule

    for m in wrapped.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_model_state(wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's host ({} on the others); a collective under torchrun."""
    _reshard(wrapped)
    return get_model_state_dict(wrapped, options=_SAVE)


def load_full_model_state(wrapped: torch.nn.Module, state: dict[str, torch.Tensor], e: DistEnv) -> None:
    _reshard(wrapped)
    set_model_state_dict(wrapped, state if e.rank == 0 else {}, options=_load_options(e))


def full_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW state keyed by parameter name (not position or shard), so any rank count can load it."""
    return get_optimizer_state_dict(wrapped, optimizer, options=_SAVE)


def load_full_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              e: DistEnv) -> None:
    state = state if e.rank == 0 else {}
    if e.rank == 0 and state.get("state") and isinstance(next(iter(state["state"])), int):
        if e.world_size > 1:  # a checkpoint from before parallel training: positional keys, one rank only
            raise CheckpointError("this checkpoint's optimizer state predates multi-rank training; resume it with one "
                             "rank once to convert it")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(wrapped, optimizer, state, options=_load_options(e))


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy (pinned when CUDA exists, so copies to and from the device are fast and asynchronous)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return out.copy_(t.detach())


class LocalParams:
    """θ_local as the daemon's GlobalState sees it on rank 0, for a silo of several ranks.

    DDP: ``tensors`` are rank 0's live parameters (every rank holds the same); after rank 0 changes them (a new
    round, a rollback, a sync) ``push`` broadcasts them to the other ranks. FSDP: ``tensors`` are a full copy in
    host memory; ``pull`` gathers the shards into it (the end of a round's local phase), ``push`` loads it into
    every rank's shards. Both are announced to the followers with a control op.
    """

    def __init__(self, model: Transformer, wrapped: torch.nn.Module, e: DistEnv, mode: str) -> None:
        self.model, self.wrapped, self.env, self.mode = model, wrapped, e, mode
        self.names = [n for n, _ in model.named_parameters()]
        # every state-dict key with the index of its parameter: a tied weight (lm_head = embed_tokens) is one
        # parameter but two keys, and a full state dict load wants both
        index = {id(p): i for i, p in enumerate(model.parameters())}
        self.keys = {k: index[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in index}
        # fsdp: the host copy is allocated by the first gather (GlobalState's construction pulls once)
        self.tensors: list[torch.Tensor] = [] if mode == "fsdp" else list(model.parameters())

    def pull(self) -> None:
        """Refresh ``tensors`` from the live (sharded) model: rank 0 announces, every rank gathers."""
        if self.mode == "fsdp":
            command(OP_PULL)
            self.gather()

    def push(self) -> None:
        """Make every rank's model hold ``tensors`` (rank 0's values)."""
        command(OP_PUSH)
        self.scatter()

    # the collective halves, run by rank 0 after announcing and by followers on the op
    def gather(self) -> None:
        full = full_model_state(self.wrapped)
        if self.env.rank != 0:
            return
        if not self.tensors:
            self.tensors = [host_copy(full[n]) for n in self.names]
        for t, n in zip(self.tensors, self.names):
            t.copy_(full[n])

    @torch.no_grad()
    def scatter(self) -> None:
        if self.mode == "fsdp":
            state = {k: self.tensors[i] for k, i in self.keys.items()} if self.env.rank == 0 else {}
            load_full_model_state(self.wrapped, state, self.env)
        else:
            for p in self.model.parameters():
                dist.broadcast(p.data, src=0)
