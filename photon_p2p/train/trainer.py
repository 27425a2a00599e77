"""LocalTrainer: AdamW inner steps with warmup+cosine, clipping, accumulation, bf16 autocast, eval perplexity;
the same loop on one rank or on a silo of several (train/parallel.py wraps the model, train/distributed.py syncs)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from photon_p2p.config import Config, ConfigError
from photon_p2p.data import DataError
from photon_p2p.data.loader import BatchSampler, TokenDataset, eval_batches, read_manifest
from photon_p2p.data.tokenizer import tokenizer_sha256
from photon_p2p.model import Transformer
from photon_p2p.train import distributed
from photon_p2p.train.device import autocast, pick_device
from photon_p2p.train.parallel import (
    LocalParams,
    choose_parallel,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    no_grad_sync,
    parallelize,
)
from photon_p2p.train.schedule import lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' gains (1-d) are not regularised, as in nanoGPT/Llama."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LocalTrainer:
    """Owns the model, the inner optimizer and the data cursor of one silo (all of its ranks under torchrun).

    On a silo of several ranks every public method that needs all ranks is announced by rank 0 first
    (train/distributed.py) and ``collectives`` holds what a follower runs for each announcement, so rank 0's loop
    (solo or daemon) is the only loop and the followers do exactly what it decides.
    """

    def __init__(self, cfg: Config, model: Transformer, train_data: TokenDataset,
                 val_data: TokenDataset | None = None, peer: str | int = 0) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.dist = distributed.env()
        self.device = self.dist.device if self.dist.initialized else pick_device(t)
        self.model = model.to(self.device)  # the plain module: parameter names, checkpoints, averaging order
        self.parallel = choose_parallel(t, self.model, self.dist)
        self.dist.parallel = self.parallel
        self.wrapped = parallelize(self.model, t, self.dist, self.parallel)
        self.micro_batch = t.batch_size // t.grad_accum
        # Every rank draws the silo's micro-batch of micro_batch x ranks windows and reads its own slice, so a
        # silo's data does not depend on how many ranks share it (2 ranks x b = 1 rank x 2b, window for window).
        self.sampler = BatchSampler(train_data, cfg.model.seq_len, self.micro_batch, seed=t.seed, peer=peer,
                                    rank=self.dist.rank, world=self.dist.world_size)
        self.val_data = val_data
        self.optimizer = self._new_optimizer()
        # torch.compile only wraps the forward; state dicts keep using the plain module.
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.step = 0  # optimizer steps taken so far (drives the schedule)
        self.tokens = 0  # training tokens consumed so far (by the whole silo)
        self.last_loss = float("nan")
        self._local_params: LocalParams | None = None
        self.collectives = {
            distributed.OP_STEP: self._follow_step,
            distributed.OP_EVAL: lambda _: self._evaluate(),
            distributed.OP_RESET_OPT: lambda _: self.optimizer.state.clear(),
            distributed.OP_PULL: lambda _: self._params_view().gather(),
            distributed.OP_PUSH: lambda _: self._params_view().scatter(),
            distributed.OP_SAVE_MODEL: lambda _: full_model_state(self.wrapped),
            distributed.OP_SAVE_TRAINER: lambda _: self._state_dict(),
            distributed.OP_LOAD_MODEL: lambda _: self._load_model_state_dict({}),
            distributed.OP_LOAD_TRAINER: lambda _: self._load_state_dict({}),
        }

    def _new_optimizer(self) -> torch.optim.AdamW:
        t = self.cfg.train
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                 eps=t.eps, fused=fused)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def reset_optimizer_state(self) -> None:
        """Forget AdamW moments (Photon's 'reset' policy for inner state between rounds)."""
        distributed.command(distributed.OP_RESET_OPT)
        self.optimizer.state.clear()

    @property
    def tokens_per_step(self) -> int:
        """The silo's tokens per optimizer step: every rank's batch (the silo's weight in averaging)."""
        return self.cfg.train.batch_size * self.cfg.model.seq_len * self.dist.world_size

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the silo's mean training loss."""
        distributed.command(distributed.OP_STEP, self.step)  # the followers take the same step, at rank 0's step
        return self._train_step()

    def _follow_step(self, step: int) -> None:
        self.step = step  # rank 0's schedule position (a sync from the swarm may have moved it)
        self._train_step()

    def _train_step(self) -> float:
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.wrapped.train()
        total = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            x, y = next(self.sampler)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == t.grad_accum - 1
            with contextlib.nullcontext() if last else no_grad_sync(self.wrapped, self.parallel):
                with autocast(t, self.device):
                    _, loss = self.forward(x, y)
                (loss / t.grad_accum).backward()
            total += loss.detach().float()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        # Every rank ends the step with the same loss, so every rank would judge it (non-finite guard) alike.
        self.last_loss = float(distributed.mean_over_ranks(total)) / t.grad_accum
        return self.last_loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over a fixed set of validation windows (same windows every call)."""
        if self.val_data is None:
            return {}
        distributed.command(distributed.OP_EVAL)
        return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        self.wrapped.eval()
        losses = []
        # A fixed eval batch size makes runs with different training batches score the very same windows.
        # Every rank scores all of them (FSDP needs every rank in every forward): same result on each.
        batch = t.eval_batch_size or self.micro_batch
        for x, y in eval_batches(self.val_data, self.cfg.model.seq_len, batch, t.eval_batches):
            with autocast(t, self.device):
                _, loss = self.forward(x.to(self.device), y.to(self.device))
            losses.append(float(loss))
        self.wrapped.train()
        val_loss = sum(losses) / max(1, len(losses))
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ---- θ_local for the daemon ------------------------------------------------------------------------------
    def _params_view(self) -> LocalParams:
        if self._local_params is None:
            self._local_params = LocalParams(self.model, self.wrapped, self.dist, self.parallel)
        return self._local_params

    def local_params(self) -> list[torch.nn.Parameter] | LocalParams:
        """What GlobalState holds as θ_local: the live parameters on one rank, a synced view on several."""
        if self.parallel != "fsdp" and self.dist.world_size == 1:
            return list(self.model.parameters())
        view = self._params_view()
        view.pull()
        return view

    # ---- state (full, unsharded: resumable on any number of ranks) --------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (gathered from every rank's shard under FSDP)."""
        if self.parallel == "none":
            return self.model.state_dict()
        distributed.command(distributed.OP_SAVE_MODEL)
        return full_model_state(self.wrapped)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.parallel == "none":
            self.model.load_state_dict(state)
            return
        distributed.command(distributed.OP_LOAD_MODEL)
        self._load_model_state_dict(state)

    def _load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_full_model_state(self.wrapped, state, self.dist)

    def state_dict(self) -> dict[str, Any]:
        distributed.command(distributed.OP_SAVE_TRAINER)
        return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {"optimizer": full_optimizer_state(self.wrapped, self.optimizer), "step": self.step,
                "tokens": self.tokens, "sampler": self.sampler.state_dict(), "last_loss": self.last_loss,
                "world_size": self.dist.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distributed.command(distributed.OP_LOAD_TRAINER)
        self._load_state_dict(state)

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.wrapped, self.optimizer, state.get("optimizer", {}), self.dist)
        counters = distributed.broadcast_object({k: state.get(k) for k in ("step", "tokens", "sampler", "last_loss")})
        self.step, self.tokens = int(counters["step"]), int(counters["tokens"])
        self.sampler.load_state_dict(counters["sampler"])
        last = counters.get("last_loss")
        self.last_loss = float(last) if last is not None else float("nan")


def _tokenizer_hash(data_dir: str | Path, manifest: dict) -> str:
    """The manifest's tokenizer hash, or the hash of the dir's tokenizer file for manifests without one."""
    return manifest.get("tokenizer_sha256") or tokenizer_sha256(Path(data_dir) / manifest["tokenizer"])


def shared_val_data(data_dir: str | Path, val_dir: str | Path) -> TokenDataset:
    """The 'val' split of ``val_dir`` (data.val_dir), checked to be tokenized like the training data:
    perplexities under two different tokenizers are not comparable, so a mismatch is an error."""
    val_manifest = read_manifest(val_dir)
    if not val_manifest["val"]:
        raise DataError(f"data.val_dir {val_dir} has no validation split (prepared with val_fraction 0)")
    if _tokenizer_hash(val_dir, val_manifest) != _tokenizer_hash(data_dir, read_manifest(data_dir)):
        raise DataError(f"data.val_dir {val_dir} was tokenized with a different tokenizer than the training "
                        f"data {data_dir}; prepare both with the same tokenizer")
    return TokenDataset(val_dir, "val")


def build_trainer(cfg: Config, data_dir: str, peer: str | int = 0) -> LocalTrainer:
    """Model + datasets + trainer for a prepared data directory; validation is optional."""
    train_data = TokenDataset(data_dir, "train")
    if train_data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the data's tokenizer has {train_data.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; raise model.vocab_size")
    if cfg.data.val_dir:
        val_data: TokenDataset | None = shared_val_data(data_dir, cfg.data.val_dir)
    else:
        # No validation split (val_fraction 0) means no perplexity; a damaged one is an error, not a silent skip.
        val_data = TokenDataset(data_dir, "val") if read_manifest(data_dir)["val"] else None
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    return LocalTrainer(cfg, model, train_data, val_data, peer=peer)


class Throughput:
    """Tokens/s over the last interval, for logs and heartbeats."""

    def __init__(self) -> None:
        self.t0, self.tokens0 = time.perf_counter(), 0

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens0) / max(1e-9, now - self.t0)
        self.t0, self.tokens0 = now, tokens
        return rate
