"""How a peer gets back onto the swarm's one model: joining, catching up, adopting a split's majority (G2) and
settling at the end of a finite run (G5). A part of PeerDaemon (daemon.py), kept apart from its round loop."""

from __future__ import annotations

import threading
import time
from typing import Any

from photon_p2p.config import Config
from photon_p2p.federation import FederationError
from photon_p2p.federation.averaging import RoundResult
from photon_p2p.federation.protocol import catch_up_round, split_winner
from photon_p2p.federation.swarm import Swarm, check_state
from photon_p2p.global_state import GlobalState
from photon_p2p.ledger import InFlight, RoundLedger


class Rejoin:
    """PeerDaemon's ways back onto the swarm's model; every one downloads through ``_sync_from_swarm``, which
    refuses states older than ours, from another run, or that contradict the live heartbeats (check_state)."""

    cfg: Config
    swarm: Swarm
    state: GlobalState
    ledger: RoundLedger
    metrics: Any
    trainer: Any
    stop: threading.Event
    progress: bool
    resumed: bool

    @property
    def round(self) -> int:
        return self.state.round

    def fingerprint(self) -> str:
        return self.state.fingerprint()

    def _catch_up(self, others: list[dict], who: str = "this peer") -> bool:
        """Adopt the swarm's state, keeping local progress, if live peers (``others``' heartbeats) are past this
        peer's round. After a grouped round too: a group can be a pocket of peers that fell behind together
        (slowed down at once, they kept averaging with each other while the swarm moved on)."""
        newest = catch_up_round(others, self.ledger.joined_from)
        return newest > self.round and self._sync_from_swarm(f"swarm is at round {newest}, {who} at {self.round}",
                                                             carry_local=True)

    def _missed_round(self, result: RoundResult, job: InFlight) -> bool:
        """No group this round. Alone in the swarm: apply our own Δ. Otherwise keep the local work and fold it into
        the next round: adopt the swarm's newer state if it averaged without us (carrying our progress over),
        else move to the next round on the same global weights, like every other peer that missed this one.
        True: alone (solo)."""
        others = self.swarm.peers()
        if not others:
            self.state.apply(job.deltas, carry_from=job.base)  # a solo result leaves Δ untouched
            return True
        self.ledger.round_tokens += job.weight  # the folded work's weight
        if self._catch_up(others):
            return False
        self.state.skip_round()
        print(f"photon-peer: round {self.round - 1} missed ({result.reason}); its local work is folded into "
              f"round {self.round}", flush=True)
        return False

    def _adopt_majority(self, others: list[dict], **note: Any) -> bool:
        """G2: if live peers at this peer's round hold another model and ours is not the majority's (ties to the
        smallest fingerprint, protocol.split_winner), adopt the majority's, keeping local progress. Every peer
        evaluates the same rule, so a split does not outlive the next round whatever groups form. ``note``: extra
        fields of the "split" record (why this split was looked for)."""
        want = split_winner(self.fingerprint(), self.round, others)
        if not want:
            return False
        holders = [str(p["peer_id"]) for p in others if p.get("round") == self.round and p.get("fingerprint") == want]
        self.metrics.log("split", round=self.round, mine=self.fingerprint(), majority=want, holders=holders, **note)
        return self._sync_from_swarm(f"a split at round {self.round}: the majority holds model {want[:8]}, this "
                                     f"peer {self.fingerprint()[:8]}", carry_local=True, want=want, only=holders)

    def _mend_partial(self, result: RoundResult) -> bool:
        """G1 after a partial round: a member whose stream from one reducer broke kept its own values there while
        the rest of its group got that reducer's average, so it alone may hold another model. Publish ours, wait
        (up to allreduce_timeout) until the group's other live members have landed the round, and if ours is not
        their majority's (protocol.split_winner), adopt it now, keeping local progress, so that the round's
        record already holds one model. When the reducer itself failed every member kept the same values: no
        download. True if this peer adopted another member's model."""
        members = set(result.fingerprints or result.peers) - {self.swarm.peer_id}
        if not members:
            return False
        self.swarm.publish_now()  # every member of an all-partial group waits for the others' heartbeats
        deadline = time.monotonic() + self.cfg.federation.allreduce_timeout
        while True:
            rows = [p for p in self.swarm.peers() if str(p.get("peer_id")) in members]
            landed = [p for p in rows if int(p.get("round", -1)) >= self.round]
            if len(landed) == len(rows) or time.monotonic() >= deadline or self.stop.is_set():
                break
            self.stop.wait(0.5)
        return self._adopt_majority(landed, partial=result.partial)  # the split rule, over its group alone

    def _settle(self) -> None:
        """G5: the run is over at the swarm's round R. Before leaving, serve peers still finishing their last
        round (a peer that missed it downloads from us) and adopt the majority's model if the last round split;
        up to round_deadline."""
        f = self.cfg.federation
        deadline = time.monotonic() + f.round_deadline
        said = False
        while time.monotonic() < deadline and not self.stop.is_set():
            others = self.swarm.peers()
            self._adopt_majority(others)
            behind = [p for p in others if int(p.get("round", -1)) < self.round]
            split = {p.get("fingerprint") for p in others if p.get("round") == self.round} - {self.fingerprint()}
            if not behind and not split:
                return
            if not said:
                print(f"photon-peer: round {self.round} reached; serving the swarm's state until "
                      f"{len(behind)} peer(s) behind and {len(split)} other model(s) settle", flush=True)
                said = True
                self.swarm.publish_now()
            time.sleep(0.5)

    def _sync_from_swarm(self, reason: str, carry_local: bool = False, want: str = "",
                         only: list[str] | None = None) -> bool:
        """Download and adopt the swarm's global state (refusing bad ones); ``carry_local`` keeps this silo's
        un-averaged progress on top of it (θ_local ← θ_new − Δ_own), to be averaged next round. ``want``: the
        fingerprint to adopt (a split's majority), from the peers in ``only``."""
        timeout = self.cfg.federation.state_sync_timeout
        print(f"photon-peer: downloading the swarm's state ({reason}), up to {timeout:.0f}s", flush=True)
        deadline, tried = time.monotonic() + timeout, []
        while len(tried) < 3:  # peers are tried by round, ties at random; one whose state was refused is not again
            remaining = deadline - time.monotonic()
            if remaining <= 1 or self.stop.is_set():
                return False
            got = self.swarm.load_state(timeout=remaining, progress=self.progress, only=only, exclude=tried)
            if got is None:
                if reason != "joining" or not self.swarm.peers():
                    return False  # nobody to ask (a fresh swarm behind a bootstrap node): no reason to wait
                # Nobody answered in time: a joiner asks live peers again until its deadline. In a boot storm (15
                # joiners starting at once on 2 cores) one pass timed out for 5 of 15, which began from scratch.
                self.stop.wait(1.0)
                continue
            meta, tensors = got
            tried.append(str(meta.get("served_by") or "") if isinstance(meta, dict) else "")
            why = self.state.mismatch(meta, tensors)  # before reading anything from it: it came from the network
            if why:
                print(f"photon-peer: refused the swarm state: {why}", flush=True)
                self.metrics.log("refused_state", round=-1, reason=why)
                continue
            served = meta["round"]
            if served < self.round:
                return False  # never go back to an older state than our own
            if want and served == self.round and meta.get("fingerprint") != want:
                continue  # not the model the split's majority holds: try another holder
            if not want and carry_local and served == self.round:
                continue  # a lagging server's copy of the weights we hold: no catch-up, try another peer
            why = check_state(meta, tensors, self.swarm.peers(), want=want if served == self.round else "",
                              trusted=self.ledger.joined_from)
            if why:
                print(f"photon-peer: refused the swarm state for round {meta.get('round')}: {why}", flush=True)
                self.metrics.log("refused_state", round=served, reason=why)
                continue
            self.state.adopt(meta, tensors, carry_local)
            self.ledger.synced_mid_round = True
            self.ledger.one_model_group = frozenset()  # our model is the server's now: look for splits again
            self.ledger.synced_from = str(meta.get("served_by") or "")
            if not carry_local:
                self.ledger.round_steps = self.ledger.round_tokens = 0
            # The schedule follows the swarm: a joiner does not re-run warmup at the peak learning rate.
            self.trainer.step = max(self.trainer.step, meta.get("inner_step", 0))
            self.metrics.log("sync", round=self.round, reason=reason, fingerprint=self.fingerprint())
            print(f"photon-peer: synced with the swarm at round {self.round} (model {self.fingerprint()[:8]})",
                  flush=True)
            return True
        return False

    def _join(self) -> None:
        net, f = self.cfg.network, self.cfg.federation
        if not net.initial_peers:
            return
        self.swarm.check_run()
        # Joining until it takes part in a round, download or not: a first round that closed before it came (a
        # boot storm of 16 processes, a download that timed out) is part of joining, not a missed round.
        self.ledger.joining = True
        if self._sync_from_swarm("joining"):
            self.ledger.joined_from = self.ledger.synced_from  # trusted on first use (protocol.state_verdict)
            return
        if f.helper and self.swarm.peers():
            # A helper on a model of its own would average the others' updates onto it and serve it to joiners.
            raise FederationError("an averaging helper starts from the swarm's state, and no live peer served it "
                                  f"within {f.state_sync_timeout:.0f}s (client-mode volunteers serve none): start "
                                  "the helper first, or while a reachable silo is live")
        if self.resumed:
            print("photon-peer: no peer served state in time; resuming from the local checkpoint", flush=True)
        elif not f.allow_solo_start:
            raise FederationError(f"could not download the swarm's state within {f.state_sync_timeout:.0f}s "
                                  "and federation.allow_solo_start is false")
        else:
            print("photon-peer: no peer served state in time; starting from scratch", flush=True)
