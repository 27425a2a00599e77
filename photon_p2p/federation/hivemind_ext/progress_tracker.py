"""Who is at which round, from hivemind's training-progress records: mirrors hivemind/optim/progress_tracker.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from hivemind import DHT
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from photon_p2p.federation.records import is_live, peer_id_of_owner, read_records


KEEPALIVE_S = 3.0  # seconds between two stores of this peer's record while it does not report (waits, evaluates)
# The clock's records are one DHT key with a subkey per peer, and every hivemind get or store of it visits up to
# 20 nodes (its beam), each of which answers with the whole dictionary: one keepalive store at 16 peers moved
# 216 kB (17 x the value), a get 212 kB, with hivemind's local copies (71 / 67 kB without: bench/dht_cost.py).
# n peers storing and reading n records of ~700 bytes (a signed record and its owner's key) every period thus
# move O(n²) bytes a period. Every 3 s / 2 s that was 730 kB a round served per DHT
# node at 8 peers, 3.4 MB at 16, 31 MB at 32, where the DHT processes and p2pd took more than this machine's 2
# cores (BENCHMARKS.md, "Scale"). Both periods grow with n² past 16 peers; the reads a round needs (its roster,
# the leader's re-reads) are direct, and a record is silent after SILENT_S times the keepalive's growth.
CLOCK_RECORD_BYTES = 700
CLOCK_READ_BUDGET = 100e3  # bytes a second, the whole swarm's periodic clock reads together
MAX_FETCH_S = 120.0


def fetch_period(n: int, shortest: float) -> float:
    """Seconds between two periodic reads (or keepalive stores) of the clock's records with ``n`` of them:
    ``shortest`` for a small swarm, growing with n² from about 17 peers, at most MAX_FETCH_S."""
    return min(MAX_FETCH_S, max(shortest, n * n * CLOCK_RECORD_BYTES / CLOCK_READ_BUDGET))


def progress_records(metadata: Any) -> dict[str, LocalTrainingProgress]:
    """{peer id: its record} from the clock's DHT value (ProgressTracker's records; the epoch is our round)."""
    records: dict[str, LocalTrainingProgress] = {}
    if isinstance(metadata, dict):
        for entry in metadata.values():
            try:
                record = LocalTrainingProgress.parse_obj(entry.value)
                records[PeerID(record.peer_id).to_base58()] = record
            except Exception:  # a malformed or foreign entry is simply no member
                continue
    return records


def progress_members(metadata: Any) -> dict[str, int]:
    """{peer id: round} from the clock's DHT value."""
    return {peer: int(r.epoch) for peer, r in progress_records(metadata).items()}


def admitted_progress(metadata: Any, admits: Callable[[str], bool] | None) -> Any:
    """The clock's DHT entries of admitted peers only (each signed by the peer it names); ``admits=None``: all."""
    if admits is None or not isinstance(metadata, dict):
        return metadata
    kept = {}
    for subkey, entry in metadata.items():
        try:
            peer = PeerID(LocalTrainingProgress.parse_obj(entry.value).peer_id).to_base58()
        except Exception:
            continue
        if peer == peer_id_of_owner(subkey) and admits(peer):
            kept[subkey] = entry
    return kept


class RoundTracker(ProgressTracker):
    """hivemind's ProgressTracker that also remembers which peers reported which epoch (= round) and speed at its
    last fetch, and publishes the speed the daemon measured (``measured_speed``, steps per second of compute).

    hivemind's own speed is an EMA of wall time between reports; with federation.overlap several steps are
    reported at once when an average lands, which it reads as steps of ~0 s, and the speed then grows every
    round. In a closed swarm (``admits`` set) only admitted peers' records count.
    """

    members: dict[str, int] = {}
    records: dict[str, LocalTrainingProgress] = {}  # each peer's record (its round, steps, speed) at last fetch
    measured_speed: float = 0.0
    admits: Callable[[str], bool] | None = None
    heard: dict[str, tuple[float, float]] = {}  # peer: (its record's time, our monotonic time when it last moved)
    fresh: float = 0.0  # our monotonic time of the last read in which any record moved
    unadmitted: set[str] = set()  # peers whose records the last fetch dropped (no token in our view yet, or none)
    hide_speed: bool = False  # this round's quota is not what others would project from our speed (a joiner's)
    keepalive_s: float = KEEPALIVE_S  # grows with the swarm (fetch_period): readers scale SILENT_S alike

    def _get_local_progress(self, local_epoch: int, samples_accumulated: int) -> LocalTrainingProgress:
        progress = super()._get_local_progress(local_epoch, samples_accumulated)
        if self.measured_speed > 0:
            progress.samples_per_second = self.measured_speed
        if self.hide_speed:
            progress.samples_per_second = 0.0  # readers cannot project us: they simply wait for us (the budget)
        return progress

    # hivemind stores ``local_progress`` as last reported, stamped with the report's time. Ours is stamped when
    # stored, and kept current by note_progress between stores: its ``time`` then says the process is alive (it
    # is stored every KEEPALIVE_S), and readers project steps from it as before.
    @property
    def local_progress(self) -> LocalTrainingProgress:
        return self._local_progress.copy(update={"time": get_dht_time()})

    @local_progress.setter
    def local_progress(self, progress: LocalTrainingProgress) -> None:
        self._local_progress = progress

    def note_progress(self, epoch: int, steps: int) -> None:
        """The steps taken so far, stored with the next store (a report or the keepalive), not now."""
        self._local_progress = self._get_local_progress(epoch, steps)

    async def _keepalive(self) -> None:
        """Store the record every KEEPALIVE_S even while the daemon reports nothing (hivemind refreshes it only
        every metadata_expiration / 2): its ``time`` is how readers tell a waiting peer from a stopped one."""
        loop = asyncio.get_event_loop()
        while not self.shutdown_triggered.is_set():
            await loop.run_in_executor(None, self.shutdown_triggered.wait, self.keepalive_s)
            self.should_report_progress.set()

    def run(self) -> None:
        # hivemind's run() leaves its thread's loop open; collected at interpreter exit after its self-pipe
        # socket, it prints an "Exception ignored" traceback. Same body, plus the close.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(asyncio.gather(self._progress_reporter(), self._progress_fetcher(),
                                                   self._keepalive()))
        finally:
            self.shutdown_complete.set()
            # the reporter cancels its last store without awaiting it: finish that before closing, or Python
            # prints "Task was destroyed but it is pending!" at exit
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def observe(self, records: dict[str, LocalTrainingProgress]) -> None:
        """Note which records moved since the last read (their store time changed), and when any last did."""
        now, heard = time.monotonic(), dict(self.heard)
        for peer, record in records.items():
            if heard.get(peer, (None, 0.0))[0] != record.time:
                heard[peer] = (record.time, now)
                self.fresh = now
        self.heard = {p: h for p, h in heard.items() if p in records}

    def silent(self, limit: float) -> set[str]:
        """Peers whose record had not moved for ``limit`` s when others' last did: their process stopped storing
        it (stopped or dead). Measured against the last read that saw any record move, on our own clock: if
        our reads stall (an overloaded DHT), nobody looks silent; silo clocks may disagree by seconds."""
        return {p for p, (_, moved) in self.heard.items() if self.fresh - moved > limit}

    def _parse_swarm_progress_data(self, metadata):
        everyone = progress_records(metadata)
        metadata = admitted_progress(metadata, self.admits)
        records = progress_records(metadata)
        self.unadmitted = set(everyone) - set(records)
        self.observe(records)
        self.records = records
        self.members = {peer: int(r.epoch) for peer, r in records.items()}
        progress = super()._parse_swarm_progress_data(metadata)
        n = len(everyone)
        progress.next_fetch_time = get_dht_time() + fetch_period(n, self.min_refresh_period)
        # stored well within its expiration, or the record would lapse between two stores
        self.keepalive_s = min(fetch_period(n, KEEPALIVE_S), max(KEEPALIVE_S, self.metadata_expiration / 3))
        return progress

    def begin_epoch(self, epoch: int, timeout: float) -> bool:
        """``pause_updates`` + ``update_epoch`` with a deadline. hivemind's fetcher holds the progress lock across
        a DHT read that has none; if the DHT process is gone (a group-wide kill) that read never returns and
        ``pause_updates`` would wait forever. False: not moved (the lock stayed taken for ``timeout`` s)."""
        if not self.lock_global_progress.acquire(timeout=timeout):
            return False
        try:
            with self.performance_ema.pause():
                self.update_epoch(epoch)
            return True
        finally:
            self.lock_global_progress.release()


def live_group_target(dht: DHT, run_id: str, me: str, target: int, min_size: int, timeout: float) -> int:
    """``target``, capped at the number of live peers in the run's heartbeats (this one included) when they show
    at least ``min_size``. Peers at other rounds count too: an overestimate only means waiting as before."""
    try:
        rows = read_records(dht, run_id, timeout)
    except Exception:  # no evidence: keep the configured target
        return target
    live = {r["peer_id"] for r in rows if is_live(r)}
    live.add(me)
    return min(target, len(live)) if len(live) >= max(2, min_size) else target
