"""The federation a daemon is given: one object that owns DHT → validators → averager → clock → heartbeats.

``PeerDaemon`` talks to the swarm only through the ``Swarm`` protocol below, so the round loop (clock, catch-up,
healing, the non-finite guard) can be driven in-process by a fake swarm in fast tests; ``HivemindSwarm`` is the
real one. It starts its parts in dependency order and shuts them down in reverse order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from hivemind.utils import get_dht_time

from photon_p2p.config import Config
from photon_p2p.credentials import load_owner_public, public_bytes
from photon_p2p.federation import FederationError
from photon_p2p.federation.admission import SwarmAdmission, validators_for
from photon_p2p.federation.averaging import LEFT, PseudoGradientAverager, RoundResult, group_bits
from photon_p2p.federation.clock import SwarmClock
from photon_p2p.federation.groups import plan_groups
from photon_p2p.federation.hivemind_ext import dht_stats
from photon_p2p.federation.identity import fingerprint
from photon_p2p.federation.network import connection_kind, parse_multiaddrs, start_dht, stop_dht, visible_maddrs
from photon_p2p.federation.protocol import (SETTLE_S, NoShows, Roster, fold, leader_left, moved_on, orphaned,
                                           others_done, round_leader, roster, server_moved, state_verdict)
from photon_p2p.federation.records import (
    RUNS_KEY,
    HeartbeatPublisher,
    heartbeat_key,
    install_validators,
    is_live,
    load_identity_key,
    near_miss,
    read_records,
    read_run_ids,
)

log = logging.getLogger("photon_p2p.federation")
StateProvider = Callable[[], tuple[dict, list[torch.Tensor]]]


class Swarm(Protocol):
    """What a daemon needs from the federation (see HivemindSwarm for the real semantics of each call)."""

    peer_id: str
    maddrs: list[str]
    connection: str  # "direct", "client" (client mode) or "relayed" (network.connection_kind)

    def start(self, snapshot: Callable[[], dict]) -> None: ...
    def check_run(self) -> None: ...
    def peers(self) -> list[dict]: ...
    def report_progress(self, round_no: int, steps: int, busy_s: float) -> None: ...
    def round_quota(self, round_no: int, local_steps: int, late: bool = False) -> int: ...
    def others_done(self, round_no: int) -> bool: ...
    def seen_ahead(self, round_no: int) -> bool: ...
    def strangers(self, members: frozenset) -> bool: ...
    def begin_round(self, round_no: int) -> None: ...
    def average(self, deltas: list[torch.Tensor], round_no: int, weight: float, *, stop, fingerprint: str,
                budget: float, joined: str = "") -> RoundResult: ...
    def load_state(self, timeout: float, progress: bool, only: list[str] | None = None,
                   exclude: list[str] = ()) -> tuple[dict, list[torch.Tensor]] | None: ...
    def publish_now(self) -> None: ...
    def shutdown(self) -> None: ...


class HivemindSwarm:
    """The real federation over a hivemind DHT (see the module docstring)."""

    def __init__(self, cfg: Config, global_tensors: list[torch.Tensor], state_provider: StateProvider) -> None:
        f, net = cfg.federation, cfg.network
        self.cfg = cfg
        initial = parse_multiaddrs(net.initial_peers, "--initial-peers")
        self.dht = start_dht(net, initial_peers=initial)
        self.averager: PseudoGradientAverager | None = None
        self.publisher: HeartbeatPublisher | None = None
        self.clock: SwarmClock | None = None
        self.admission: SwarmAdmission | None = None  # None: an open swarm
        self.no_shows = NoShows()  # peers a round waited for in vain (protocol.NoShows)
        self.dht_reads = 0  # DHT reads this daemon issued (heartbeats, clock records): bench/scale.py per round
        self.last_roster: Roster | None = None
        self._tokens_read = -math.inf  # when follow() last re-read the admitted peers (closed swarms)
        self._probe: threading.Thread | None = None  # the last connection probe (_probe_connection)
        try:
            self.peer_id = str(self.dht.peer_id)
            self.maddrs = visible_maddrs(self.dht)
            owner = public_bytes(load_owner_public(f.swarm_owner_key)) if f.swarm_owner_key else None
            self.owner_key = install_validators(self.dht, f.run_id, net.identity_path or None,
                                                extra_validators=validators_for(owner, f.run_id))
            if owner is not None:
                self.admission = SwarmAdmission(self.dht, owner, Path(f.admission_token).expanduser().read_text(),
                                                self.peer_id, net.request_timeout, f.record_ttl, f.run_id)
                self.admission.refresh()  # publishes our token: servers see a joiner before it asks for state
            self.connection = "client" if net.client_mode else "direct"  # refined from p2pd after each round
            self.averager = PseudoGradientAverager(self.dht, global_tensors, f, net, state_provider,
                                                   global_tensors=global_tensors, owner_public=owner)
            if f.round_clock == "swarm":
                key = load_identity_key(net.identity_path) if net.identity_path else None
                self.clock = SwarmClock(self.dht, f.run_id, f.local_steps,
                                        client_mode=bool(net.client_mode), private_key=key,
                                        expiration=f.record_ttl,
                                        admits=self.admission.allows if self.admission is not None else None)
        except BaseException:
            self.shutdown()
            raise

    # ---- membership --------------------------------------------------------------------------------------
    def start(self, snapshot: Callable[[], dict]) -> None:
        f, net = self.cfg.federation, self.cfg.network
        closed = self.admission is not None
        self.publisher = HeartbeatPublisher(self.dht, f.run_id, snapshot, f.heartbeat_interval, f.record_ttl,
                                            request_timeout=net.request_timeout, owner_key=self.owner_key,
                                            admission=self.admission.token if closed else "",
                                            admission_until=self.admission.grant.until if closed else math.inf)
        self.publisher.start()
        # From now on this peer serves its state to joiners, whether it downloaded it or started it (from scratch
        # or a checkpoint): a silo that started alone behind a bootstrap node is otherwise invisible to the
        # next joiner until its first round ends, and the two would start on different models.
        self.averager.share_state(priority=float(snapshot().get("round", 0)))

    def check_run(self) -> None:
        """Fail with a clear error if nobody trains our run but somebody trains one it looks like a typo of (a
        mistyped --run-id); another run id is a new run, started by this peer (records.near_miss)."""
        runs = read_run_ids(self.dht, timeout=self.cfg.network.request_timeout)
        run_id = self.cfg.federation.run_id
        if not runs or run_id in runs:
            return
        close = near_miss(run_id, runs)
        if close is not None and not self.cfg.federation.new_run:
            raise FederationError(f"no peer in this swarm trains run id '{run_id}', but peers train '{close}': "
                                  f"check --run-id, or pass --set federation.new_run=true to start '{run_id}' "
                                  f"(runs seen: {', '.join(repr(r) for r in runs[:5])})")
        print(f"photon-peer: no peer in this swarm trains run id '{run_id}' yet: this peer starts it (runs seen: "
              f"{', '.join(repr(r) for r in runs[:5])})", flush=True)

    def peers(self) -> list[dict]:
        """Other live peers' heartbeat records (round, fingerprint, ...); [] when the DHT does not answer."""
        self.dht_reads += 1
        try:
            rows = read_records(self.dht, self.cfg.federation.run_id, self.cfg.network.request_timeout)
        except Exception as e:  # no evidence is not an error: the caller treats it as "nobody else"
            log.debug("could not read heartbeats: %s", e)
            return []
        return [r for r in rows if r["peer_id"] != self.peer_id and is_live(r) and self._admits(r)]

    def _admits(self, record: dict) -> bool:
        # a revoked peer's records are still in the DHT (its token is valid): readers drop them
        return self.admission is None or (record["verified"] and self.admission.allows(record["peer_id"]))

    def dht_served(self) -> dict[str, dict[str, int]] | None:
        """{kind: {"requests", "bytes"}} this peer's DHT node has served other nodes since it started (dht_stats);
        None when the DHT process does not answer within min(1 s, network.request_timeout): no round waits on it."""
        future = None
        try:
            future = self.dht.run_coroutine(dht_stats.served, return_future=True)
            return future.result(timeout=min(1.0, float(self.cfg.network.request_timeout)))
        except Exception as e:  # a busy or stopping DHT process: the round record goes without these figures
            if future is not None:
                future.cancel()
            log.debug("could not read what the DHT node served: %r", e)
            return None

    def admission_line(self) -> str:
        """What the banner says about who may join."""
        if self.admission is None:
            return "OPEN swarm: anyone who can reach a peer can join (set federation.swarm_owner_key to close it)"
        view = self.admission.view
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.admission.grant.until))
        return (f"closed swarm, owner key {view.fingerprint}, {len(view.admitted())} admitted; "
                f"this peer's token expires {until}")

    # ---- the round clock ---------------------------------------------------------------------------------
    def report_progress(self, round_no: int, steps: int, busy_s: float) -> None:
        if self.clock is not None:
            self.clock.report(round_no, steps, busy_s)

    def round_quota(self, round_no: int, local_steps: int, late: bool = False) -> int:
        return self.clock.quota(round_no, local_steps, late) if self.clock is not None else local_steps

    def others_done(self, round_no: int) -> bool:
        """An averaging helper's local phase is over (protocol.others_done), from a fresh read of the clock."""
        if self.clock is None:
            return True  # a fixed H (config refuses it for a helper): nothing to project from
        records = self.clock.records(round_no, self.cfg.network.request_timeout, quiet=True)
        self.dht_reads += 1
        return others_done(records, round_no, self.peer_id, get_dht_time(), self.cfg.federation.local_steps,
                           quiet=self.clock.silent())  # the clock exists only with round_clock: swarm (by speed)

    def seen_ahead(self, round_no: int) -> bool:
        """Whether any other peer's clock record, as of the tracker's last fetch (no DHT read), is past
        ``round_no``; True without the clock (only the heartbeats tell). A peer whose group has just averaged asks
        this before reading every heartbeat to look for a swarm that moved on without its group: at 32 peers on
        2 cores that read took 3.3 s a round (median; 20 s at most) and nobody was ahead in almost every round."""
        if self.clock is None:
            return True
        return any(r.round > round_no for p, r in self.clock.cached().items() if p != self.peer_id)

    def strangers(self, members: frozenset) -> bool:
        """Whether the clock's last fetch (no DHT read) holds a record of a peer outside ``members``; True without
        the clock or members. The split rule reads every heartbeat before each average to find another model
        (1-6 s at 32 peers on 2 cores); after a round whose group left all its members on one model, only a peer
        outside it can hold another."""
        if self.clock is None or not members:
            return True
        return any(p not in members for p in self.clock.cached() if p != self.peer_id)

    def begin_round(self, round_no: int) -> None:
        if self.admission is not None:  # every round: revocations take effect, and a revoked peer stops itself
            self.admission.refresh()
            self.admission.check_self()
        if self.clock is not None:
            self.clock.begin(round_no, timeout=float(self.cfg.network.request_timeout))

    # ---- averaging and state -----------------------------------------------------------------------------
    def average(self, deltas, round_no, weight, *, stop, fingerprint, budget, joined="") -> RoundResult:
        """Average with every live peer of this round (protocol.roster): one group under the round's key, which
        starts the moment every waited-for peer has joined, else ``budget`` seconds after the first came. Past
        target_group_size: rows then columns (groups.py). Members come from the clock's records (heartbeats with
        a fixed H). ``joined``: the peer whose state this round began with ("": no download this round)."""
        f, target = self.cfg.federation, self.cfg.federation.target_group_size
        clock, me = self.clock, self.peer_id
        plan, by_speed = None, f.round_clock == "swarm"
        if clock is not None:
            records, quiet = clock.records(round_no, self.cfg.network.request_timeout), clock.silent()
            self.dht_reads += 1
            chosen = roster(records, round_no, me, get_dht_time(), budget, f.local_steps,
                            self.no_shows.skip(records), by_speed, quiet, joined=bool(joined))
        else:
            at_round = [p["peer_id"] for p in self.peers() if p["round"] == round_no]
            records, chosen = {}, Roster(round_no, sorted({me, *at_round}), sorted({me, *at_round}))
        def closed(now_read) -> bool:  # the swarm averaged this round without us: catch up, never average it again
            quiet = clock.silent()
            return moved_on(now_read, round_no, me, quiet) or server_moved(now_read, joined, round_no) or \
                orphaned(now_read, round_no, me, bool(joined), quiet)
        if clock is not None and closed(records):
            log.info("round %d: most live peers, the peer this one joined from, or every peer that trained the round "
                     "are past it: the swarm averaged it without this peer", round_no)
            return RoundResult(round_no, True, 1, [], weight, 0.0, 0, 0, LEFT)
        if len(chosen.waited) > target:
            # a grid (groups.py): past the one-group regime. Its members are the peers waited for (those one round
            # behind too, landing their last average), not only those already at the round: peers that read the
            # records a moment apart would otherwise plan different grids (one group for two of them, a grid of
            # four for the others) and never meet.
            plan = plan_groups(chosen.waited, me, target)
        # One group: it starts the moment every waited-for member has joined. A peer whose roster is a first read of
        # a swarm still forming (it knows of no other member, or it ``joined`` this round with a download) takes
        # whoever comes within its wait instead of starting once its roster is complete: two joiners 0.1 s apart
        # otherwise split round 0 into 2 + 1, the one leading having not yet seen the other's record.
        def group_size() -> int:  # whom the group starts at once with: its waited members, or whoever comes
            return len(chosen.waited) if len(chosen.waited) > 1 and not joined else max(2, target)
        live_target = group_size() if plan is None else None
        # A peer that knows of no other member (the swarm's first peer, its joiners still starting) waits in ONE
        # attempt up to the round's deadline, as it would have in several short ones, and once members appear it
        # starts when every one it knows of has joined (and SETTLE_S has passed since the last appeared). Going
        # on alone after one budget instead, a first silo of three finished a 1-round run before the others came.
        alone = clock is not None and plan is None and len(chosen.waited) == 1
        # Grid stages ask their own leaders (averaging.py). Without the swarm clock the roster is one heartbeat read
        # that nothing refreshes while we wait: a first peer that read only itself would lead alone, never
        # learning of the others; hivemind's search merges such groups instead.
        leader = round_leader(chosen) if plan is None and clock is not None else ""
        log.info("round %d: roster %s, waiting for %s (%s late, %s silent, %s joined into it) up to %.1fs + eta "
                 "%.1fs, leader %s", round_no, " ".join(m[-6:] for m in chosen.members),
                 " ".join(m[-6:] for m in chosen.waited), " ".join(m[-6:] for m in chosen.late) or "none",
                 " ".join(m[-6:] for m in chosen.silent) or "none", " ".join(m[-6:] for m in chosen.joiners) or "none",
                 budget, chosen.eta, leader[-6:] or "per stage")
        self.last_roster = chosen

        left_behind = False  # (one group) the designated leader moved past the round while we waited

        def give_up(waiting: tuple[str, ...]) -> bool:  # one group: no names; a grid stage: its other members
            if clock is None:
                return False
            if not waiting and (left_behind or closed(clock.cached())):
                return True
            return clock.left(round_no, waiting or tuple(set(chosen.waited) - {me}))

        def replan():  # grids only: a member whose report we had not seen yet changes the grid
            if clock is None or plan is None:
                return None
            fresh = roster(clock.records(round_no, min(1.0, float(self.cfg.network.request_timeout))), round_no,
                           me, get_dht_time(), budget, f.local_steps, self.no_shows.skip(records), by_speed,
                           clock.silent()).waited
            return plan_groups(fresh, me, target) if len(fresh) > target else None
        want, appeared = live_target or 0, 0.0

        def follow() -> tuple[int, str]:  # one group: members whose record appeared or went silent while we wait
            nonlocal want, leader, appeared, left_behind
            if self.admission is not None and (clock.unadmitted or clock.tracker.unadmitted) and \
                    time.monotonic() - self._tokens_read > 5.0:
                # A joiner's record came before we read its token: read the tokens again, or we lead alone while
                # it leads the rest (a closed swarm's first two silos never met).
                self._tokens_read = time.monotonic()
                self.admission.refresh()
            # The leader reads the records afresh (one DHT get a second, one peer per round): the tracker's last
            # fetch can be 5 s old, as long as the wait, and a leader that has not seen a lower id join would
            # assemble its group apart from the lower id's. Everyone else follows the leader and the cache.
            if leader == me:
                now_read = clock.records(round_no, min(1.0, float(self.cfg.network.request_timeout)), quiet=True)
                self.dht_reads += 1
            else:
                now_read = clock.cached()
            fresh = roster(now_read, round_no, me, get_dht_time(), budget, f.local_steps,
                           self.no_shows.skip(records), by_speed, clock.silent())
            change = fold(chosen, fresh)
            if change.new:
                appeared = time.monotonic()
                log.info("round %d: also waiting for %s (its record appeared meanwhile)", round_no,
                         " ".join(m[-6:] for m in change.new))
            if change.gone:
                log.info("round %d: %s went silent (stopped or dead); not waited for", round_no,
                         " ".join(m[-6:] for m in change.gone))
            if change.ahead:
                log.info("round %d: %s moved past this round (caught up); not waited for", round_no,
                         " ".join(m[-6:] for m in change.ahead))
            if joined:  # takes whoever comes within its wait
                want += len(change.new) - len(change.gone) - len(change.ahead)
            elif change:
                want = group_size()
            # The leader is the lowest id of the roster's members at the round as they come, arrive from one round
            # behind, or go silent: a peer whose first read missed records (a replica without them) named another
            # leader than the rest, and its group started apart. Members not yet in a group ask the new leader; one
            # that had begun leading assembles nothing (matchmaking.py) and sends its followers along once the new
            # leader takes it.
            if leader_left(change, leader):
                left_behind = True  # give_up ends the wait: we catch up, as any peer that missed the round
                log.info("round %d: its leader %s moved past it: the round averaged without this peer", round_no,
                         leader[-6:])
            elif change:
                leader = round_leader(chosen)
            # Joiners come in bursts (processes booting together): a group started the moment the members it knew
            # of had joined left out the 8th of 8, whose record appeared 0.3 s later. Not within SETTLE_S of a new
            # record, then; the round's wait still bounds it.
            if time.monotonic() - appeared < SETTLE_S:
                return max(want, len(chosen.waited)) + 1, leader
            return want, leader
        wait = budget + chosen.eta
        if alone:
            wait = max(wait, f.round_deadline - f.allreduce_timeout)
        result = self.averager.average(deltas, round_no, weight, stop=stop, fingerprint=fingerprint,
                                       live_target=live_target, plan=plan, give_up=give_up, replan=replan,
                                       wait=wait, leader=leader,
                                       follow=follow if clock is not None and plan is None else None)
        if not result.solo:  # a peer that missed the group cannot tell who else did not come
            missing = self.no_shows.note(chosen.waited, result.peers, records)
            if missing:
                log.info("round %d: %s did not come; not waited for again until their records move", round_no,
                         " ".join(m[-6:] for m in missing))
        if stop is None or not stop.is_set():  # a stopping peer asks p2pd nothing more
            self._probe_connection()
        return result

    def _probe_connection(self) -> None:
        """Refresh ``connection`` from p2pd's open connections, off the round's path: asked inline, it delayed
        each landing by up to 2 s (32 peers on 2 cores: median 1.1 s between the averager's end and the round's
        record). One probe at a time; shutdown waits for it (at most 2 s) before stopping the DHT."""
        if self._probe is not None and self._probe.is_alive():
            return
        client, timeout = bool(self.cfg.network.client_mode), min(2.0, float(self.cfg.network.request_timeout))

        def probe() -> None:
            self.connection = connection_kind(self.dht, client, timeout=timeout)
        self._probe = threading.Thread(target=probe, name="connection-probe", daemon=True)
        self._probe.start()

    def load_state(self, timeout: float, progress: bool, only: list[str] | None = None, exclude: list[str] = ()):
        if self.admission is not None:
            self.admission.refresh()
        return self.averager.load_state(timeout=timeout, progress=progress, only=only, exclude=exclude)

    def publish_now(self) -> None:
        if self.publisher is not None:
            self.publisher.publish_now()

    def dht_hot_keys(self, rounds: int) -> dict[str, list[int]]:
        """The DHT keys this peer's node served the most bytes of, named where this peer knows the name (its run's
        clock, heartbeats, state sharing, and the group keys of the first ``rounds`` rounds); {} if the DHT
        process does not answer within a second."""
        run = self.cfg.federation.run_id
        names = [f"{run}_clock_steps_progress", heartbeat_key(run), f"{run}_pseudograd.all_averagers", RUNS_KEY,
                 *(f"{run}_pseudograd.0b{group_bits(r)}" for r in range(max(0, rounds) + 1))]
        try:
            by_key = self.dht.run_coroutine(dht_stats.served_by_key, return_future=True).result(timeout=1.0)
        except Exception as e:
            log.debug("could not read what the DHT node served by key: %r", e)
            return {}
        named = dht_stats.label(by_key, names)
        return {n.replace(f"{run}_", "").replace("pseudograd.0b", "group ") if n.startswith(run) else n: v
                for n, v in named.items()}

    def shutdown(self) -> None:
        """Leave in reverse order of joining: heartbeats ("left"), clock, averager, then the DHT (and p2pd)."""
        for name in ("publisher", "clock", "averager"):
            part = getattr(self, name, None)
            if part is None:
                continue
            try:
                part.stop() if name == "publisher" else part.shutdown()
            except Exception as e:  # shutting down must never mask the real exit reason
                log.warning("error while shutting down the %s: %s", name, e)
            setattr(self, name, None)
        if self._probe is not None:
            self._probe.join(timeout=5.0)  # its p2pd call has a 2 s deadline
        try:
            stop_dht(self.dht)
        except Exception as e:
            log.warning("error while shutting down the DHT: %s", e)


def check_state(meta: dict, tensors: list[torch.Tensor], peers: list[dict], want: str = "",
                trusted: str = "") -> str:
    """Why a downloaded state must be refused ("" if it is acceptable).

    Refused: non-finite values; a fingerprint that does not match the bytes; a fingerprint other than ``want``
    (a split's majority, when adopting it), or else one that the live peers other than its server do not vouch
    for (protocol.state_verdict; ``trusted``: the peer this one joined from).
    """
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return "it holds non-finite values"
    claimed = str(meta.get("fingerprint", ""))
    actual = fingerprint(tensors)
    if claimed and claimed != actual:
        return "its fingerprint does not match its bytes"
    if want:
        return "" if actual == want else f"its fingerprint {actual[:8]} is not the model wanted, {want[:8]}"
    return state_verdict(actual, meta.get("round"), str(meta.get("served_by") or ""), peers, trusted)
