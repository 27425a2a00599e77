"""A stand-in for LocalTrainer whose inner step sleeps instead of computing: many real peers on a few cores.

bench/scale.py and the many-peer tests inject it into ``PeerDaemon`` (``make_trainer``) like they inject the
swarm: everything from the round loop outward is the real thing (DHT, p2pd, averager, matchmaking, all-reduce),
while a step costs ``step_s`` seconds of wall time (× ``slow``, × jitter drawn per step) and almost no CPU. A
step moves every weight by a small pseudo-random amount drawn from (seed, silo, step), so Δ is never zero and
two silos' models differ until they average.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from typing import Any

import torch


class SimModel(torch.nn.Module):
    """``tensors`` flat fp32 parameters of ``numel`` values each (names ``w0``, ``w1``, ...)."""

    def __init__(self, numel: int, tensors: int = 1) -> None:
        super().__init__()
        for i in range(tensors):
            self.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros(numel)))


class SimTrainer:
    """The part of LocalTrainer's interface the daemon uses, with a simulated inner step."""

    world_size = 1
    device = torch.device("cpu")
    parallel = "none"

    def __init__(self, silo: str, numel: int = 65536, step_s: float = 0.1, slow: float = 1.0, jitter: float = 0.1,
                 tokens_per_step: int = 1024, seed: int = 0, tensors: int = 1) -> None:
        self.silo, self.step_s, self.slow, self.jitter = silo, step_s, slow, jitter
        self.tokens_per_step = tokens_per_step
        self.model = SimModel(numel, tensors)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)  # only its param_groups are read
        self.step, self.tokens, self.last_loss = 0, 0, float("nan")
        self._rng = random.Random(f"{seed}/{silo}")
        self._gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{silo}".encode()))

    def train_step(self) -> float:
        time.sleep(max(0.0, self.step_s * self.slow * (1 + self.jitter * (2 * self._rng.random() - 1))))
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=self._gen), alpha=1e-3)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.last_loss = 2.0 + 4.0 / math.sqrt(self.step)
        return self.last_loss

    def evaluate(self) -> dict[str, float]:
        loss = self.last_loss if math.isfinite(self.last_loss) else 6.0
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def local_params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def reset_optimizer_state(self) -> None:
        pass

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.last_loss = float(state.get("last_loss", float("nan")))
