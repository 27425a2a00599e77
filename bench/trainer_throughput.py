#!/usr/bin/env python
"""Tokens/s of LocalTrainer vs a bare torch loop (same model, batch, optimizer), interleaved in one run.

Usage: python bench/trainer_throughput.py [--config tiny] [--steps 30] [--repeats 3] [--set KEY=VALUE ...]
Prints one JSON line per config with both rates and their ratio (goal: trainer >= 0.97x bare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from photon_p2p.config import load_config
from photon_p2p.data.embedded import ensure_default_dataset
from photon_p2p.model import Transformer, flops_per_token
from photon_p2p.train.trainer import build_trainer
from photon_p2p.train.device import autocast


def bare_loop(cfg, steps: int) -> float:
    """The reference: model + fused-free AdamW + random tokens already in memory, nothing else."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer(cfg.model).to(device)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=device.type == "cuda")
    micro = t.batch_size // t.grad_accum
    x = torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.seq_len + 1), device=device)

    def step() -> None:
        for _ in range(t.grad_accum):
            with autocast(t, device):
                logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * t.batch_size * cfg.model.seq_len / (time.perf_counter() - t0)


def trainer_loop(cfg, data_dir: str, steps: int) -> float:
    trainer = build_trainer(cfg, data_dir)
    for _ in range(3):
        trainer.train_step()
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.device)
    return steps * trainer.tokens_per_step / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    cfg = load_config([args.config], args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(ensure_default_dataset(tmp, ["kjv"], progress=False))
        ours, bare = [], []
        for _ in range(args.repeats):  # interleave so machine noise hits both sides alike
            bare.append(bare_loop(cfg, args.steps))
            ours.append(trainer_loop(cfg, data_dir, args.steps))
    o, b = statistics.median(ours), statistics.median(bare)
    out = {"config": args.config, "overrides": args.overrides, "device": "cuda" if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads(), "trainer_tok_s": round(o), "bare_tok_s": round(b),
           "ratio": round(o / b, 3)}
    if torch.cuda.is_available():
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
        name = torch.cuda.get_device_name()
        out["gpu"] = name
        for k, v in peak.items():
            if k in name:
                out["mfu"] = round(o * flops_per_token(cfg.model) / v, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
