"""PeerDaemon: one silo's `photon-peer run` — owns the DHT, the trainer and the round loop."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from photon_p2p import __version__
from photon_p2p.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from photon_p2p.config import Config, dump_yaml
from photon_p2p.federation import FederationError
from photon_p2p.federation.averaging import PseudoGradientAverager, RoundResult
from photon_p2p.federation.compression import roundtrip
from photon_p2p.federation.network import parse_multiaddrs, start_dht, visible_maddrs
from photon_p2p.federation.outer import OuterOptimizer
from photon_p2p.federation.records import HeartbeatPublisher, install_validators, read_run_ids
from photon_p2p.metrics import MetricsLogger
from photon_p2p.train.solo import resolve_data_dir, restore_trainer, trainer_checkpoint
from photon_p2p.train.trainer import LocalTrainer, Throughput, build_trainer

log = logging.getLogger("photon_p2p.daemon")


class PeerDaemon:
    """Trains H local steps, averages Δ = θ_global − θ_local with a DHT-matched group, applies the outer step."""

    def __init__(self, cfg: Config, stop: threading.Event | None = None, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.stop = stop or threading.Event()
        self.run_dir = Path(cfg.run_dir)
        self.round = 0
        self.round_steps = 0  # inner steps already taken in the current round (resumable mid-round)
        self.round_tokens = 0
        self.last_result: RoundResult | None = None
        self.last_eval: dict[str, float] = {}
        self.tokens_per_s = 0.0
        self.bytes_sent = self.bytes_received = 0
        self.started_at = time.time()
        # Joiners read the shared state from hivemind's thread while the loop may be mid outer step.
        self.state_lock = threading.Lock()

    # ---- state -------------------------------------------------------------------------------------------
    def _setup_training(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        data_dir = resolve_data_dir(cfg, self.run_dir, self.progress)
        # Peers draw different windows: the data seed is mixed with this silo's name.
        self.trainer: LocalTrainer = build_trainer(cfg, str(data_dir), peer=cfg.name)
        self.params = [p for p in self.trainer.model.parameters()]
        self.global_params = [p.detach().clone() for p in self.params]
        f = cfg.federation
        self.outer = OuterOptimizer(self.global_params, f.outer_optimizer, f.outer_lr, f.outer_momentum)
        self.residual = [torch.zeros_like(p) for p in self.global_params] if f.error_feedback else None
        self.metrics = MetricsLogger(self.run_dir)
        self.resumed = False
        if checkpoint_path(self.run_dir).exists():
            self._restore(load_checkpoint(self.run_dir))
            self.resumed = True

    def _restore(self, state: dict[str, Any]) -> None:
        restore_trainer(self.trainer, state)
        fed = state.get("federation", {})
        if "global_model" in state:
            named = dict(self.trainer.model.named_parameters())
            for name, g in zip(named, self.global_params):
                g.copy_(state["global_model"][name])
        if "outer" in fed:
            self.outer.load_state_dict(fed["outer"])
        if self.residual is not None and fed.get("residual") is not None:
            for r, saved in zip(self.residual, fed["residual"]):
                r.copy_(saved)
        self.round = int(fed.get("round", 0))
        self.round_steps = int(fed.get("round_steps", 0))
        self.round_tokens = int(fed.get("round_tokens", 0))

    def _checkpoint(self) -> None:
        names = [n for n, _ in self.trainer.model.named_parameters()]
        global_model = dict(self.trainer.model.state_dict())
        global_model.update({n: g for n, g in zip(names, self.global_params)})
        fed = {"round": self.round, "round_steps": self.round_steps, "round_tokens": self.round_tokens,
               "outer": self.outer.state_dict(), "residual": self.residual}
        save_checkpoint(self.run_dir, trainer_checkpoint(self.trainer, self.cfg, global_model=global_model,
                                                         federation=fed))

    def shared_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads: the global model and outer optimizer state at a round boundary."""
        with self.state_lock:
            return self._shared_state_locked()

    def _shared_state_locked(self) -> tuple[dict, list[torch.Tensor]]:
        outer = self.outer.state_tensors()
        meta = {"round": self.round, "run_id": self.cfg.federation.run_id, "n_params": len(self.global_params),
                # the schedule position at the round boundary, where the shared global weights belong
                "inner_step": self.trainer.step - self.round_steps, "version": __version__}
        return meta, [g.detach().clone() for g in self.global_params] + outer

    def _adopt_state(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        n = len(self.global_params)
        if int(meta.get("n_params", -1)) != n or len(tensors) < n:
            raise FederationError("the swarm's model does not match this peer's config (different model shape)")
        with torch.no_grad():
            for g, p, t in zip(self.global_params, self.params, tensors[:n]):
                if g.shape != t.shape:
                    raise FederationError(f"the swarm's model has a tensor of shape {tuple(t.shape)} where this "
                                          f"config has {tuple(g.shape)}")
                g.copy_(t)
                p.copy_(t)
        self.outer.load_state_tensors(tensors[n:])
        self.round = int(meta["round"])
        self.round_steps = self.round_tokens = 0
        # The schedule follows the swarm: a joiner does not re-run warmup at the peak learning rate.
        self.trainer.step = max(self.trainer.step, int(meta.get("inner_step", 0)))

    def global_checksum(self) -> float:
        """A cheap fingerprint of the global weights, so logs show which peers hold the same model."""
        return float(sum(g.double().sum() for g in self.global_params))

    # ---- the loop ----------------------------------------------------------------------------------------
    def heartbeat(self) -> dict[str, Any]:
        res = self.last_result
        return {
            "round": self.round, "local_step": self.trainer.step, "tokens": self.trainer.tokens,
            "loss": _finite(self.trainer.last_loss), "val_ppl": _finite(self.last_eval.get("val_ppl", math.nan)),
            "tokens_per_s": float(self.tokens_per_s), "compression": self.cfg.federation.compression,
            "group_size": res.group_size if res else 0, "averaging_s": float(res.seconds) if res else 0.0,
            "bytes_sent": int(self.bytes_sent), "bytes_received": int(self.bytes_received),
            "client_mode": bool(self.cfg.network.client_mode), "version": __version__,
            "started_at": float(self.started_at), "maddrs": self.maddrs,
        }

    def _local_phase(self, rate: Throughput) -> None:
        f, t = self.cfg.federation, self.cfg.train
        t0 = time.monotonic()
        while self.round_steps < f.local_steps and not self.stop.is_set():
            if f.round_token_budget and self.round_tokens >= f.round_token_budget:
                break
            if f.round_time_budget and time.monotonic() - t0 >= f.round_time_budget:
                break  # a slow silo averages what it has instead of stalling the group
            loss = self.trainer.train_step()
            self.round_steps += 1
            self.round_tokens += self.trainer.tokens_per_step
            if self.trainer.step % t.log_every == 0:
                self.tokens_per_s = rate.update(self.trainer.tokens)
                self.metrics.log("step", round=self.round, step=self.trainer.step, tokens=self.trainer.tokens,
                                 loss=loss, lr=self.trainer.optimizer.param_groups[0]["lr"],
                                 tokens_per_s=self.tokens_per_s)

    def _average_and_step(self) -> RoundResult:
        f = self.cfg.federation
        with torch.no_grad():
            deltas = [g - p.detach() for g, p in zip(self.global_params, self.params)]
            if self.residual is not None:
                # Error feedback: what compression dropped last round is sent again this round.
                for d, r in zip(deltas, self.residual):
                    d.add_(r)
                for d, r in zip(deltas, self.residual):
                    r.copy_(d - roundtrip(f.compression, d))
        result = self.averager.average(deltas, self.round, weight=float(max(1, self.round_tokens)),
                                       stop=self.stop)
        with torch.no_grad(), self.state_lock:
            self.outer.step(deltas)  # solo rounds: deltas is still this peer's own Δ
            for p, g in zip(self.params, self.global_params):
                p.copy_(g)
            self.round += 1
        if f.inner_state == "reset":
            self.trainer.reset_optimizer_state()
        return result

    def _maybe_catch_up(self) -> None:
        """A peer that fell behind the swarm (slow, or rounds went solo) re-syncs instead of averaging stale Δ."""
        newest = self.publisher.newest_round() if self.publisher else None
        # After a solo round r this peer is at r+1; a peer at r+1 or beyond has averaged round r without us,
        # so its global state is the swarm's: adopt it (skip a round) rather than drift on alone.
        if newest is not None and newest >= self.round:
            self._sync_from_swarm(reason=f"swarm is at round {newest}, this peer at {self.round}")

    def _sync_from_swarm(self, reason: str) -> bool:
        timeout = self.cfg.federation.state_sync_timeout
        print(f"photon-peer: downloading the swarm's state ({reason}), up to {timeout:.0f}s", flush=True)
        got = self.averager.load_state(timeout=timeout, progress=self.progress)
        if got is None:
            return False
        meta, tensors = got
        if int(meta.get("round", -1)) < self.round:
            return False  # never go back to an older state than our own
        self._adopt_state(meta, tensors)
        self.metrics.log("sync", round=self.round, reason=reason, global_checksum=self.global_checksum())
        print(f"photon-peer: synced with the swarm at round {self.round}", flush=True)
        return True

    def _join(self) -> None:
        net, f = self.cfg.network, self.cfg.federation
        if not net.initial_peers:
            return
        runs = read_run_ids(self.dht, timeout=net.request_timeout)
        if runs and f.run_id not in runs:
            raise FederationError(f"no peer in this swarm trains run id '{f.run_id}' (runs seen: "
                                  f"{', '.join(repr(r) for r in runs)}); check --run-id")
        if self._sync_from_swarm("joining"):
            return
        if self.resumed:
            print("photon-peer: no peer served state in time; resuming from the local checkpoint", flush=True)
        elif not f.allow_solo_start:
            raise FederationError(f"could not download the swarm's state within {f.state_sync_timeout:.0f}s "
                                  "and federation.allow_solo_start is false")
        else:
            print("photon-peer: no peer served state in time; starting from scratch", flush=True)

    def run(self) -> dict[str, Any]:
        cfg, f, net = self.cfg, self.cfg.federation, self.cfg.network
        initial = parse_multiaddrs(net.initial_peers, "--initial-peers")
        parse_multiaddrs(net.host_maddrs, "--host-maddrs")
        parse_multiaddrs(net.announce_maddrs, "--announce-maddrs")
        self._setup_training()
        self.dht = start_dht(net, initial_peers=initial)
        self.publisher = None
        self.averager = None
        try:
            self.maddrs = visible_maddrs(self.dht)
            self._banner()
            # Scripts (peers/local_swarm.py, tests) read the join address from here instead of scraping stdout.
            (self.run_dir / "peer.json").write_text(json.dumps(
                {"peer_id": str(self.dht.peer_id), "maddrs": self.maddrs, "pid": os.getpid(),
                 "run_id": f.run_id}))
            install_validators(self.dht, f.run_id, net.identity_path or None)
            self.averager = PseudoGradientAverager(self.dht, self.global_params, f, net, self.shared_state)
            self._join()
            self.publisher = HeartbeatPublisher(self.dht, f.run_id, self.heartbeat, f.heartbeat_interval,
                                                f.record_ttl, request_timeout=net.request_timeout)
            self.publisher.start()
            return self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> dict[str, Any]:
        f, t = self.cfg.federation, self.cfg.train
        rate = Throughput()
        rate.tokens0 = self.trainer.tokens
        done = 0
        while not self.stop.is_set() and (f.rounds == 0 or done < f.rounds):
            self._local_phase(rate)
            if self.stop.is_set():
                break  # abort the round: the checkpoint keeps the local progress, resume continues it
            result = self._average_and_step()
            self.last_result = result
            self.bytes_sent += result.bytes_sent
            self.bytes_received += result.bytes_received
            self.round_steps = self.round_tokens = 0
            done += 1
            # Validation runs on the new global weights, every ~eval_every inner steps and after the last round.
            evaluated: dict[str, float] = {}
            eval_rounds = max(1, t.eval_every // f.local_steps) if t.eval_every else 0
            if (eval_rounds and self.round % eval_rounds == 0) or done == f.rounds:
                evaluated = self.last_eval = self.trainer.evaluate()
            self._log_round(result, evaluated)
            self._checkpoint()
            self.publisher.publish_now()
            if result.solo:
                self._maybe_catch_up()
        self._checkpoint()
        return {"round": self.round, "step": self.trainer.step, "tokens": self.trainer.tokens,
                "loss": self.trainer.last_loss, **self.last_eval}

    def _log_round(self, r: RoundResult, evaluated: dict[str, float]) -> None:
        fields = {"round": self.round, "step": self.trainer.step, "tokens": self.trainer.tokens,
                  "loss": self.trainer.last_loss, "solo": r.solo, "group_size": r.group_size, "peers": r.peers,
                  "averaging_s": r.seconds, "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
                  "reason": r.reason, "partial": r.partial, "phases": r.phases,
                  "global_checksum": self.global_checksum(), **evaluated}
        self.metrics.log("round", **fields)
        if evaluated:
            self.metrics.log("eval", step=self.trainer.step, tokens=self.trainer.tokens, round=self.round,
                             **evaluated)
        how = "solo (" + r.reason + ")" if r.solo else f"group of {r.group_size}"
        if r.reason and not r.solo:
            how += f" ({r.reason})"
        ppl = f", val ppl {evaluated['val_ppl']:.2f}" if evaluated else ""
        print(f"round {self.round}: {how}, loss {self.trainer.last_loss:.4f}{ppl}, averaging {r.seconds:.2f}s, "
              f"sent {r.bytes_sent / 1e6:.2f} MB, received {r.bytes_received / 1e6:.2f} MB", flush=True)

    def _banner(self) -> None:
        lines = ["=" * 78, f"photon-peer {__version__}  run '{self.cfg.federation.run_id}'  "
                 f"peer {self.dht.peer_id}", "To join this swarm from another silo, run:"]
        lines += [f"  photon-peer run --config CONFIG --initial-peers {m}" for m in self.maddrs[:3]]
        if self.cfg.network.client_mode:
            lines.append("(client mode: this peer cannot be used as a bootstrap address)")
        lines.append("=" * 78)
        print("\n".join(lines), flush=True)

    def _shutdown(self) -> None:
        # Leave the swarm: stop heartbeats, then the averager, then the DHT (which owns p2pd).
        for part in (self.publisher, self.averager):
            if part is not None:
                try:
                    part.shutdown() if hasattr(part, "shutdown") else part.stop()
                except Exception as e:  # shutting down must never mask the real exit reason
                    log.warning("error while shutting down %s: %s", type(part).__name__, e)
        try:
            self.dht.shutdown()
        except Exception as e:
            log.warning("error while shutting down the DHT: %s", e)


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else -1.0
