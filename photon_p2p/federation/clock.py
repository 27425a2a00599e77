"""The swarm clock: every peer's round record in the DHT (hivemind's ProgressTracker, rounds as its epochs),
read as the round's members and each silo's share of the round's steps."""

from __future__ import annotations

import logging
from typing import Callable

from hivemind.utils import get_dht_time

from photon_p2p.federation.hivemind_ext.progress_tracker import (KEEPALIVE_S, RoundTracker, admitted_progress,
                                                                   progress_records)
from photon_p2p.federation.protocol import SILENT_S, ClockRecord, speed_quota

log = logging.getLogger("photon_p2p.federation")


FETCH_S = 2.0  # the shortest time between two reads of every clock record by the tracker (one DHT get each)


def _clock_records(raw: dict) -> dict[str, ClockRecord]:
    """hivemind's progress records (LocalTrainingProgress by peer) as the protocol's ClockRecords."""
    return {p: ClockRecord(int(r.epoch), float(r.samples_accumulated), float(r.samples_per_second), float(r.time),
                        bool(r.client_mode)) for p, r in raw.items()}


class SwarmClock:
    """Each round's members and each silo's share of it: hivemind's ProgressTracker, rounds as its epochs.

    Every peer reports the inner steps it has taken this round (its record also carries its speed, steps per
    second); ``quota`` gives a silo H steps when it is about as fast as the others and proportionally more or
    fewer when it is not (speed_quota), so a fast silo takes more inner steps than a slow one and both reach
    matchmaking together. The records are also the round's member list (``records``).
    """

    def __init__(self, dht, run_id: str, steps_per_peer: int, *, client_mode: bool, private_key,
                 expiration: float, admits: Callable[[str], bool] | None = None) -> None:
        self.steps_per_peer, self.admits = int(steps_per_peer), admits
        self.unadmitted: set[str] = set()  # peers with records whose token we had not read at the last filter
        self._reported = -1  # the round of the last progress report
        # the key names the unit: peers of versions that counted tokens here must not mix with these
        self.tracker = RoundTracker(dht, f"{run_id}_clock_steps", self.steps_per_peer, client_mode=client_mode,
                                       private_key=private_key, metadata_expiration=expiration,
                                       min_refresh_period=FETCH_S, max_refresh_period=5.0,
                                       default_refresh_period=FETCH_S, start=False)
        self.tracker.admits = admits  # a closed swarm: only admitted peers' records count
        self.tracker.start()

    def report(self, round_no: int, steps: int, busy_s: float) -> None:
        """``steps`` inner steps this round, ``busy_s`` the seconds spent computing them (not waiting). Stored by
        the tracker's keepalive every KEEPALIVE_S (a round's first report at once): every store is a signed DHT
        store that every replica verifies, and one per inner step cost ~15% of a core per idle peer; readers
        project steps from the speed."""
        if steps > 0 and busy_s > 0:
            self.tracker.measured_speed = steps / busy_s
        if round_no == self._reported:
            self.tracker.note_progress(round_no, int(steps))
            return
        self._reported = round_no
        self.tracker.report_local_progress(round_no, int(steps))

    def quota(self, round_no: int, local_steps: int, late: bool = False) -> int:
        """This silo's steps for ``round_no`` from the speeds in the tracker's last fetch: its own (steps over
        compute seconds, as of its last report) against the live peers' at this round or one behind."""
        # the tracker's own pacing (how often it fetches) follows its target: the swarm's steps for a round
        self.tracker.target_batch_size = self.steps_per_peer * max(1, self.tracker.global_progress.num_peers)
        me = str(self.tracker.dht.peer_id)
        others = [float(r.samples_per_second) for p, r in self.tracker.records.items()
                  if p != me and r.epoch >= round_no - 1]
        quota = speed_quota(local_steps, self.tracker.measured_speed, others)
        if late:
            quota = self._rest_of_round(round_no, local_steps, quota)
        # A joiner's share of the round is the rest of it, which no reader can project from its speed (one that
        # projected a joiner's whole quota called it late and named another leader than the others did): its
        # record shows no speed this round, and it is simply waited for.
        self.tracker.hide_speed = late
        return quota

    def _rest_of_round(self, round_no: int, local_steps: int, quota: int) -> int:
        """The share of ``quota`` left of a round the others are already into: as far as its most advanced member
        is. (Joined mid-round with a download: a joiner that trained a whole quota arrived after the others had
        averaged, downloaded again, and chased the swarm round after round. Measured from the median member,
        joiners that started together saw each other just begun and took 15 of 16 steps while the first silo
        already waited at the round's end: they missed round 0.)"""
        now, me = get_dht_time(), str(self.tracker.dht.peer_id)
        done = [min(float(local_steps), r.samples_accumulated + max(0.0, now - r.time) * r.samples_per_second)
                for p, r in self.tracker.records.items() if p != me and r.epoch == round_no]
        if not done:
            return quota
        return max(1, round(quota * (1 - max(done) / local_steps)))

    def begin(self, round_no: int, timeout: float) -> None:
        if not self.tracker.begin_epoch(round_no, timeout):
            log.warning("the round clock did not move to round %d within %gs (the DHT is not answering)",
                        round_no, timeout)

    @property
    def peers(self) -> int:
        return int(self.tracker.global_progress.num_peers)

    @property
    def swarm_round(self) -> int:
        """The newest round any (non-client) peer reports, as of the tracker's last fetch."""
        return int(self.tracker.global_progress.epoch)

    def records(self, round_no: int, timeout: float, quiet: bool = False) -> dict[str, ClockRecord]:
        """Every clock record, read fresh from the DHT as ``round_no`` ends, merged with the tracker's last
        periodic fetch (seconds old at most; the newer record of each peer wins). One read can miss records: the
        replica that answered had not yet got them (8 peers: four read a roster without the peer that had waited
        longest, and started a group of their own the moment it was complete)."""
        raw = dict(self.tracker.records)
        future = self.tracker.dht.get(self.tracker.training_progress_key, latest=True, return_future=True)
        try:
            found = future.result(timeout=timeout)
            fresh = progress_records(admitted_progress(found.value if found is not None else None, self.admits))
            raw.update({p: r for p, r in fresh.items() if p not in raw or r.time >= raw[p].time})
        except Exception as e:
            log.info("round %d: no fresh read of the clock's records (%r); using the last fetch", round_no, e)
            future.cancel()
        raw = self._admitted(raw)
        self.tracker.observe(raw)
        records = _clock_records(raw)
        if not quiet:
            log.info("round %d: clock records %s", round_no, {p[-6:]: r.round for p, r in records.items()})
        return records

    def cached(self) -> dict[str, ClockRecord]:
        """Every clock record as of the tracker's last periodic fetch (seconds old at most; no DHT read)."""
        return _clock_records(self._admitted(dict(self.tracker.records)))

    def _admitted(self, raw: dict) -> dict:
        """In a closed swarm, the records of peers admitted as of now: the tracker's fetch may predate our view of
        a peer's token or its revocation. An outsider in the roster could be named the round's leader, which
        every member's gate refuses (seen in a CI run: the admitted pair never met)."""
        if self.admits is None:
            return raw
        kept = {p: r for p, r in raw.items() if self.admits(p)}
        self.unadmitted = set(raw) - set(kept)
        return kept

    def silent(self) -> set[str]:
        """Peers whose clock record stopped moving SILENT_S ago (longer in a swarm whose keepalive is longer: past
        16 peers, fetch_period): stopped or dead, not waited for (protocol)."""
        return self.tracker.silent(SILENT_S * self.tracker.keepalive_s / KEEPALIVE_S)

    def left(self, round_no: int, waiting: tuple[str, ...]) -> bool:
        """Whether the peers in ``waiting`` have all moved past ``round_no`` (as of the tracker's last fetch):
        nobody is left to average this round with. Without names: whether the swarm as a whole has."""
        if not waiting:
            return self.swarm_round > round_no
        epochs = self.tracker.members
        return all(epochs.get(p, -1) > round_no for p in waiting)

    def shutdown(self) -> None:
        self.tracker.shutdown(timeout=2.0)  # its final store does not block
