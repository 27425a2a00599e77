"""Learning-rate schedule: linear warmup then cosine decay to ``lr * min_lr_ratio`` (Photon's recipe)."""

from __future__ import annotations

import math

from photon_p2p.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based optimizer step ``step``; flat at the floor after ``max_steps``."""
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
