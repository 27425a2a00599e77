"""PeerDaemon: one silo's `photon-peer run`: the trainer and the round loop, over an injected ``Swarm``."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

import torch

from photon_p2p import __version__
from photon_p2p.checkpoint import CheckpointManager, Part
from photon_p2p.config import Config
from photon_p2p.federation import FederationError
from photon_p2p.federation.averaging import LEFT, RoundResult
from photon_p2p.federation.compression import roundtrip
from photon_p2p.federation.network import parse_multiaddrs
from photon_p2p.federation.protocol import one_model_group, outcome, run_over, wait_budget
from photon_p2p.federation.swarm import Swarm
from photon_p2p.global_state import GlobalState
from photon_p2p.ledger import InFlight, RoundLedger
from photon_p2p.metrics import MetricsLogger
from photon_p2p.observe import start_exporters
from photon_p2p.peer_report import banner, heartbeat_record, log_round
from photon_p2p.rejoin import Rejoin
from photon_p2p.train.solo import (resolve_data_dir, resumable_checkpoint, trainer_parts,
                                   write_run_config)
from photon_p2p.train.trainer import LocalTrainer, Throughput, build_trainer

log = logging.getLogger("photon_p2p.daemon")
MAX_ROUND_FACTOR = 4  # a round's local phase never exceeds this many times H inner steps
HELPER_POLL_S = 0.5  # how often an averaging helper reads the clock while the others train (one DHT read each)
SwarmFactory = Callable[[Config, list, Callable], Swarm]
TrainerFactory = Callable[[Config, Path, bool], LocalTrainer]


def hivemind_swarm(cfg: Config, weights: list[torch.Tensor], state: Callable) -> Swarm:
    """The real federation (imported lazily: fake-swarm tests never start hivemind)."""
    from photon_p2p.federation.swarm import HivemindSwarm

    return HivemindSwarm(cfg, weights, state)


def local_trainer(cfg: Config, run_dir: Path, progress: bool) -> LocalTrainer:
    """The real trainer on this silo's data (prepared into the run dir if the config names none)."""
    data_dir = resolve_data_dir(cfg, run_dir, progress)
    # Peers draw different windows: the data seed is mixed with this silo's name.
    return build_trainer(cfg, str(data_dir), peer=cfg.name)


class PeerDaemon(Rejoin):
    """Trains a round of local steps, averages Δ = θ_global − θ_local with its group, applies the outer step.

    ``make_swarm`` builds the federation once the model exists (it needs the global weights and a state callback):
    the real hivemind swarm by default, an in-process fake in tests. ``make_trainer`` builds the trainer: the
    real one by default, a simulated one (train/simulated.py) for many peers on few cores.
    """

    def __init__(self, cfg: Config, stop: threading.Event | None = None, progress: bool = True,
                 make_swarm: SwarmFactory = hivemind_swarm, make_trainer: TrainerFactory = local_trainer) -> None:
        self.cfg, self.progress, self.make_swarm, self.make_trainer = cfg, progress, make_swarm, make_trainer
        self.stop = stop or threading.Event()
        self.run_dir = Path(cfg.run_dir)
        self.ledger = RoundLedger()  # the round in progress and the run so far (ledger.py)
        self.inflight: InFlight | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="photon-average")

    # ---- state -------------------------------------------------------------------------------------------
    def _setup_training(self) -> None:
        cfg = self.cfg
        saved = resumable_checkpoint(cfg, self.run_dir)
        self.trainer: LocalTrainer = self.make_trainer(cfg, self.run_dir, self.progress)
        # torchrun silo: θ_local is synced with the other ranks (train/parallel.py); this process is rank 0
        self.state = GlobalState(self.trainer.local_params(), cfg.federation)
        self.checkpoint = CheckpointManager(self.run_dir, {
            **trainer_parts(self.trainer, cfg),  # config, θ_local, inner optimizer and data cursor
            "global_model": Part(self._global_model, self._load_global_model),  # what the swarm shares
            "federation": self})  # round, outer optimizer, residual, and the round in progress
        self.resumed = saved is not None
        if saved is not None:
            self.checkpoint.restore(saved)
        write_run_config(cfg, self.run_dir)
        self.metrics = MetricsLogger(self.run_dir)
        self.ledger.eval_mark = self.trainer.step

    def _global_model(self) -> dict[str, torch.Tensor]:
        """The model's full state (buffers too) with the global weights in place of θ_local."""
        names = [n for n, _ in self.trainer.model.named_parameters()]
        global_model = dict(self.trainer.model_state_dict())  # gathered from every rank's shard (torchrun)
        global_model.update(dict(zip(names, self.state.weights)))
        return global_model

    def _load_global_model(self, saved: dict[str, torch.Tensor]) -> None:
        self.state.load_weights([saved[n] for n, _ in self.trainer.model.named_parameters()])

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's "federation" part: the global state's own, and the round in progress."""
        return {**self.state.state_dict(), **self.ledger.state_dict()}

    def load_state_dict(self, fed: dict[str, Any]) -> None:
        self.state.load_state_dict(fed)
        self.ledger.load_state_dict(fed)

    def _checkpoint(self) -> None:
        self.checkpoint.save()

    def shared_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining peer downloads: the global model and outer optimizer state at a round boundary."""
        # the schedule position at the round boundary, where the shared global weights belong (an average in
        # flight has not moved them yet: its round's steps count as un-averaged too)
        job = self.inflight
        pending = job.steps if job is not None else 0
        return self.state.serve(run_id=self.cfg.federation.run_id, version=__version__,
                                inner_step=self.trainer.step - self.ledger.round_steps - pending)

    def heartbeat(self) -> dict[str, Any]:
        return heartbeat_record(self)

    # ---- the loop ----------------------------------------------------------------------------------------
    def _local_phase(self, rate: Throughput) -> None:
        """Inner steps until the round ends: H steps (round_clock: steps), or this silo's quota of the round
        (round_clock: swarm, H scaled by its speed), or a token/time budget, or 4·H steps at most. With an average in flight
        (federation.overlap) the round cannot end before it lands; it is applied between two steps."""
        f, t = self.cfg.federation, self.cfg.train
        t0, paused0, stalled0 = time.monotonic(), self.ledger.paused_s, self.ledger.stalled_s
        steps = 0
        if f.helper:
            self._helper_phase()
        while not self.stop.is_set() and not f.helper:
            if self.inflight is not None and self.inflight.future.done():
                self._land()  # the previous round's average: outer step, local progress carried over
            if self.inflight is not None:
                if steps >= MAX_ROUND_FACTOR * f.local_steps:
                    self._land()  # never run more than one round ahead of the swarm
                    continue
            elif self._round_over(steps, t0):
                break
            t_step = time.monotonic()
            loss = self.trainer.train_step()
            took = time.monotonic() - t_step
            if not self._healthy(loss):
                self._land()  # a rollback restarts from the newest global weights
                self._roll_back(f"local loss is {loss:.4g}")
                continue
            steps += 1
            self.ledger.took_step(self.trainer.tokens_per_step, took)
            if self.inflight is None:  # the clock moves to the next round only once this peer has left the last
                self.swarm.report_progress(self.round, self.ledger.clock_steps, self.ledger.clock_busy_s)
            if self.trainer.step % t.log_every == 0:
                self.ledger.tokens_per_s = rate.update(self.trainer.tokens)
                self.metrics.log("step", round=self.round, step=self.trainer.step, tokens=self.trainer.tokens,
                                 loss=loss, lr=self.trainer.optimizer.param_groups[0]["lr"],
                                 tokens_per_s=self.ledger.tokens_per_s)
        books = self.ledger
        log.info("round %d: local phase over after %d steps (%d this round)", self.round, steps, books.clock_steps)
        # not landing, evaluating, saving, nor suspended
        books.compute_s = time.monotonic() - t0 - (books.paused_s - paused0) - (books.stalled_s - stalled0)
        if not self.ledger.late_round:  # a whole round's local phase (a joiner's first one is only the rest of a round)
            self.ledger.round_s = self.ledger.compute_s
        self.ledger.compute_total += self.ledger.compute_s
        # utilization as of the end of a local phase (a round record lands mid-phase with overlap)
        self.metrics.log("phase", round=self.round, steps=steps, compute_s=self.ledger.compute_s,
                         compute_total=self.ledger.compute_total, wall_s=time.monotonic() - self.ledger.loop_started)

    def _helper_phase(self) -> None:
        """An averaging helper's local phase: no steps, it lasts until the round's other peers are projected to have
        ended theirs (Swarm.others_done), at most round_deadline; its Δ is then 0 with weight 0."""
        deadline = time.monotonic() + self.cfg.federation.round_deadline
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.inflight is not None:
                self._land()  # (overlap) the previous round's average first: a helper has nothing to train meanwhile
            elif self.swarm.others_done(self.round):
                return
            self.stop.wait(HELPER_POLL_S)

    def _round_over(self, steps: int, t0: float) -> bool:
        f = self.cfg.federation
        if f.round_clock == "steps" and self.ledger.round_steps >= f.local_steps:
            return True
        if f.round_clock == "swarm" and self.ledger.round_steps >= self._quota():
            return True
        if steps >= MAX_ROUND_FACTOR * f.local_steps:
            return True  # the swarm's clock stalled (e.g. its records stopped): never train forever unaveraged
        if f.round_token_budget and self.ledger.clock_tokens >= f.round_token_budget:
            return True
        # a slow silo averages what it has instead of stalling the group
        return bool(f.round_time_budget and time.monotonic() - t0 >= f.round_time_budget)

    def _quota(self) -> int:
        """This round's inner steps under the swarm clock (H, scaled by this silo's speed against the swarm's),
        fixed when the round's first step is asked for and logged."""
        if self.ledger.quota[0] != self.round:
            late, self.ledger.synced_mid_round = self.ledger.synced_mid_round, False
            self.ledger.late_round = late
            self.ledger.quota = (self.round, self.swarm.round_quota(self.round, self.cfg.federation.local_steps, late))
            log.info("round %d: %d inner steps for this silo", self.round, self.ledger.quota[1])
        return self.ledger.quota[1]

    def _healthy(self, loss: float) -> bool:
        """A finite loss no worse than twice a uniform guess (ln V): anything else has diverged."""
        limit = self.cfg.federation.divergence_loss or 2 * math.log(self.cfg.model.vocab_size)
        return math.isfinite(loss) and loss <= limit

    def _roll_back(self, why: str) -> None:
        """Non-finite guard: drop this round's local work (the bad batch is skipped: the cursor moved on), restart
        from the last good global weights with fresh AdamW state; stop if it keeps happening."""
        self.ledger.rollbacks += 1
        limit = self.cfg.federation.max_rollbacks
        self.metrics.log("rollback", round=self.round, step=self.trainer.step, reason=why, count=self.ledger.rollbacks)
        print(f"photon-peer: {why}: rolled back to the round {self.round} global weights "
              f"({self.ledger.rollbacks}/{limit})", flush=True)
        if self.ledger.rollbacks >= limit:
            raise FederationError(f"local training diverged {self.ledger.rollbacks} times in a row ({why}); this peer "
                                  "sent nothing bad to the swarm. Check train.lr and train.grad_clip")
        self.state.reset_local()
        self.trainer.reset_optimizer_state()
        self.ledger.next_round()

    def _start_average(self) -> bool:
        """Hand this round's Δ to the averager (a background thread) and start the next round's counters.
        False if Δ is not finite: rolled back instead, nothing is sent."""
        f = self.cfg.federation
        if self.swarm.strangers(self.ledger.one_model_group):  # only a peer outside our last one-model group can
            self._adopt_majority(self.swarm.peers())  # hold another: the minority adopts the majority's model
        deltas = self.state.pseudo_gradient()
        if not all(bool(torch.isfinite(d).all()) for d in deltas):
            self._roll_back("the pseudo-gradient is not finite")  # never sent
            return False
        base = [p.detach().clone() for p in self.state.params] if f.overlap else None
        sent = [d.clone() for d in deltas] if self.state.residual is not None else None
        books = self.ledger
        budget = wait_budget(max(books.compute_s, books.round_s), f.matchmaking_time, f.straggler_wait,
                             f.wait_fraction, limit=f.round_deadline / 2)
        # joined: this round began with a download (a joiner, or a catch-up); its roster is a first read of records.
        # The server's id: a joiner gives the round up once its server has moved past it (protocol.server_moved).
        joined = (books.synced_from or "?") if books.late_round or books.synced_mid_round else ""
        if f.round_clock != "swarm":
            books.synced_mid_round = False  # (the swarm clock's quota consumes it when the round begins)
        weight = 0.0 if f.helper else float(max(1, books.round_tokens))  # a helper's Δ is 0 and counts for nothing
        future = self.executor.submit(self.swarm.average, deltas, self.round, weight=weight,
                                      stop=self.stop, fingerprint=self.fingerprint(), budget=budget, joined=joined)
        self.inflight = InFlight(future, self.round, deltas, books.round_tokens, books.round_steps, books.compute_s,
                                 base, sent)
        self.metrics.log("averaging", round=self.round, step=self.trainer.step, tokens=self.ledger.round_tokens,
                         background=f.overlap)
        self.ledger.next_round()
        return True

    def _land(self) -> bool:
        """Wait for the in-flight average (the trainer idles: counted as wait) and finish its round.
        False if there was none or it ended because the peer is stopping."""
        job = self.inflight
        if job is None:
            return False
        f = self.cfg.federation
        t0 = time.monotonic()
        try:  # average() keeps its own deadlines; this bound only guards against a wedged averager thread
            result = job.future.result(timeout=f.round_deadline + f.allreduce_timeout + 30)
        except FutureTimeout:
            result = RoundResult(job.round, True, 1, [], job.weight, 0.0, 0, 0, "averager thread did not return")
        job.wait_s = time.monotonic() - t0
        self.ledger.wait_total += job.wait_s
        self.inflight = None
        finished = self._finish(job, result)
        self.ledger.paused_s += time.monotonic() - t0
        return finished

    def _finish(self, job: InFlight, result: RoundResult) -> bool:
        f, t = self.cfg.federation, self.cfg.train
        marks = [("start", time.monotonic())]  # where the trainer's pause after an average goes (a "pause" record)
        if result.solo and result.reason == "stopped":
            self.ledger.fold(job)  # un-averaged: the checkpoint keeps it for the resumed round
            return False
        self.ledger.one_model_group = frozenset()
        if result.solo:
            alone = self._missed_round(result, job)
        else:
            alone = False
            if job.sent is not None:  # error feedback: what compression dropped of our Δ is sent again next round
                for r, d in zip(self.state.residual, job.sent):
                    r.copy_(d - roundtrip(f.compression, d))
            # healed: the group held different models and averaged local weights; one model again, fresh momentum
            self.state.apply(job.deltas, healed=result.healed, carry_from=job.base)
            if f.inner_state == "reset":
                self.trainer.reset_optimizer_state()
            marks.append(("apply", time.monotonic()))
            if result.partial > 0:
                self._mend_partial(result)  # G1: a member alone on other bytes takes its group's model now
            self.ledger.one_model_group = one_model_group(result)
            if self.swarm.seen_ahead(self.round):  # a pocket that fell behind together (only then read heartbeats)
                self._catch_up(self.swarm.peers(), who="this peer's group")
        marks.append(("catch_up", time.monotonic()))
        late_join = result.solo and result.reason == LEFT and self.ledger.joining and not alone
        self.ledger.landed(result, grouped=not result.solo, late_join=late_join)
        # Validation runs on the new global weights at the first round end past each multiple of eval_every inner
        # steps (with H < eval_every, not every round: an evaluation costs the trainer the same as a few steps),
        # and after the last round.
        evaluated: dict[str, float] = {}
        due = t.eval_every and self.trainer.step // t.eval_every > self.ledger.eval_mark // t.eval_every
        if ((due and self.round != job.round) or run_over(self.round, f.rounds)) and not f.helper:
            evaluated = self.ledger.last_eval = self._evaluate_global()
            self.ledger.eval_mark = self.trainer.step
        marks.append(("eval", time.monotonic()))
        log_round(self, result, job, evaluated,
                  outcome(result.solo, result.reason, result.healed, result.partial, alone, late_join))
        self._checkpoint()
        marks.append(("checkpoint", time.monotonic()))
        if not self.stop.is_set():  # leaving: the final heartbeat says so; no round to begin (the DHT may be gone)
            self.swarm.publish_now()
            self.swarm.begin_round(self.round)  # the clock follows: steps trained meanwhile count for the new round
            if self.ledger.clock_steps:
                self.swarm.report_progress(self.round, self.ledger.clock_steps, self.ledger.clock_busy_s)
            marks.append(("swarm", time.monotonic()))
        parts = dict.fromkeys(("apply", "catch_up", "eval", "checkpoint", "swarm"), 0.0)  # a solo round: no apply
        parts.update({name: t1 - t0 for (_, t0), (name, t1) in zip(marks, marks[1:])})
        self.metrics.log("pause", round=self.round, wait_s=job.wait_s, **{f"{name}_s": v for name, v in parts.items()},
                         total_s=marks[-1][1] - marks[0][1])
        return True

    def run(self) -> dict[str, Any]:
        net = self.cfg.network
        parse_multiaddrs(net.initial_peers, "--initial-peers")  # bad addresses fail before any work starts
        parse_multiaddrs(net.host_maddrs, "--host-maddrs")
        parse_multiaddrs(net.announce_maddrs, "--announce-maddrs")
        self._setup_training()
        self.swarm = self.make_swarm(self.cfg, self.state.weights, self.shared_state)
        exporters = start_exporters(self.cfg, self.heartbeat, self.run_dir)  # optional Prometheus / TensorBoard
        try:
            print(banner(self.cfg, self.swarm, self.trainer), flush=True)
            # Scripts (peers/local_swarm.py, tests) read the join address from here instead of scraping stdout.
            (self.run_dir / "peer.json").write_text(json.dumps(
                {"peer_id": self.swarm.peer_id, "maddrs": self.swarm.maddrs, "pid": os.getpid(),
                 "run_id": self.cfg.federation.run_id}))
            self._join()
            self.swarm.start(self.heartbeat)
            return self._loop()
        finally:
            exporters.close()
            self._log_hot_keys()
            self.swarm.shutdown()

    def _log_hot_keys(self) -> None:
        """Which DHT keys this peer's node served the most of over the run (the DHT's hot spots as N grows)."""
        hot = getattr(self.swarm, "dht_hot_keys", None)
        keys = hot(self.round) if hot is not None and getattr(self.swarm, "dht", None) is not None else {}
        if keys:
            self.metrics.log("dht_keys", round=self.round, served=keys)  # {key: [requests, bytes]}
            log.info("DHT keys this node served most (requests, kB): %s",
                     ", ".join(f"{k} {r} {b / 1e3:.0f}" for k, (r, b) in keys.items()))

    def _loop(self) -> dict[str, Any]:
        f = self.cfg.federation
        rate = Throughput()
        rate.tokens0 = self.trainer.tokens
        self.ledger.loop_started = time.monotonic()
        try:
            while not self.stop.is_set() and not run_over(self.round, f.rounds):
                if self.inflight is None:
                    self.swarm.begin_round(self.round)
                self._local_phase(rate)
                if self.stop.is_set():
                    break  # abort the round: the checkpoint keeps the local progress, resume continues it
                self._land()  # overlap: only if the local phase had to stop before the last average landed
                if not self._start_average():
                    continue  # rolled back: the round goes on from the global weights
                if not f.overlap or run_over(self.inflight.round + 1, f.rounds):
                    self._land()  # no overlap, or nothing left to train: wait for the average now
        finally:
            # Stopping (SIGINT) mid-average: averaging notices the stop event within a fraction of a second; an
            # average that still lands is applied, otherwise the un-averaged work stays in the checkpoint.
            self._land()
            self.executor.shutdown(wait=False, cancel_futures=True)
        if run_over(self.round, f.rounds) and not self.stop.is_set():
            self._settle()
        self._checkpoint()
        return {"round": self.round, "step": self.trainer.step, "tokens": self.trainer.tokens,
                "loss": self.trainer.last_loss, "fingerprint": self.fingerprint(),
                "participation": self.ledger.participation, **self.ledger.last_eval}

    def utilization(self) -> float:
        return self.ledger.utilization()

    def _evaluate_global(self) -> dict[str, float]:
        """Validation of the global weights (what the swarm shares), even while local work is carried over."""
        with torch.no_grad():
            if self.state.local is not None:
                self.state.local.pull()  # torchrun: θ_local as the ranks hold it now (overlap trains on meanwhile)
            local = [p.detach().clone() for p in self.state.params]
            self.state.reset_local()
            try:
                return self.trainer.evaluate()
            finally:
                self.state.restore_local(local)  # and on every rank of a torchrun silo
