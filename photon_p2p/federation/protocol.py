"""The round protocol's rules, pure (stdlib only): whom a round waits for and how long, which model wins a split,
when a finite run ends, and each round's outcome. Every rule here is a function of values that every peer of the
round reads the same way, or it only decides how long this peer waits (never whom it may meet)."""

from __future__ import annotations

import bisect
import enum
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Outcome(str, enum.Enum):
    """What a round did to this peer's model (the round record's ``outcome``)."""

    AVERAGED = "averaged"  # its group's mean Δ applied: the same bytes on every member
    HEALED = "healed"  # its group held two models and averaged weights: one model again
    PARTIAL = "partial"  # averaged, but a failed reducer's part was left unchanged (on every member if the
    # reducer failed; on one member alone if only its stream from the reducer broke: it adopts its group's model
    # before the round's record, rejoin._mend_partial)
    MISSED = "missed"  # no group while others were live: local work folds into the next round
    SOLO = "solo"  # alone in the swarm: its own Δ applied
    JOINED_LATE = "joined_late"  # a joiner whose first round closed before it came: caught up, part of joining
    STOPPED = "stopped"  # the peer is leaving: nothing applied, the work stays in the checkpoint


@dataclass(frozen=True)
class ClockRecord:
    """A peer's swarm-clock record as read from the DHT: its round, inner steps taken in it by ``time`` (DHT
    time of the store: a running process stores its record every few seconds) and its speed (inner steps per
    second of compute; 0 = not yet measured); ``client``: a client-mode peer (it cannot be reached, so never leads)."""

    round: int
    steps: float = 0.0
    speed: float = 0.0
    time: float = 0.0
    client: bool = False


SILENT_S = 12.0  # a record that has not moved for this long belongs to a stopped or dead process (stored every 3 s)


def wait_budget(compute_s: float, matchmaking_time: float, straggler_wait: float, fraction: float,
                limit: float) -> float:
    """How long a round's group waits for a member that is still training: a share of the round's compute time,
    never less than the matchmaking window (or straggler_wait) and never more than ``limit``. A fixed window is too
    short on a busy machine (a 5 s window left a silo out of 8 of 32 demo rounds) and too long for nothing."""
    floor = max(matchmaking_time, straggler_wait)
    return max(floor, min(limit, fraction * max(0.0, compute_s)))


@dataclass
class Roster:
    """Whom this peer's round waits for: ``members`` (records at the round) and ``waited`` (also records one round
    behind: a peer landing its last average or seen late). Absent from ``waited``: records two or more rounds
    behind (gone), members projected to finish their local phase past the budget, and no-shows (``NoShows``)."""

    round: int
    members: list[str]
    waited: list[str]
    late: list[str] = field(default_factory=list)  # members projected past the budget: the group starts without them
    silent: list[str] = field(default_factory=list)  # records no longer stored (stopped or dead): not waited for
    eta: float = 0.0  # seconds until the last waited member is projected to end its local phase
    clients: list[str] = field(default_factory=list)  # client-mode peers among ``waited``: never asked to lead
    ahead: list[str] = field(default_factory=list)  # peers whose record is past the round: it closed for them
    # members that joined into the round with a download (their record shows no speed: the rest of a round); if
    # they are all that is left at the round, it closed for them (``orphaned``)
    joiners: list[str] = field(default_factory=list)


def arrival_s(record: ClockRecord, round_s: float, now: float) -> float:
    """Seconds until ``record``'s peer ends a local phase of ``round_s`` seconds of compute (speed quotas give
    every member about the same), projected from its steps and speed; 0 if it should be done already, or if
    its speed is unknown (then it is simply waited for)."""
    if record.speed <= 0 or round_s <= 0:
        return 0.0
    return max(0.0, round_s - record.steps / record.speed - max(0.0, now - record.time))


QUOTA_BAND = 0.25  # a silo within ±25% of the swarm's mean speed takes exactly H steps
SPEED_CAP = 4.0  # another silo's declared speed counts up to this many times the others' median (speed_quota)


def speed_quota(local_steps: int, own: float, others: list[float], band: float = QUOTA_BAND) -> int:
    """A silo's inner steps for a round: H while it is about as fast as the swarm's mean (within ±band), else
    H × its speed over the mean, so every silo trains about the same wall time and all reach matchmaking
    together. Unknown speeds (the first round, alone): H.

    Why not end the round for everyone when the swarm's total reaches H × peers (hivemind's ProgressTracker
    target): equally fast silos then took anywhere from 1 to 16 steps of an H = 8 round, depending on when
    each began it, and the non-IID run ended 12% worse than with a fixed H (BENCHMARKS.md, "The swarm clock").
    """
    return Speeds(others).quota(local_steps, own, band=band)


class Speeds:
    """The live records' speeds, sorted once: each member's speed_quota in O(log n) instead of O(n log n).

    roster() projects every member's quota over the speeds of everyone else; done member by member that cost
    O(n² log n) per read: 0.2 s at 1,000 records, repeated every second a peer waits (bench/protocol_sim.py)."""

    def __init__(self, speeds: list[float]) -> None:
        self.sorted = sorted(s for s in speeds if s > 0)
        self.prefix = [0.0]
        for s in self.sorted:
            self.prefix.append(self.prefix[-1] + s)

    def quota(self, local_steps: int, own: float, band: float = QUOTA_BAND, exclude: bool = False) -> int:
        """speed_quota of a silo of speed ``own`` against these speeds (``exclude``: less one occurrence of
        ``own``, the member's own record among them)."""
        n = len(self.sorted) - (1 if exclude and own > 0 else 0)
        if own <= 0 or n <= 0:
            return local_steps
        # A record's speed is its publisher's word: one record of 1e30 gave every silo a quota of one step. Another's
        # speed counts up to SPEED_CAP x the others' lower median (honest silos differ far less), which fewer than
        # half of them cannot move.
        k, gap = (n - 1) // 2, bisect.bisect_left(self.sorted, own) if exclude else len(self.sorted)
        median = self.sorted[k if k < gap else k + 1]
        cap = SPEED_CAP * median
        c = bisect.bisect_right(self.sorted, cap)
        total = self.prefix[c] + cap * (len(self.sorted) - c) - (min(own, cap) if exclude else 0.0)
        ratio = own * (n + 1) / (own + total)
        if abs(ratio - 1) <= band:
            return local_steps
        return max(1, round(local_steps * ratio))


def member_round_s(records: dict[str, ClockRecord], member: str, round_no: int, local_steps: int,
                   by_speed: bool = True, speeds: Speeds | None = None) -> float:
    """Seconds of compute ``member``'s local phase takes: its own quota (speed_quota over the speeds of the live
    records, as the member computes it, or H with a fixed clock) at its own speed; 0 if its speed is unknown.
    Round 0 is H for everyone: no silo knows its own speed when it fixes its first quota (projected from
    speed_quota, a half-speed silo of 8 was expected a whole round early and left out of round 0). ``speeds``:
    live_speeds(records, round_no), when projecting many members of one read."""
    record = records[member]
    if record.speed <= 0:
        return 0.0
    if round_no == 0:
        return local_steps / record.speed
    if not by_speed:
        return local_steps / record.speed
    speeds = speeds or live_speeds(records, round_no)
    live = record.round >= round_no - 1  # its own speed is among the live ones: not counted against itself
    return speeds.quota(local_steps, record.speed, exclude=live) / record.speed


def live_speeds(records: dict[str, ClockRecord], round_no: int) -> Speeds:
    """The speeds a member at ``round_no`` sets its quota against: records at the round or one behind."""
    return Speeds([r.speed for r in records.values() if r.round >= round_no - 1])


def roster(records: dict[str, ClockRecord], round_no: int, me: str, now: float, budget: float, local_steps: int,
           skip: frozenset[str] | set[str] = frozenset(), by_speed: bool = True,
           quiet: frozenset[str] | set[str] = frozenset(), joined: bool = False) -> Roster:
    """The round's roster from the clock's records as read when this peer's local phase ended (``me`` is a
    member). Each member's arrival is projected from its own quota and speed (``local_steps`` = H; ``by_speed``:
    quotas scale with speed, the swarm clock); ``skip``: no-shows not to wait for again; ``quiet``: peers whose
    record has not moved for SILENT_S (a stopped or killed process), neither waited for nor asked to lead. A
    member projected to come more than ``budget`` after most of the other members is late (not waited for); a
    peer that came early (a joiner's short first round) waits for the others' projected arrival (``eta``) plus
    the budget: the wait follows the work. (Projected from this reader's own round time, a fast silo given 11
    steps of an H = 8 round looked due 4 s before it came, and the group left without it by 0.1 s.) ``joined``:
    this peer joined into the round with a download (its own record, once stored, shows no speed)."""
    members = sorted({p for p, r in records.items() if r.round == round_no} | {me})
    near = {p: r for p, r in records.items() if p != me and p not in skip and round_no - 1 <= r.round <= round_no}
    silent = set(near) & set(quiet)  # (sets, not the sorted lists: a roster of 1,000 records is read each second)
    speeds = live_speeds(records, round_no)
    candidates = {p: arrival_s(r, member_round_s(records, p, round_no, local_steps, by_speed, speeds), now)
                  if r.round == round_no else 0.0 for p, r in near.items() if p not in silent}
    # When most of the others have come (their lower median): this peer's own arrival does not count, or a joiner
    # that came early (a short first round) would call a member due a few seconds later late.
    arrivals = sorted(candidates.values()) or [0.0]
    typical = arrivals[(len(arrivals) - 1) // 2]
    waited = {p for p, a in candidates.items() if a <= typical + budget}
    late = sorted(p for p in candidates if p not in waited)  # past the budget after the others: not waited for
    eta = max((candidates[p] for p in waited), default=0.0)
    clients = sorted(p for p in [*waited, me] if p in records and records[p].client)
    ahead = sorted(p for p, r in records.items() if p != me and r.round > round_no)
    joiners = sorted(p for p in members if p != me and p not in silent and records[p].speed <= 0)
    return Roster(round_no, members, sorted([*waited, me]), late, sorted(silent), eta, clients, ahead,
                  sorted([*joiners, me]) if joined else joiners)


def others_done(records: dict[str, ClockRecord], round_no: int, me: str, now: float, local_steps: int,
                by_speed: bool = True, quiet: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether an averaging helper's round (it trains nothing) has reached its averaging: some other live peer is
    past the round, or every other live peer is at it and projected to have ended its local phase (arrival_s), none
    still landing the one before. False with nobody else: a helper alone has nothing to average."""
    others = {p: r for p, r in records.items() if p != me and p not in quiet and r.round >= round_no - 1}
    if not others:
        return False
    if any(r.round > round_no for r in others.values()):
        return True
    if any(r.round < round_no for r in others.values()):
        return False
    speeds = live_speeds(records, round_no)
    return all(arrival_s(r, member_round_s(records, p, round_no, local_steps, by_speed, speeds), now) <= 0
               for p, r in others.items())


def moved_on(records: dict[str, ClockRecord], round_no: int, me: str,
             quiet: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether the swarm averaged ``round_no`` without this peer: at least as many live records are past it as
    are still at it (this peer included). A round averages once (G1): the peers left at it must catch up, not
    average among themselves. (Three joiners that came after the first group of round 0 had formed averaged
    round 0 again as a group of their own: two models until the next round healed them.) A majority, not any
    one record past the round: a single peer that claims a later round cannot make a group give up."""
    live = {p: r for p, r in records.items() if p not in quiet}
    ahead = sum(1 for r in live.values() if r.round > round_no)
    here = len({p for p, r in live.items() if r.round == round_no} | {me})
    return ahead >= here


def server_moved(records: dict[str, ClockRecord], server: str, round_no: int) -> bool:
    """Whether the peer this joiner downloaded its state from has moved past the round it joined at: that round
    closed before the joiner came (G1: it averages once). The majority rule (moved_on) cannot see this when the
    joiners outnumber the swarm: 15 joiners that booted in 34 s, while the first peer's round 0 ended alone after
    26 s, averaged round 0 again among themselves, and the next round healed two models. Trusting the server
    this much costs nothing: the joiner has just adopted its state."""
    return bool(server) and server in records and records[server].round > round_no


SETTLE_S = 2.0  # a group does not start within this long of a new member's record appearing (joiners come in bursts)


def round_leader(chosen: Roster) -> str:
    """The peer every member of the round asks to lead its group: the lowest peer id among the waited members
    already at the round that can be reached (not in client mode). Peers whose reads differ by a record may name
    two leaders for a moment; each re-reads the roster while it waits (swarm.average's ``follow``), and the one
    that finds a lower id asks it to lead, sending its own followers along. Joiners may lead: preferring the
    members that trained the round from its start named, after a 32-peer boot, the one peer every joiner had
    downloaded from, and under that load it formed no group (a round missed by all 32)."""
    at_round = (set(chosen.waited) & set(chosen.members)) - set(chosen.clients)
    return min(at_round) if at_round else ""


def orphaned(records: dict[str, ClockRecord], round_no: int, me: str, joined: bool,
             quiet: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether this joiner's round has closed for it: no live member at the round trained it from its start
    (every record there shows no speed: joiners, as we are), and a live record is past it. The peers it joined
    from averaged the round, or gave it up, and moved on; joiners must not average it again among themselves
    (G1): they catch up. (The first peer of a 32-peer boot gave round 0 up alone as the 31 others synced; 7 of
    them averaged round 0 in two groups, whose servers were other joiners, so server_moved did not apply.)"""
    if not joined:
        return False
    live = {p: r for p, r in records.items() if p != me and p not in quiet}
    return not any(r.round == round_no and r.speed > 0 for r in live.values()) and \
        any(r.round > round_no for r in live.values())


@dataclass(frozen=True)
class RosterChange:
    """What a later read of the records changed in a round's roster while its members wait (``fold``)."""

    new: list[str]  # joiners: now waited for, not started without
    gone: list[str]  # waited members whose record went silent (stopped or dead): no longer waited for
    arrived: list[str]  # waited members one round behind (landing an average, catching up) now at the round
    ahead: list[str] = field(default_factory=list)  # waited members now past the round (they caught up elsewhere)

    def __bool__(self) -> bool:
        return bool(self.new or self.gone or self.arrived or self.ahead)


def fold(chosen: Roster, fresh: Roster) -> RosterChange:
    """Fold ``fresh`` (the roster from a later read) into ``chosen`` (updated in place) and say what changed; the
    round's leader is then round_leader(chosen) again. A member that came from one round behind counts: a slow
    silo that caught up by download came to each round after the others had read it one round behind, named
    itself (the lowest id) while they kept the leader they had named, and missed every round of a CI run."""
    new = sorted(set(fresh.waited) - set(chosen.waited))
    gone = sorted(set(chosen.waited) & set(fresh.silent))
    arrived = sorted((set(fresh.members) & set(chosen.waited)) - set(chosen.members))
    # A member past the round is not coming (it caught up to a later round): 13 peers at round 0 kept asking a
    # leader that had left for round 1 until their round's deadline, 30 s.
    ahead = sorted(set(chosen.waited) & set(fresh.ahead))
    chosen.members = sorted({*chosen.members, *(set(new) & set(fresh.members)), *arrived} - set(ahead))
    chosen.clients = sorted({*chosen.clients, *(set(new) & set(fresh.clients))} - set(ahead))
    chosen.waited = sorted((set(chosen.waited) | set(new)) - set(gone) - set(ahead))
    return RosterChange(new, gone, arrived, ahead)


def leader_left(change: RosterChange, leader: str) -> bool:
    """Whether the round's designated leader (``leader``, not us) moved past the round while we waited: it began
    the round's one group without us, or caught up to a later round the swarm had averaged. Either way the round
    is closed for us (G1): we catch up instead of naming the next-lowest id, which formed a second group at the
    round (32 peers on 2 cores: the leader began with 13 as its wait ended, 8 of the rest then averaged under a
    new leader, two models)."""
    return bool(leader) and leader in change.ahead


class NoShows:
    """Peers a round waited for that never came, remembered with the record they were waited on. Waited for
    again only once their record changes (a new report: the peer is alive and moving), so a crashed or stopped
    peer delays the others by at most one budget, not one per round until its record expires."""

    def __init__(self) -> None:
        self._seen: dict[str, ClockRecord] = {}

    def skip(self, records: dict[str, ClockRecord]) -> set[str]:
        """The no-shows whose record is still the one they failed to come on."""
        for p in [p for p, r in self._seen.items() if records.get(p) != r]:
            del self._seen[p]  # moved (or gone from the DHT): forget
        return set(self._seen)

    def note(self, waited: list[str], came: list[str], records: dict[str, ClockRecord]) -> list[str]:
        """After a round: the peers waited for that were not in the group. Returns them."""
        missing = [p for p in waited if p not in set(came) and p in records]
        for p in missing:
            self._seen[p] = records[p]
        return missing


def majority(fingerprints: dict) -> str:
    """The model that wins a visible split: the fingerprint most peers hold, ties to the smallest fingerprint.
    Every peer that reads the same heartbeats evaluates it the same way (G2). "" if there is none."""
    counts = Counter(fp for fp in fingerprints.values() if fp)
    if not counts:
        return ""
    return min(counts, key=lambda fp: (-counts[fp], fp))


def split_winner(mine: str, my_round: int, peers: list[dict]) -> str:
    """If live peers at this peer's round hold another model than the majority's and ours is not it: the
    fingerprint to adopt. "" when there is no split, or ours wins. ``peers``: other peers' heartbeats."""
    at_round = {str(p.get("peer_id")): str(p.get("fingerprint") or "") for p in peers
                if int(p.get("round", -1)) == my_round}
    at_round = {p: fp for p, fp in at_round.items() if fp}
    if not at_round:
        return ""
    winner = majority({**at_round, "\0self": mine})  # our own vote counts too
    return winner if winner and winner != mine else ""


def heals(fingerprints: list[str], weights: list[bool], stage: int) -> bool:
    """Whether a group averages its members' weights instead of their updates (a healing round): two models
    each held by at least two members (a pocket meeting the swarm), or, in a grid's second stage (2), a member
    whose first stage healed (its buffer holds weights). One member's word is not enough: a member that declared
    a fake fingerprint made every round a healing round (no claim budget, no reducer check) and its -θ, which
    has θ's norm, halved the model. A lone member on another model is healed by the split rule (G2): it adopts
    the majority's state. Every member evaluates this on the same gathered metadata."""
    if stage == 2 and any(weights):
        return True
    return sum(1 for n in Counter(fp for fp in fingerprints if fp).values() if n >= 2) >= 2


def one_model_group(result: Any) -> frozenset:
    """The members of a round's group if it left all of them on one model: it averaged with no part missing
    (partial 0), and its members came on one model or healed (averaged weights); else empty."""
    models = set(result.fingerprints.values()) - {""}
    if result.solo or result.partial > 0 or not (result.healed or len(models) <= 1):
        return frozenset()
    return frozenset(result.peers)


def state_verdict(actual: str, round_no: int, server: str, peers: list[dict], trusted: str = "") -> str:
    """Why a downloaded state (fingerprint ``actual`` at ``round_no``, served by ``server``) must be refused, or
    "" to adopt it. The server's own heartbeat never vouches for its state: a server that advertised a far-future
    round with its own heartbeat was believed, and replaced the model of every peer that synced. The live peers
    at that round other than the server must hold it (their majority, ties to the smallest fingerprint, as
    everywhere); with none there, it is adopted only if the server is the only other live peer (nothing to
    compare with) or ``trusted``, the peer this one joined from (trust on first use: a swarm's first peer ahead
    of the joiners that came after its round 0 closed), or the round is at most one past the newest one the
    others show (catch_up_round). ``peers``: other peers' heartbeats."""
    others = [p for p in peers if str(p.get("peer_id")) != server]
    at_round = {str(p.get("peer_id")): str(p.get("fingerprint") or "") for p in others
                if p.get("round") == round_no and p.get("fingerprint")}
    if at_round:
        wanted = majority(at_round)
        if actual != wanted:
            count = sum(1 for fp in at_round.values() if fp == wanted)
            return f"its fingerprint {actual[:8]} differs from the {count} live peer(s) at round {round_no} holding " \
                   f"{wanted[:8]}"
        return ""
    if not others or (trusted and server == trusted):
        return ""
    # Nobody else at that round yet: a round at most one past the newest that the others show is how a swarm
    # looks while its first peer is ahead of joiners still booting (a joiner refused it, and started a model of
    # its own); a far-future round is refused.
    if isinstance(round_no, int) and round_no <= catch_up_round(others) + 1:
        return ""
    return f"no live peer other than its server is at round {round_no} to vouch for it"


def catch_up_round(peers: list[dict], trusted: str = "") -> int:
    """The newest round this peer may catch up to (-1: none): one that two or more live peers report, or the
    only other peer, or the peer this one joined from. One heartbeat at a far-future round made every peer try
    a full download after every round; its state is refused anyway (state_verdict)."""
    rounds = sorted((int(p["round"]), str(p.get("peer_id"))) for p in peers)
    if len(rounds) == 1:
        return rounds[0][0]
    best = rounds[-2][0] if len(rounds) >= 2 else -1  # the highest round at least two peers have reached
    for r, peer in rounds:
        if trusted and peer == trusted:
            best = max(best, r)
    return best


def run_over(round_no: int, rounds: int) -> bool:
    """``federation.rounds: R`` ends the run at the swarm's round R (G5), not after each silo's own R rounds: a
    silo that joined late or missed rounds stops where the others do. 0 = until stopped."""
    return rounds > 0 and round_no >= rounds


def outcome(solo: bool, reason: str, healed: bool, partial: float, alone: bool, late_join: bool = False) -> Outcome:
    """A finished round's outcome from the averager's result. ``late_join``: the peer's first round since it
    joined, which the swarm closed before it came (part of joining, not a missed round)."""
    if solo:
        if reason == "stopped":
            return Outcome.STOPPED
        if alone:
            return Outcome.SOLO
        return Outcome.JOINED_LATE if late_join else Outcome.MISSED
    if healed:
        return Outcome.HEALED
    return Outcome.PARTIAL if partial > 0 and math.isfinite(partial) else Outcome.AVERAGED
