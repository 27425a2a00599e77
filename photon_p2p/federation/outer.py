"""Outer optimizers applied to the global weights with the averaged pseudo-gradient (pure torch, no network)."""

from __future__ import annotations

from typing import Any

import torch

from photon_p2p.federation import FederationError

KINDS = ("fedavg", "fedmom", "nesterov")


class OuterOptimizer:
    """FedAvg, FedMom or Nesterov (DiLoCo) on ``params`` in place, given the mean pseudo-gradient Δ̄ = θ − θ_local.

    fedavg:   θ ← θ − lr·Δ̄                 (lr = 1 is plain model averaging, Photon's default)
    fedmom:   m ← μ·m + Δ̄;  θ ← θ − lr·m
    nesterov: m ← μ·m + Δ̄;  θ ← θ − lr·(Δ̄ + μ·m)
    """

    def __init__(self, params: list[torch.Tensor], kind: str, lr: float, momentum: float = 0.0) -> None:
        if kind not in KINDS:
            raise FederationError(f"unknown outer optimizer '{kind}' (choose one of {', '.join(KINDS)})")
        if lr <= 0:
            raise FederationError(f"outer learning rate must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise FederationError(f"outer momentum must be in [0, 1), got {momentum}")
        self.params, self.kind, self.lr, self.momentum = list(params), kind, float(lr), float(momentum)
        # fedavg keeps no state, so a joiner downloads nothing extra for it.
        self.buffers: list[torch.Tensor] = [] if kind == "fedavg" else [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, mean_delta: list[torch.Tensor]) -> None:
        if len(mean_delta) != len(self.params):
            raise FederationError(f"outer step got {len(mean_delta)} tensors for {len(self.params)} parameters")
        if self.kind == "fedavg":
            for p, d in zip(self.params, mean_delta):
                p.sub_(d.to(p.device, p.dtype), alpha=self.lr)
            return
        for p, m, d in zip(self.params, self.buffers, mean_delta):
            d = d.to(p.device, p.dtype)
            m.mul_(self.momentum).add_(d)
            if self.kind == "fedmom":
                p.sub_(m, alpha=self.lr)
            else:
                p.sub_(d + self.momentum * m, alpha=self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum,
                "buffers": [m.detach().clone() for m in self.buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # lr/momentum come from the current config (they may be tuned on resume); only the buffers are state.
        if state.get("kind", self.kind) != self.kind:
            raise FederationError(f"checkpoint has outer optimizer '{state.get('kind')}', config says '{self.kind}'")
        self.load_state_tensors(list(state.get("buffers", [])))

    def state_tensors(self) -> list[torch.Tensor]:
        """The momentum buffers (empty for fedavg), for sharing with joining peers."""
        return [m.detach().clone() for m in self.buffers]

    @torch.no_grad()
    def load_state_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Adopt buffers from ``state_tensors()``; an empty list (e.g. from a fedavg peer) resets momentum."""
        if not self.buffers:
            return
        if not tensors:
            for m in self.buffers:
                m.zero_()
            return
        if len(tensors) != len(self.buffers) or any(m.shape != t.shape for m, t in zip(self.buffers, tensors)):
            raise FederationError("outer optimizer state does not match this model (different shapes or kinds)")
        for m, t in zip(self.buffers, tensors):
            m.copy_(t)
