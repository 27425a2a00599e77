"""Outer optimizers applied to the global weights with the averaged pseudo-gradient (pure torch, no network)."""

from __future__ import annotations

import math
from typing import Any

import torch

from photon_p2p.federation import FederationError

KINDS = ("fedavg", "fedmom", "nesterov", "fedadam", "fedyogi")
SCHEDULES = ("constant", "cosine")


class Yogi(torch.optim.Adam):
    """Adam with Yogi's additive second moment (Zaheer et al. 2018), as FedYogi uses it (Reddi et al. 2021):
    v ← v − (1−β2)·g²·sign(v − g²). Not in torch.optim; everything but the v update is torch's Adam."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                st["step"] += 1
                t = float(st["step"])
                st["exp_avg"].lerp_(g, 1 - b1)
                g2 = g * g
                st["exp_avg_sq"].addcmul_(torch.sign(st["exp_avg_sq"] - g2), g2, value=-(1 - b2))
                # same bias correction and denominator as torch's Adam, so FedAdam and FedYogi differ only in v
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
        return None


def outer_lr_at(round_no: int, lr: float, schedule: str, warmup_rounds: int, total_rounds: int,
                min_lr_ratio: float) -> float:
    """The outer lr of global round ``round_no`` (0-based): linear warmup over ``warmup_rounds``, then constant or
    cosine to ``lr * min_lr_ratio`` at ``total_rounds`` (flat after). Every peer computes it from the shared
    round number, so the schedule is part of the one model without any extra state."""
    if warmup_rounds > 0 and round_no < warmup_rounds:
        return lr * (round_no + 1) / warmup_rounds
    if schedule == "constant" or total_rounds <= warmup_rounds:
        return lr
    progress = min(1.0, (round_no - warmup_rounds) / max(1, total_rounds - warmup_rounds))
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


class OuterOptimizer:
    """FedAvg, FedMom, Nesterov (DiLoCo), FedAdam or FedYogi on ``params`` in place, given the mean pseudo-gradient
    Δ̄ = θ − θ_local, which becomes ``p.grad`` of a torch optimizer (as torchft's DiLoCo does):

    fedavg:   SGD            θ ← θ − lr·Δ̄                 (lr = 1 is plain model averaging, Photon's default)
    fedmom:   SGD momentum   m ← μ·m + Δ̄;  θ ← θ − lr·m
    nesterov: SGD nesterov   m ← μ·m + Δ̄;  θ ← θ − lr·(Δ̄ + μ·m)
    fedadam:  Adam(β1, β2, eps=τ), no weight decay, with Adam's bias correction
    fedyogi:  the same with Yogi's second moment (``Yogi`` above)

    Every state tensor (momentum, Adam moments, the Adam step count) is pre-created, so ``state_tensors()`` has a
    fixed layout from round 0: it is fingerprinted and served to joiners with the weights (global_state.py).
    """

    def __init__(self, params: list[torch.Tensor], kind: str, lr: float, momentum: float = 0.0, *,
                 beta2: float = 0.99, eps: float = 1e-3, schedule: str = "constant", warmup_rounds: int = 0,
                 total_rounds: int = 0, min_lr_ratio: float = 0.0) -> None:
        if kind not in KINDS:
            raise FederationError(f"unknown outer optimizer '{kind}' (choose one of {', '.join(KINDS)})")
        if schedule not in SCHEDULES:
            raise FederationError(f"unknown outer lr schedule '{schedule}' (choose one of {', '.join(SCHEDULES)})")
        if not lr > 0:
            raise FederationError(f"outer learning rate must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise FederationError(f"outer momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= beta2 < 1.0 or not eps > 0:
            raise FederationError(f"outer beta2 must be in [0, 1) and eps > 0, got {beta2}, {eps}")
        if schedule == "cosine" and total_rounds <= 0:
            raise FederationError("a cosine outer lr schedule needs a number of rounds > 0")
        self.params, self.kind, self.lr, self.momentum = list(params), kind, float(lr), float(momentum)
        self.schedule = (schedule, int(warmup_rounds), int(total_rounds), float(min_lr_ratio))
        if kind in ("fedavg", "fedmom", "nesterov"):
            mu = 0.0 if kind == "fedavg" else self.momentum
            self.opt: torch.optim.Optimizer = torch.optim.SGD(self.params, lr=self.lr, momentum=mu,
                                                              nesterov=kind == "nesterov")
            self._names = [] if kind == "fedavg" else ["momentum_buffer"]  # fedavg: a joiner downloads nothing extra
        else:
            cls = torch.optim.Adam if kind == "fedadam" else Yogi
            # momentum is β1 (Reddi et al. use 0.9); eps is their τ, the adaptivity floor
            self.opt = cls(self.params, lr=self.lr, betas=(self.momentum, float(beta2)), eps=float(eps),
                           weight_decay=0.0, foreach=False)
            self._names = ["exp_avg", "exp_avg_sq"]
        self._init_state()

    def _init_state(self) -> None:
        for p in self.params:
            st = self.opt.state[p]
            st.clear()
            for name in self._names:
                st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.kind in ("fedadam", "fedyogi"):
                st["step"] = torch.tensor(0.0)

    def lr_at(self, round_no: int) -> float:
        return outer_lr_at(round_no, self.lr, *self.schedule)

    @torch.no_grad()
    def step(self, mean_delta: list[torch.Tensor], round_no: int = 0) -> float:
        """One outer step of global round ``round_no`` (which sets the scheduled lr); returns the lr used."""
        if len(mean_delta) != len(self.params):
            raise FederationError(f"outer step got {len(mean_delta)} tensors for {len(self.params)} parameters")
        lr = self.lr_at(round_no)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for p, d in zip(self.params, mean_delta):
            p.grad = d.to(p.device, p.dtype)
        self.opt.step()
        for p in self.params:
            p.grad = None
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum, "buffers": self.state_tensors()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # lr/momentum come from the current config (they may be tuned on resume); only the buffers are state.
        if state.get("kind", self.kind) != self.kind:
            raise FederationError(f"checkpoint has outer optimizer '{state.get('kind')}', config says '{self.kind}'")
        self.load_state_tensors(list(state.get("buffers", [])))

    def _slots(self) -> list[torch.Tensor]:
        """The live state tensors in a fixed order: each kind's buffers for every parameter, then Adam's steps."""
        slots = [self.opt.state[p][name] for name in self._names for p in self.params]
        if self.kind in ("fedadam", "fedyogi"):
            slots += [self.opt.state[p]["step"] for p in self.params]
        return slots

    def state_tensors(self) -> list[torch.Tensor]:
        """Copies of the optimizer state (empty for fedavg), for sharing with joining peers and checkpoints."""
        return [t.detach().clone() for t in self._slots()]

    def state_mismatch(self, tensors: list[torch.Tensor]) -> str:
        """Why ``tensors`` cannot be this optimizer's state ("" if they can, or if there is nothing to load)."""
        slots = self._slots()
        if not slots or not tensors:
            return ""
        if len(tensors) != len(slots) or any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(slots, tensors)):
            return "outer optimizer state does not match this model (different shapes or kinds)"
        return ""

    @torch.no_grad()
    def load_state_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Adopt state from ``state_tensors()``; an empty list (e.g. from a fedavg peer, or a healed round)
        resets it."""
        slots = self._slots()
        if not slots:
            return
        if not tensors:
            self._init_state()
            return
        why = self.state_mismatch(tensors)
        if why:
            raise FederationError(why)
        for s, t in zip(slots, tensors):
            s.copy_(t)
