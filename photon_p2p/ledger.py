"""RoundLedger: one silo's books, the round in progress and the run so far, kept in one place by the round loop."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from photon_p2p.federation.records import CLIP_WINDOW

STALL_FACTOR = 10.0  # an inner step this many times slower than usual was a suspension, not compute


@dataclass
class InFlight:
    """One round's average, running in a background thread (in the foreground too: then it is waited for at once)."""

    future: Future
    round: int  # the round being averaged
    deltas: list[torch.Tensor]  # Δ as handed to the averager; the mean is written into it
    weight: int  # tokens behind Δ (folded back into the next round if no group averages it)
    steps: int  # inner steps behind Δ
    compute_s: float  # the round's local phase
    base: list[torch.Tensor] | None  # θ_local when Δ was taken (overlap: progress since then is carried over)
    sent: list[torch.Tensor] | None  # a copy of Δ for error feedback
    wait_s: float = 0.0  # the trainer idle on this average


@dataclass
class RoundLedger:
    """The round loop's counters. ``round_steps``/``round_tokens`` are what the checkpoint keeps (a resumed peer
    continues its round); everything else is this process's own and starts from zero."""

    # the round in progress
    round_steps: int = 0  # inner steps taken in the current round (resumable mid-round)
    round_tokens: int = 0  # this silo's weight: tokens since its last averaged round (missed rounds fold in)
    clock_steps: int = 0  # inner steps this round as the swarm clock counts them (not reset by a rollback's fold)
    clock_tokens: int = 0
    clock_busy_s: float = 0.0  # seconds those steps took to compute (the silo's speed, for the swarm clock)
    quota: tuple[int, int] = (-1, 0)  # (round, its inner steps for this silo) under the swarm clock
    synced_mid_round: bool = False  # downloaded the swarm's state: this round's quota is only what is left
    late_round: bool = False  # this round began with a download mid-round: its quota is only what was left
    synced_from: str = ""  # the peer whose state the last download adopted
    joined_from: str = ""  # the peer whose state the join adopted: trusted on first use (protocol.state_verdict)
    joining: bool = False  # joined with a download and has not yet taken part in a round
    # speeds
    step_s: float = 0.0  # the usual inner step's compute time (a moving average; suspensions excluded)
    stalled_s: float = 0.0  # time spent suspended inside inner steps (not compute: kept out of compute_s)
    compute_s: float = 0.0  # the last local phase
    round_s: float = 0.0  # the last whole round's local phase (what the wait budget scales with)
    tokens_per_s: float = 0.0
    # the run so far (this process)
    finished: int = 0  # rounds finished
    grouped: int = 0  # of those, rounds spent in a group
    rollbacks: int = 0  # consecutive rollbacks (the non-finite guard stops at max_rollbacks)
    bytes_sent: int = 0
    bytes_received: int = 0
    compute_total: float = 0.0  # utilization = compute_total / wall time of the loop
    wait_total: float = 0.0
    paused_s: float = 0.0  # time spent landing averages (waiting, evaluating, checkpointing)
    eval_mark: int = 0  # the inner step of the last validation
    reads_mark: int = 0  # the swarm's DHT read count at the last round record
    served_mark: dict = field(default_factory=dict)  # what the DHT node had served at the last record of it, by kind
    started_at: float = field(default_factory=time.time)
    loop_started: float = 0.0
    last_result: Any = None  # the last finished round's RoundResult
    # the last round's group, if it left every member on one model and nothing was downloaded since (the split
    # rule then has nobody to look for unless a peer outside it is live: Swarm.strangers)
    one_model_group: frozenset = frozenset()
    last_eval: dict[str, float] = field(default_factory=dict)
    clip_history: deque = field(default_factory=lambda: deque(maxlen=CLIP_WINDOW))  # robust aggregation

    def step_seconds(self, took: float) -> float:
        """The compute time of one inner step, for the silo's speed on the swarm clock. A step that took more than
        STALL_FACTOR times the usual one spanned a suspension (SIGSTOP, a sleeping laptop), not work: it counts as a
        usual step. Counted whole, one 30 s stop made the resumed silo look 100× slower; the others' rosters then
        projected it late and did not wait for it for the next 2-3 rounds."""
        if self.step_s and took > STALL_FACTOR * self.step_s:
            self.stalled_s += took - self.step_s
            return self.step_s
        self.step_s = took if not self.step_s else 0.9 * self.step_s + 0.1 * took
        return took

    def took_step(self, tokens: int, took: float) -> None:
        """One inner step of ``tokens`` tokens that took ``took`` seconds of wall time."""
        self.clock_busy_s += self.step_seconds(took)
        self.round_steps += 1
        self.round_tokens += tokens
        self.clock_tokens += tokens
        self.clock_steps += 1

    def next_round(self) -> None:
        """The round's work was handed to the averager (or dropped by a rollback): count the next one from zero."""
        self.round_steps = self.round_tokens = self.clock_steps = self.clock_tokens = 0
        self.clock_busy_s = 0.0

    def fold(self, job: InFlight) -> None:
        """A round that did not average: its work counts towards the next round's weight."""
        self.round_tokens += job.weight
        self.round_steps += job.steps

    def landed(self, result: Any, grouped: bool, late_join: bool = False) -> None:
        """A round finished (grouped or not): the run's totals. ``late_join``: a joiner's first round, closed
        before it came; part of joining, not a round it missed."""
        self.rollbacks = 0
        self.last_result = result
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        if late_join:
            return
        self.joining = False
        self.finished += 1
        self.grouped += int(grouped)

    @property
    def participation(self) -> float:
        return self.grouped / max(1, self.finished)

    def utilization(self, now: float | None = None) -> float:
        """Share of this peer's wall-clock time (since its round loop began) spent in inner steps."""
        now = time.monotonic() if now is None else now
        wall = now - self.loop_started if self.loop_started else 0.0
        return min(1.0, self.compute_total / wall) if wall > 0 else 0.0

    def state_dict(self) -> dict[str, int]:
        """The part a checkpoint keeps (stored under "federation" beside the global state's own keys)."""
        return {"round_steps": self.round_steps, "round_tokens": self.round_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round_steps = int(state.get("round_steps", 0))
        self.round_tokens = int(state.get("round_tokens", 0))
