"""Device and precision selection: bf16 autocast on CUDA, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

from photon_p2p.config import ConfigError, TrainConfig


def pick_device(cfg: TrainConfig, where: str = "train.device") -> torch.device:
    """``where``: what the user set the device with, for the message (sample's --device names its flag)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{where} is '{cfg.device}' but no CUDA device is available")
    try:
        return torch.device(cfg.device)
    except RuntimeError:  # torch's message lists every device type it knows; ours names the key
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from None


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where it pays (CUDA, or when asked for explicitly); otherwise a no-op."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
