"""PseudoGradientAverager: one weighted, compressed all-reduce of Δ per round with a DHT-matched group of peers.

Rounds never mix: the round number is the matchmaking group key (hivemind only groups peers whose keys are equal),
and every member's gathered metadata is checked after the fact. A one-group round's members all ask the round's
designated leader first (protocol.round_leader), and declared deadlines are aligned to matchmaking_time slots so
that hivemind's own choice (the earliest deadline, then the lowest peer id) agrees with it. hivemind averages the
tensors it owns in its own process; we average a private copy and only write back on success, so a failed, late
or mismatched round leaves the caller's Δ untouched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import hivemind
import torch
from hivemind.compression import NoCompression
from hivemind.utils import get_dht_time

from photon_p2p.config import FederationConfig, NetworkConfig
from photon_p2p.federation import FederationError
from photon_p2p.federation.bulk import GATHER_KEY as BULK_KEY
from photon_p2p.federation.bulk import BulkBackoff, BulkEndpoint, direct_ip
from photon_p2p.federation.compression import ByteCounter, CountingCompression, make_compression
from photon_p2p.federation.groups import GroupPlan
from photon_p2p.federation.hivemind_ext.averager import (
    REPORT_KEY,
    TUNED,
    AveragerTuning,
    PhaseClock,
    ProcessAverager,
    StateProvider,
)
from photon_p2p.federation.hivemind_ext.progress_tracker import live_group_target
from photon_p2p.federation.network import lifeline, visible_maddrs
from photon_p2p.federation.robust import RobustSettings, merge_factors
from photon_p2p.federation.util import all_finite, bounded, describe

log = logging.getLogger("photon_p2p.federation")
# hivemind logs every failed matchmaking attempt as an ERROR; our retry loop reports outcomes itself.
logging.getLogger("hivemind.averaging.averager").setLevel(logging.CRITICAL)
ROUND_BITS = 32  # the round number, in binary, is the matchmaking group key (then stage, group and grid bits)


LEFT = "the swarm finished this round without this peer"
REGROUPED = "regrouped"  # internal: the first stage restarts under a fresh plan


def _back_to_back(templates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed buffers shaped like ``templates``, as views of one flat tensor when they share a dtype: the bulk
    path then all-reduces that flat tensor in place (bulk.flat_view) instead of copying in and out of one."""
    if not templates or len({t.dtype for t in templates}) != 1:
        return [torch.zeros(t.shape, dtype=t.dtype) for t in templates]
    flat = torch.zeros(sum(t.numel() for t in templates), dtype=templates[0].dtype)
    views, offset = [], 0
    for t in templates:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def _grid_key(plan: GroupPlan | None) -> tuple:
    """What a peer's groups depend on: nothing for one group of everyone (any subset that meets averages
    consistently); the whole member list for a grid, since its rows and columns are cut from it."""
    if plan is None or plan.stages == 1:
        return (1,)
    return (2, plan.members)


def _others(group: tuple[str, ...], me: str) -> tuple[str, ...]:
    return tuple(m for m in group if m != me)


def group_bits(round_no: int, stage: int = 0, index: int = 0, digest: int = 0) -> str:
    """The matchmaking key of a round's group: round, stage (0 one group, 1 rows, 2 columns), row/column, and
    for a grid the digest of its member list, so that only peers holding the same grid meet in its rows and
    columns (a peer with another view waits apart, and regroups once its view catches up)."""
    bits = format(round_no % 2**ROUND_BITS, f"0{ROUND_BITS}b")
    if stage == 0:
        return bits
    return bits + format(stage, "02b") + format(index % 2**16, "016b") + format(digest % 2**16, "016b")


@dataclass
class RoundResult:
    round: int
    solo: bool
    group_size: int
    peers: list[str]
    weight_total: float
    seconds: float
    bytes_sent: int
    bytes_received: int
    reason: str = ""
    partial: float = 0.0  # fraction of values a failed reducer left un-averaged (their Δ is zeroed: no update)
    failed_peers: list[str] = field(default_factory=list)
    # healed: the members' fingerprints differed, so this round averaged local *weights* (lossless): the
    # tensors hold mean θ_local, not mean Δ. fingerprints: each member's global-model fingerprint going in.
    healed: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)
    # seconds by phase: copy_in, matchmaking (incl. the live-peer lookup and failed attempts), allreduce, handoff
    # (result to this process), write_back (checks + copy out); codec: compress/extract time summed over the
    # averager's threads (it overlaps the all-reduce). Empty phases were not reached.
    phases: dict[str, float] = field(default_factory=dict)
    # clipped: {sender: smallest share of its contribution kept} for the senders that THIS peer, as a reducer of
    # its part(s), clipped (0 < f < 1) or dropped (0.0: non-finite, or past its declared norm); robust.py.
    clipped: dict[str, float] = field(default_factory=dict)
    # rejected: reducers whose returned averages were larger than the senders' declared norms allow (robust.py
    # ReducerCheck); their parts were zeroed (no update there) by every member alike.
    rejected: list[str] = field(default_factory=list)
    transport: str = ""  # what moved the bytes: "hivemind" (butterfly over libp2p) or "gloo" (federation/bulk.py)
    contributors: int = 1  # peers whose Δ is in the result (a two-stage round: the rows' head counts summed)
    members: int = 0  # the round's live peers as this peer read them (its grid's size; 0: no list, a live count)


class PseudoGradientAverager:
    """Averages pseudo-gradients with peers of the same run and round; serves and downloads the global state."""

    def __init__(self, dht: hivemind.DHT, templates: list[torch.Tensor], fed: FederationConfig,
                 net: NetworkConfig, state_provider: StateProvider, tuning: AveragerTuning = TUNED,
                 global_tensors: list[torch.Tensor] | None = None, owner_public: bytes | None = None) -> None:
        """``global_tensors``: the caller's global weights, moved to shared memory here so that a healing round
        (members with different fingerprints) can average weights; without them a split group cannot heal.
        ``owner_public``: a closed swarm's owner key (raw Ed25519 bytes): only admitted peers average, serve or
        get state (federation/admission.py); None is an open swarm."""
        if not fed.run_id or "." in fed.run_id:
            raise FederationError(f"federation.run_id must be non-empty and contain no '.', got '{fed.run_id}'")
        if fed.round_deadline <= fed.matchmaking_time * 1.25 + 0.5:
            raise FederationError(f"federation.round_deadline ({fed.round_deadline:g}s) must exceed "
                                  f"federation.matchmaking_time ({fed.matchmaking_time:g}s) by a margin")
        self.dht, self.fed, self.net, self.tuning = dht, fed, net, tuning
        self.counter, self.clock = ByteCounter(), PhaseClock()
        self.client_mode = bool(net.client_mode)
        self._buffers = _back_to_back(templates)
        self._codec = make_compression(fed.compression)
        # hivemind warns that request_timeout >= matchmaking time can deadlock matchmaking; keep it below.
        request_timeout = min(float(net.request_timeout), fed.matchmaking_time / 2)
        self.bulk = self._bulk_endpoint(dht, fed, net)
        self.bulk_backoff = BulkBackoff()  # off gloo for a while after a gloo round failed
        self._averager = ProcessAverager(
            self._buffers, dht, start=False, prefix=f"{fed.run_id}_pseudograd",
            target_group_size=fed.target_group_size, min_group_size=fed.min_group_size,
            initial_group_bits="0" * ROUND_BITS, min_matchmaking_time=fed.matchmaking_time,
            request_timeout=request_timeout, allreduce_timeout=fed.allreduce_timeout,
            next_chunk_timeout=float(net.request_timeout),  # a silent peer is dropped after this, not at the end
            compression=CountingCompression(self._codec, self.counter), state_compression=NoCompression(),
            client_mode=self.client_mode, declare_state_period=max(10.0, fed.record_ttl / 3),
            # A joiner serves state only once it has some (load_state or a round); the first peer at once.
            allow_state_sharing=not self.client_mode and not net.initial_peers,
            part_size_bytes=tuning.part_size_bytes, shutdown_timeout=3.0, state_provider=state_provider,
            counter=self.counter, clock=self.clock, threads=tuning.averager_threads,
            global_tensors=[g.share_memory_() for g in global_tensors] if global_tensors is not None else None,
            robust=RobustSettings(fed.robust_aggregation, fed.clip_multiplier, fed.clip_iterations),
            owner_public=owner_public, run_id=fed.run_id,
            bulk_timeout=fed.allreduce_timeout if self.bulk is not None else 0.0)
        self._start(float(net.bootstrap_timeout))
        self._closed = False

    @staticmethod
    def _bulk_endpoint(dht: hivemind.DHT, fed: FederationConfig, net: NetworkConfig) -> BulkEndpoint | None:
        """This peer's gloo rendezvous (federation.transport), or None: hivemind moves every byte."""
        if fed.transport == "hivemind" or fed.compression != "none" or net.client_mode:
            return None  # config validation rejects transport: gloo with a codec or in client mode
        if fed.transport == "auto" and fed.swarm_owner_key:
            return None  # a closed swarm: gloo's connections are not authenticated (transport: gloo to insist)
        ip = direct_ip(net.announce_maddrs) or direct_ip(visible_maddrs(dht))
        if ip is None:
            if fed.transport == "gloo":
                raise FederationError("federation.transport is gloo but this peer has no direct IP address "
                                      "(set --announce-maddrs, or use transport: auto)")
            return None
        return BulkEndpoint(ip, fed.allreduce_timeout)

    def _start(self, timeout: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise FederationError("create the PseudoGradientAverager from the main thread (hivemind needs signals)")
        previous = signal.getsignal(signal.SIGINT)
        try:
            # hivemind sets SIGINT to SIG_IGN in the *calling* process before forking (so the child ignores
            # Ctrl-C); we restore our handler afterwards so Ctrl-C still reaches the daemon.
            with lifeline():  # the averager process dies with ours
                self._averager.run_in_background(await_ready=True, timeout=timeout)
        except BaseException as e:
            self._kill()
            detail = "timed out" if isinstance(e, TimeoutError) else (str(e).strip().splitlines() or [""])[-1]
            raise FederationError(f"the averager did not start within {timeout:g}s ({detail})") from None
        finally:
            signal.signal(signal.SIGINT, previous)

    # ---- averaging ---------------------------------------------------------------------------------------
    def average(self, deltas: list[torch.Tensor], round_no: int, weight: float,
                stop: threading.Event | None = None, fingerprint: str = "",
                live_target: int | None = None, plan: GroupPlan | None = None,
                give_up: Callable[[tuple[str, ...]], bool] | None = None,
                replan: Callable[[], GroupPlan | None] | None = None, wait: float = 0.0,
                leader: str = "", follow: Callable[[], tuple[int, str]] | None = None) -> RoundResult:
        """All-reduce ``deltas`` (weighted by ``weight``, e.g. tokens) with peers at ``round_no``, within
        federation.round_deadline per stage. On success the swarm's weighted mean (the same bytes on every
        member) is written into ``deltas`` in place; if ``result.healed`` it is the mean of the members' local
        weights instead. Otherwise they are left untouched and the result is solo with a reason.
        ``plan``: the round's live peers (groups.py): one group of all of them, or rows then columns when
        they outnumber target_group_size. ``live_target``: the group size to start at (one group: at least the
        plan's size).
        ``give_up``: polled while waiting for a group with the peers this stage waits for (its other members; none
        without a plan); True (e.g. they have all moved past this round) ends the
        wait at once, so a late peer catches up instead of waiting out straggler_wait for nobody.
        ``replan``: the round's plan from a fresh read of its members, asked after each attempt that found no group
        while this peer has averaged nothing yet; when its grid differs, it regroups under the new plan.
        Peers that read the members a moment apart (one had not yet reported this round) would otherwise each
        wait, until the deadline, in a grid the others are not in.
        ``wait``: seconds a group waits for its members once the first has come (protocol.wait_budget; at least
        matchmaking_time). ``leader``: the peer every member of a one-group round asks first (protocol.round_leader).
        ``follow``: polled while a one-group round waits, the number of members it now waits for and its leader: a
        peer whose record appeared meanwhile (a joiner) is waited for instead of started without; one whose record
        went silent (a stopped or dead process) is not waited for any longer, and if it was the leader the
        members ask the next one."""
        give_up = give_up or (lambda _waiting: False)
        # 0: an averaging helper (federation.helper), which only reduces and receives (robust.reduce_part)
        weight = max(float(weight), 1e-6) if weight != 0 else 0.0
        deadline = time.monotonic() + self.fed.round_deadline  # the first stage's, across regroupings
        while True:
            regrouped: list[GroupPlan] = []

            def regroup(current: GroupPlan | None = plan) -> str:
                """REGROUPED if a fresh read of the members gives another grid (read between two attempts, never
                by cancelling one: a step cancelled as its group assembles leaves its partners averaging with us
                while we drop the result)."""
                fresh = replan() if replan is not None else None
                if fresh is not None and _grid_key(fresh) != _grid_key(current):
                    regrouped.append(fresh)
                    return REGROUPED
                return ""

            if plan is None or plan.stages == 1:
                others = _others(plan.members, plan.me) if plan is not None else ()
                size = max(plan.n, live_target or 0) if plan is not None else live_target
                result = self._average_stage(deltas, round_no, weight, stop, fingerprint, size, 0, 0,
                                             give_up=lambda: LEFT if give_up(others) else "", regroup=regroup,
                                             deadline=deadline, wait=wait, leader=leader, follow=follow)
            elif plan.row_size() == 1:
                # Alone in its row (3 peers in groups of 2: rows of 2 and 1): its row mean is its own Δ, and it
                # goes straight to its column (hivemind cannot form a group of one). Nothing is averaged yet, so
                # it can still regroup while the column forms.
                alone = RoundResult(round_no, False, 1, [plan.me], weight, 0.0, 0, 0,
                                    fingerprints={plan.me: fingerprint}, contributors=1)
                result = self._columns(deltas, round_no, stop, fingerprint, plan, alone, give_up, regroup, deadline,
                                       wait)
            else:
                row = self._average_stage(deltas, round_no, weight, stop, fingerprint, plan.row_size(), 1,
                                          plan.row, digest=plan.digest, rank=plan.row,
                                          give_up=lambda: LEFT if give_up(_others(plan.row_members(), plan.me))
                                          else "", regroup=regroup, deadline=deadline, wait=wait,
                                          leader=min(plan.row_members()))
                # Once the row has averaged, the grid is fixed: the column only gives up if its members leave.
                result = row if row.solo else self._columns(deltas, round_no, stop, fingerprint, plan, row,
                                                            give_up, wait=wait)
            if result.reason != REGROUPED:
                result.members = plan.n if plan is not None else 0
                return result
            log.info("round %d: the round's members changed (%d peers); regrouping", round_no, regrouped[0].n)
            plan = regrouped[0]

    def _columns(self, deltas: list[torch.Tensor], round_no: int, stop: threading.Event | None, fingerprint: str,
                 plan: GroupPlan, first: RoundResult, give_up: Callable[[tuple[str, ...]], bool],
                 regroup: Callable[[], str] = lambda: "", deadline: float | None = None,
                 wait: float = 0.0) -> RoundResult:
        """Stage 2: the column, given this peer's row result ``first``; the round's result from both stages.
        Each stage's group waits ``wait`` like a one-group round and is led by its lowest peer id."""
        # The first member of each row carries the row's weight (and its head count); any other only listens.
        # Only the column's own members leaving ends the wait: the rest of the swarm moving on to the next round
        # is expected while columns finish.
        second = self._average_stage(deltas, round_no, first.weight_total if plan.designated else 0.0, stop,
                                     fingerprint, plan.column_size(), 2, plan.column, digest=plan.digest,
                                     rank=plan.row if plan.designated else plan.rows + plan.row,
                                     weights=first.healed,
                                     extra={"row_size": first.contributors if plan.designated else 0},
                                     give_up=lambda: LEFT if give_up(_others(plan.column_members(), plan.me))
                                     else "", regroup=regroup, deadline=deadline, wait=wait,
                                     leader=min(plan.column_members()))
        if second.reason == REGROUPED:
            return second
        merged_phases = {f"rows_{k}": v for k, v in first.phases.items()}
        merged_phases.update({f"columns_{k}": v for k, v in second.phases.items()})
        merged_phases["matchmaking"] = first.phases.get("matchmaking", 0.0) + second.phases.get("matchmaking", 0.0)
        if second.solo:
            if first.peers == [plan.me]:
                second.phases = merged_phases
                return second  # alone in its row: nothing was averaged
            # The row's mean is in place (the same bytes across the row); rows now differ, and the next round's
            # groups see two fingerprints and heal. Better than throwing the row's averaging away.
            first.reason = f"second stage failed ({second.reason}): rows diverge until the next group heals"
            first.phases = merged_phases
            return first
        # group_size: the peers whose Δ is in the mean (the rows' head counts), not the plan's (a member may
        # have been missing); peers: the ones this peer exchanged bytes with.
        return RoundResult(round_no, False, second.contributors, sorted(set(first.peers) | set(second.peers)),
                           second.weight_total, first.seconds + second.seconds,
                           first.bytes_sent + second.bytes_sent, first.bytes_received + second.bytes_received,
                           "; ".join(r for r in (first.reason, second.reason) if r),
                           partial=max(first.partial, second.partial),
                           failed_peers=sorted(set(first.failed_peers) | set(second.failed_peers)),
                           healed=second.healed, fingerprints={**first.fingerprints, **second.fingerprints},
                           phases=merged_phases, clipped=merge_factors(dict(first.clipped), second.clipped),
                           rejected=sorted(set(first.rejected) | set(second.rejected)),
                           contributors=second.contributors)

    def _average_stage(self, deltas: list[torch.Tensor], round_no: int, weight: float,
                       stop: threading.Event | None, fingerprint: str, target: int | None, stage: int, index: int,
                       digest: int = 0, rank: int = 0, weights: bool = False, extra: dict | None = None,
                       give_up: Callable[[], str] = lambda: "", regroup: Callable[[], str] = lambda: "",
                       deadline: float | None = None, wait: float = 0.0, leader: str = "",
                       follow: Callable[[], tuple[int, str]] | None = None) -> RoundResult:
        """One matchmaking + all-reduce under the key (round, stage, index); see average(). ``give_up``: polled
        while looking for a group, a reason to stop waiting (or ""); ``regroup``: the same, asked after an attempt
        that found no group, before the next one."""
        t0, (sent0, recv0), codec0 = time.monotonic(), self.counter.snapshot(), self.counter.codec_seconds()
        deadline, phases = deadline if deadline is not None else t0 + self.fed.round_deadline, {}

        def result(solo: bool, reason: str = "", gathered: dict | None = None, **more) -> RoundResult:
            sent, recv = self.counter.snapshot()
            gathered = gathered or {}
            phases["codec"] = self.counter.codec_seconds() - codec0
            heads = sum(int(g.get("row_size", 1)) for g in gathered.values() if isinstance(g, dict))
            return RoundResult(round_no, solo, len(gathered) if not solo else 1, list(gathered),
                               sum(float(g.get("weight", 0.0)) for g in gathered.values()) if not solo else weight,
                               time.monotonic() - t0, sent - sent0, recv - recv0, reason, phases=phases,
                               contributors=heads if not solo else 1, **more)

        if len(deltas) != len(self._buffers) or any(d.shape != b.shape for d, b in zip(deltas, self._buffers)):
            raise FederationError("average() got tensors whose shapes differ from the averager's templates")
        if not self._averager.is_alive():
            return result(True, "averager process is not running")
        # norm: the L2 norm of what we send, which bounds what any reducer may return (robust.ReducerCheck)
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(d.detach().float())) ** 2 for d in deltas))
        gather = {"round": int(round_no), "stage": stage, "weight": weight, "client": self.client_mode,
                  "fingerprint": fingerprint, "rank": int(rank), "weights": bool(weights),
                  "norm": norm if math.isfinite(norm) else -1.0,
                  BULK_KEY: self.bulk.address if self.bulk is not None and self.bulk_backoff.allows(round_no) else "",
                  **(extra or {})}
        bits = group_bits(round_no, stage, index, digest)
        log.debug("round %d: stage %d group %d (key %s) looking for %s peers, weight %.3g", round_no, stage,
                  index, bits, target, weight)
        gathered, reason = self._run_step(deltas, round_no, weight, deadline, stop, phases, gather, target,
                                          bits, give_up, regroup, wait, leader, follow)
        if gathered is None:
            log.debug("round %d: stage %d group %d ended without averaging (%s)", round_no, stage, index, reason)
            return result(True, reason)
        report = gathered.pop(REPORT_KEY, None) or {}
        log.debug("round %d: stage %d group %d matched %s", round_no, stage, index, sorted(gathered))
        mismatched = {p: g for p, g in gathered.items()
                      if not isinstance(g, dict) or g.get("round") != round_no or g.get("stage", 0) != stage}
        if mismatched:
            log.warning("round %d: discarded a group with peers at other rounds: %s", round_no,
                        {p: (g.get("round") if isinstance(g, dict) else g) for p, g in mismatched.items()})
            return result(True, "round mismatch")
        t_back = time.monotonic()
        if not self._lock(deadline):
            return result(True, "averaged tensors stayed locked")
        try:
            if not all_finite(self._buffers, fast=self.tuning.fast_checks):
                return result(True, "non-finite values after all-reduce")
            for d, b in zip(deltas, self._buffers):
                d.copy_(b)
        finally:
            self._averager.lock_averaged_tensors.release()
            phases["write_back"] = time.monotonic() - t_back
        fraction, failed = float(report.get("failed_fraction", 0.0)), list(report.get("failed_peers", []))
        reason = ""
        if fraction > 0:
            # A failed reducer's parts come back as zeros: no update there. Keeping each survivor's own Δ would
            # leave the survivors on different models, since later rounds only average updates.
            reason = f"partial: {fraction:.1%} of values not averaged (left unchanged)"
            why = dict(report.get("failures") or {})
            log.warning("round %d: %s (reducer(s) that failed: %s)", round_no, reason,
                        ", ".join(f"{p} ({why[p]})" if p in why else p for p in failed) or "?")
        fingerprints = {p: str(g.get("fingerprint", "")) for p, g in gathered.items()}
        clipped = {str(p): float(f) for p, f in dict(report.get("clipped") or {}).items()}
        rejected = [str(p) for p in report.get("rejected") or []]
        if rejected:
            why = f"reducer(s) {', '.join(rejected)} returned averages beyond the senders' bounds (zeroed)"
            reason = f"{reason}; {why}" if reason else why
            log.warning("round %d: %s", round_no, why)
        self.counter.wait_quiet(limit=max(0.0, min(1.0, deadline - time.monotonic())))
        # Joiners download from the peer with the highest priority: only a peer whose group averaged this round
        # advertises the next one. One that missed it keeps the old weights under a newer round number, and
        # joiners that preferred it were refused (its fingerprint differs from the swarm's) or left behind.
        self.share_state(priority=round_no + 1)
        if report.get("transport") == "gloo":
            self.bulk_backoff.succeeded()
        return result(False, reason, gathered, partial=fraction, failed_peers=failed,
                      healed=bool(report.get("healed")), fingerprints=fingerprints, clipped=clipped,
                      rejected=rejected, transport=str(report.get("transport", "hivemind")))

    def _run_step(self, deltas: list[torch.Tensor], round_no: int, weight: float, deadline: float,
                  stop: threading.Event | None, phases: dict[str, float], gather: dict,
                  live_target: int | None, bits: str,
                  give_up: Callable[[], str],
                  regroup: Callable[[], str] = lambda: "", wait: float = 0.0,
                  leader: str = "", follow: Callable[[], tuple[int, str]] | None = None,
                  ) -> tuple[dict[str, dict] | None, str]:
        """Matchmake and all-reduce until success or the deadline: (gathered metadata by peer, "") or (None, why)."""
        t_copy = time.monotonic()
        if not self._lock(deadline):
            return None, "a previous all-reduce still holds the tensors"
        try:
            for buf, d in zip(self._buffers, deltas):
                buf.copy_(d.detach())
        finally:
            self._averager.lock_averaged_tensors.release()
            phases["copy_in"] = time.monotonic() - t_copy
        t_match, target = time.time(), self.fed.target_group_size  # wall clock: the averager process stamps in it too
        if live_target is not None:  # every live peer of this group (past target_group_size only for columns)
            target = max(self.fed.min_group_size, live_target)
        elif self.tuning.cap_group_to_live_peers:
            target = live_group_target(self.dht, self.fed.run_id, self.peer_id, target, self.fed.min_group_size,
                                       timeout=min(2.0, self.fed.matchmaking_time / 2))
        reason = "no group found"
        while True:
            self.clock.reset()
            remaining = deadline - time.monotonic()
            # A group that knows its members (live_target) waits up to the round's budget (``wait``, at least
            # straggler_wait) for one that is late; it starts the moment all have joined, so the wait only costs
            # time when a member really is missing.
            window = max(self.fed.matchmaking_time, wait, self.fed.straggler_wait if live_target is not None else 0.0)
            # A follower declares one slot later than the leader would: the leader accepts only followers whose
            # expiration is not before its own.
            follower = bool(leader) and leader != self.peer_id
            offset = self._aligned(window + (self.fed.matchmaking_time if follower else 0.0))
            if live_target is not None:
                offset = min(offset, remaining - self.fed.matchmaking_time)
            if remaining < offset + 0.5 or offset < self.fed.matchmaking_time:
                return None, reason
            # Retries are ours, not hivemind's: after a group forms hivemind shifts the group key, and a retry
            # must use this round's key again.
            find_timeout = min(max(remaining - self.fed.allreduce_timeout, offset + 0.5), remaining)
            control = bounded(lambda: self._start_step(bits, gather, weight, offset, find_timeout, target,
                                                       leader), 10.0)
            if control is None:
                return None, "averager process is not responding"
            try:
                next_check = time.monotonic() + 1.0
                while not control.done() and time.monotonic() < deadline and not (stop and stop.is_set()):
                    if time.monotonic() >= next_check and control.stage.name == "LOOKING_FOR_GROUP":
                        next_check = time.monotonic() + 1.0
                        why = give_up()
                        if why:
                            control.cancel()
                            return None, why
                        if follow is not None:
                            wanted, now_leader = follow()
                            wanted = max(self.fed.min_group_size, wanted)
                            if wanted != target:  # before the group assembles: a newcomer, or one gone silent
                                target = wanted
                                self._averager.set_target_group_size(target)
                            if now_leader != leader:
                                leader = now_leader
                                self._averager.set_round_leader(leader or None)
                    try:
                        control.result(timeout=0.2)
                    except (Exception, asyncio.CancelledError):  # hivemind cancels a step whose process died
                        pass  # a timeout of this poll, or the step's own failure (read below)
            except BaseException:
                control.cancel()  # Ctrl-C: leave no step behind in the averager process
                raise
            if not control.done():
                control.cancel()
                if stop and stop.is_set():
                    return None, "stopped"  # leaving: no gloo verdict (a warning on every Ctrl-C mid-round)
                self._gloo_failed(round_no, "the round's deadline came first", gather)
                return None, "deadline"
            try:
                gathered = control.result(timeout=0)
                stamps = self.clock.read()
                if stamps["group_assembled"] and stamps["allreduce_done"]:
                    phases.update(matchmaking=stamps["group_assembled"] - t_match,
                                  allreduce=stamps["allreduce_done"] - stamps["group_assembled"],
                                  handoff=time.time() - stamps["allreduce_done"])  # result reaches this process
                return {str(peer): data for peer, data in (gathered or {}).items()}, ""
            except (Exception, asyncio.CancelledError) as e:
                reason = "no group found" if "could not find a group" in str(e) else describe(e)
                log.info("round %d: averaging attempt failed (%s)", round_no, reason)
                self._gloo_failed(round_no, reason, gather)
                if stop and stop.is_set():
                    return None, "stopped"
                why = regroup()
                if why:
                    return None, why

    def _gloo_failed(self, round_no: int, reason: str, gather: dict) -> None:
        """After an attempt that failed or ran out of time: if it was on gloo (began and never finished), stay off
        gloo for a while (bulk.BulkBackoff), starting with a retry within this round. A gloo collective that
        one member breaks hangs until its timeout, usually past the round's deadline."""
        stamps = self.clock.read()
        if not (stamps["bulk_failed"] or (stamps["bulk_started"] and not stamps["allreduce_done"])):
            return
        off = self.bulk_backoff.failed(round_no)
        gather[BULK_KEY] = ""
        log.warning("round %d: the group's gloo all-reduce failed (%s); this peer takes hivemind's all-reduce for "
                    "the next %d round(s)", round_no, reason, off)

    def _start_step(self, bits: str, gather: dict, weight: float, offset: float, find_timeout: float, target: int,
                    leader: str = ""):
        self._averager.set_target_group_size(target)
        self._averager.set_round_leader(leader or None)
        self._averager.set_group_bits(bits)
        return self._averager.step(gather=gather, weight=weight, scheduled_time=get_dht_time() + offset,
                                   timeout=find_timeout, allow_retries=False, wait=False)

    def _aligned(self, window: float) -> float:
        """Seconds from now to the step's declared expiration: ``window``, rounded up so that the expiration is a
        multiple of matchmaking_time in DHT time. hivemind
        orders potential leaders by (expiration, peer id): peers that come within one such slot declare the SAME
        expiration, so they all agree the lowest peer id among them leads, instead of each leading a few
        followers of its own (16 peers with expirations a moment apart formed 2-5 groups per round)."""
        slot, now = max(0.05, self.fed.matchmaking_time), get_dht_time()
        return math.ceil((now + window) / slot) * slot - now

    def _lock(self, deadline: float) -> bool:
        return self._averager.lock_averaged_tensors.acquire(timeout=max(0.1, deadline - time.monotonic()))

    # ---- state for joiners -------------------------------------------------------------------------------
    def load_state(self, timeout: float, progress: bool = False, only: list[str] | None = None,
                   exclude: list[str] = ()) -> tuple[dict, list[torch.Tensor]] | None:
        """Download the global state (metadata, tensors) from the most advanced peer that shares it (of ``only``,
        when given: peers known to hold the model wanted; never one in ``exclude``), or None."""
        if not self._averager.is_alive():
            return None
        if progress:
            print(f"photon-peer: looking for a peer that shares state (up to {timeout:.0f}s)", flush=True)
        try:
            got = self._averager.load_state_from(only, timeout=timeout, exclude=exclude)
        except TimeoutError:
            return None
        except Exception as e:
            log.warning("state download failed: %s", describe(e))
            return None
        if not got:
            return None
        metadata, tensors = got
        if not isinstance(metadata, dict):
            log.warning("ignored a peer's state: its metadata is %s, not a dict", type(metadata).__name__)
            return None
        self.share_state(priority=float(metadata.get("round", 0)))
        return metadata, list(tensors)

    def share_state(self, priority: float) -> None:
        """Serve state to joiners from now on; joiners pick the peer with the highest priority (its round)."""
        if self.client_mode or not self._averager.is_alive():
            return  # client-mode peers accept no incoming requests, so they cannot serve state
        self._averager.allow_state_sharing = True
        self._averager.state_sharing_priority = float(priority)

    @property
    def peer_id(self) -> str:
        return str(self._averager.peer_id)

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if self._averager.is_alive():
                self._averager.shutdown()
        finally:
            self._kill()

    def _kill(self) -> None:
        if self._averager.pid is not None and self._averager.is_alive():
            self._averager.kill()
        if self._averager.pid is not None:
            self._averager.join(5)
