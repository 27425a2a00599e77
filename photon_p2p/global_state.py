"""GlobalState: the model every silo shares (global weights, outer optimizer, round), fingerprinted and served."""

from __future__ import annotations

import threading
from typing import Any

import torch

from photon_p2p.config import FederationConfig
from photon_p2p.federation import FederationError
from photon_p2p.federation.outer import OuterOptimizer
from photon_p2p.federation.identity import fingerprint
from photon_p2p.train.parallel import host_copy


class GlobalState:
    """θ_global, the outer optimizer and the round, next to the silo's live local parameters ``params``.

    Every change goes through a method here, under ``lock`` (hivemind serves joiners from another thread) and
    drops the cached fingerprint, so what a peer reports always describes what it holds.
    In a torchrun silo the methods that read or write θ_local (pseudo_gradient, apply, reset_local, restore_local,
    adopt) talk to the other ranks (collectives): call them from the thread that trains, never from a helper.
    """

    def __init__(self, params: list[torch.nn.Parameter] | Any, fed: FederationConfig) -> None:
        # On a silo of several ranks θ_local is a view (train/parallel.py LocalParams) that is pulled from the
        # ranks before it is read and pushed to them after it is written; on one rank, the live parameters.
        self.local = params if hasattr(params, "pull") else None
        self.params = list(params.tensors if self.local is not None else params)
        # The global copy (and so the averager's buffers) lives in host memory, pinned when CUDA exists.
        self.weights = [host_copy(p) for p in self.params]
        self.outer = OuterOptimizer(self.weights, fed.outer_optimizer, fed.outer_lr, fed.outer_momentum,
                                    beta2=fed.outer_beta2, eps=fed.outer_eps, schedule=fed.outer_lr_schedule,
                                    warmup_rounds=fed.outer_warmup_rounds, total_rounds=fed.rounds,
                                    min_lr_ratio=fed.outer_min_lr_ratio)
        self.residual = [torch.zeros_like(w) for w in self.weights] if fed.error_feedback else None
        self.round = 0
        self.last_outer_lr = 0.0  # the scheduled outer lr of the last outer step (0 before any), for round records
        self.lock = threading.Lock()
        self._fingerprint: str | None = None

    # ---- identity ----------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """What is shared and fingerprinted: the weights, then the outer optimizer's buffers."""
        return self.weights + self.outer.state_tensors()

    def fingerprint(self) -> str:
        """sha256 of the global state: equal on two peers iff they hold one model (momentum included)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.tensors())
        return self._fingerprint

    def _changed(self) -> None:
        self._fingerprint = None

    # ---- the round ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """Δ = θ_global − θ_local, plus the error-feedback residual of earlier rounds."""
        if self.local is not None:
            self.local.pull()
        deltas = [w - p.detach().to(w.device) for w, p in zip(self.weights, self.params)]
        if self.residual is not None:
            for d, r in zip(deltas, self.residual):
                d.add_(r)
        return deltas

    @torch.no_grad()
    def apply(self, mean: list[torch.Tensor], healed: bool = False,
              carry_from: list[torch.Tensor] | None = None) -> None:
        """End a round: the outer step with the mean Δ, or (healed) adopt the mean local weights and restart the
        outer momentum, so a group that held several models leaves on one. The local model restarts from it, or
        (``carry_from``: θ_local when Δ was taken, federation.overlap) keeps the progress made since then on top."""
        if carry_from is not None and self.local is not None:
            self.local.pull()  # the other ranks trained on meanwhile
        with self.lock:
            if healed:
                for w, avg in zip(self.weights, mean):
                    w.copy_(avg)
                self.outer.load_state_tensors([])
            else:
                self.last_outer_lr = self.outer.step(mean, self.round)  # the global round sets the outer lr
            if carry_from is None:
                self.reset_local()
            else:  # θ_local ← θ_new + (θ_local − θ_local at Δ): the next Δ is exactly the work done since
                for p, w, base in zip(self.params, self.weights, carry_from):
                    p.add_((w - base).to(p.device))
                self._pushed()
            self.round += 1
            self._changed()

    @torch.no_grad()
    def reset_local(self) -> None:
        """θ_local ← θ_global (a new round, or a rollback after a bad step)."""
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
        self._pushed()

    @torch.no_grad()
    def restore_local(self, tensors: list[torch.Tensor]) -> None:
        """θ_local ← ``tensors`` (put back local work after evaluating the global weights)."""
        for p, t in zip(self.params, tensors):
            p.copy_(t)
        self._pushed()

    def _pushed(self) -> None:
        if self.local is not None:
            self.local.push()  # every rank of the silo now trains from these values

    @torch.no_grad()
    def skip_round(self) -> None:
        """A round no group averaged: same global weights, next round number; the local work is kept."""
        with self.lock:
            self.round += 1

    # ---- sharing -----------------------------------------------------------------------------------------
    def serve(self, **meta: Any) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads; a non-finite state is never served."""
        with self.lock:
            tensors = [t.detach().clone() for t in self.tensors()]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise FederationError("refusing to serve a non-finite state")  # hivemind fails that request
            # n_tensors: a stream cut short (the server exited mid-download) ends like a whole one in hivemind
            return {"round": self.round, "n_params": len(self.weights), "n_tensors": len(tensors),
                    "fingerprint": self.fingerprint(), **meta}, tensors

    def mismatch(self, meta: Any, tensors: list[torch.Tensor]) -> str:
        """Why a downloaded state cannot be this peer's ("" if it can): checked before anything is copied, so a
        bad state from the network is refused whole. A state whose round or parameter count is not a count, or
        whose outer state had another shape, once raised halfway through adopting it and stopped the daemon."""
        def count(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0
        if not isinstance(meta, dict) or not count(meta.get("round")) or not count(meta.get("inner_step", 0)):
            return "its round or step is not a count"
        n = len(self.weights)
        if meta.get("n_params") != n or len(tensors) < n:
            return "the swarm's model does not match this peer's config (different model shape)"
        for w, t in zip(self.weights, tensors[:n]):
            if not isinstance(t, torch.Tensor) or w.shape != t.shape or w.dtype != t.dtype:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return f"the swarm's model has a tensor of shape {shape} where this config has {tuple(w.shape)}"
        return self.outer.state_mismatch(tensors[n:])

    @torch.no_grad()
    def adopt(self, meta: dict, tensors: list[torch.Tensor], carry_local: bool = False) -> None:
        """Take a downloaded state (``mismatch`` first: nothing is copied from one that does not fit);
        ``carry_local`` keeps this silo's un-averaged progress on top of it (θ_local ← θ_new − Δ_own), to be
        averaged in the next round."""
        why = self.mismatch(meta, tensors)
        if why:
            raise FederationError(why)
        n = len(self.weights)
        if carry_local and self.local is not None:
            self.local.pull()
        with self.lock:
            for w, p, t in zip(self.weights, self.params, tensors[:n]):
                if carry_local:
                    p.add_((t - w).to(p.device))
                else:
                    p.copy_(t)
                w.copy_(t)
            self._pushed()
            self.outer.load_state_tensors(tensors[n:])
            self.round = int(meta["round"])
            self._changed()

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "outer": self.outer.state_dict(), "residual": self.residual}

    @torch.no_grad()
    def load_weights(self, weights: list[torch.Tensor]) -> None:
        """The global weights from a checkpoint (in the model's parameter order)."""
        for w, saved in zip(self.weights, weights):
            w.copy_(saved)
        self._changed()

    @torch.no_grad()
    def load_state_dict(self, fed: dict[str, Any]) -> None:
        """The round, the outer optimizer and the error-feedback residual from a checkpoint."""
        if "outer" in fed:
            self.outer.load_state_dict(fed["outer"])
        if self.residual is not None and fed.get("residual") is not None:
            for r, saved in zip(self.residual, fed["residual"]):
                r.copy_(saved)
        self.round = int(fed.get("round", 0))
        self._changed()
