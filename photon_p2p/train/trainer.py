"""LocalTrainer: AdamW inner steps with warmup+cosine, clipping, accumulation, bf16 autocast, eval perplexity."""

from __future__ import annotations

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
from photon_p2p.train.device import autocast, pick_device
from photon_p2p.train.schedule import lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' gains (1-d) are not regularised, as in nanoGPT/Llama."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LocalTrainer:
    """Owns the model, the inner optimizer and the data cursor of one silo."""

    def __init__(self, cfg: Config, model: Transformer, train_data: TokenDataset,
                 val_data: TokenDataset | None = None, peer: str | int = 0) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t)
        self.model = model.to(self.device)
        self.micro_batch = t.batch_size // t.grad_accum
        self.sampler = BatchSampler(train_data, cfg.model.seq_len, self.micro_batch, seed=t.seed, peer=peer)
        self.val_data = val_data
        self.optimizer = self._new_optimizer()
        # torch.compile only wraps the forward; state dicts keep using the plain module.
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.step = 0  # optimizer steps taken so far (drives the schedule)
        self.tokens = 0  # training tokens consumed so far
        self.last_loss = float("nan")

    def _new_optimizer(self) -> torch.optim.AdamW:
        t = self.cfg.train
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                 eps=t.eps, fused=fused)

    def reset_optimizer_state(self) -> None:
        """Forget AdamW moments (Photon's 'reset' policy for inner state between rounds)."""
        self.optimizer.state.clear()

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.seq_len

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean training loss."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for _ in range(t.grad_accum):
            x, y = next(self.sampler)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(t, self.device):
                _, loss = self.forward(x, y)
            (loss / t.grad_accum).backward()
            total += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.last_loss = float(total) / t.grad_accum
        return self.last_loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over a fixed set of validation windows (same windows every call)."""
        if self.val_data is None:
            return {}
        t = self.cfg.train
        self.model.eval()
        losses = []
        # A fixed eval batch size makes runs with different training batches score the very same windows.
        batch = t.eval_batch_size or self.micro_batch
        for x, y in eval_batches(self.val_data, self.cfg.model.seq_len, batch, t.eval_batches):
            with autocast(t, self.device):
                _, loss = self.forward(x.to(self.device), y.to(self.device))
            losses.append(float(loss))
        self.model.train()
        val_loss = sum(losses) / max(1, len(losses))
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "tokens": self.tokens,
                "sampler": self.sampler.state_dict(), "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.sampler.load_state_dict(state["sampler"])
        self.last_loss = float(state.get("last_loss", float("nan")))


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
