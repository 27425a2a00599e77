"""hivemind's DecentralizedAverager as photon_p2p runs it in its own process: mirrors hivemind/averaging/averager.py."""

# Where one round's time goes (see bench/allreduce_speed.py) is measured here: the forked averager process stamps
# when it receives a step, when its group is assembled and when the all-reduce has written its result back, into
# shared memory that the calling process reads after the round.

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import math
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import hivemind.averaging.averager as _hivemind_averager
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.compression import NoCompression, deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils import MPFuture, ValueWithExpiration
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip
from hivemind.utils.streaming import combine_from_streaming

from photon_p2p.federation.admission import AdmissionView, read_view_async
from photon_p2p.federation.bulk import GATHER_KEY as BULK_KEY
from photon_p2p.federation.bulk import BulkGroups, allreduce_mean, robust_mean
from photon_p2p.federation.compression import ByteCounter, CountingCompression
from photon_p2p.federation.hivemind_ext.allreduce import ExactAllReduceRunner
from photon_p2p.federation.hivemind_ext.matchmaking import AdmittedMatchmaking
from photon_p2p.federation.hivemind_ext.partition import _rank
from photon_p2p.federation.hivemind_ext.serialization import count_registry_traffic
from photon_p2p.federation.hivemind_ext.utils import warm_up_codec
from photon_p2p.federation.protocol import heals
from photon_p2p.federation.robust import ClaimBudget, ReducerCheck, RobustSettings, cap_claims, reduce_part
from photon_p2p.federation.util import describe

log = logging.getLogger("photon_p2p.federation")
MISS_REFRESH_S = 1.0  # an unknown peer makes the gate re-read the admitted set, at most this often
REPORT_KEY = "__photon_report__"  # the averager process's report rides back with the gathered metadata
StateProvider = Callable[[], tuple[dict, list[torch.Tensor]]]


@dataclass(frozen=True)
class AveragerTuning:
    """Throughput settings of the averager; every peer of a run must use the same part size (it sets the layout)."""

    # Parts of the flattened Δ (bytes after compression) that travel as one message. Each part costs ~1 ms of
    # averager CPU besides its bytes (100 MB, 2 peers: ~0.55 CPU-s per round at hivemind's 512 KiB, ~0.4 at 2 MiB);
    # 2 MiB still crosses a 20 Mbit/s link in < 1 s, far inside next_chunk_timeout (network.request_timeout).
    part_size_bytes: int = 2 * 2**20
    # The averager process reduces one part at a time in executor threads; intra-op threads only add OpenMP
    # spinning that competes with training and with the other processes (p2pd, DHT) for the cores.
    averager_threads: int | None = 1
    # Check the result with one reduction (a sum is finite iff every value is, barring overflow, which falls back
    # to the exact check) and probe parts before comparing them in full, instead of a full pass per part.
    fast_checks: bool = True
    # Start a round as soon as every live peer of the run (fresh heartbeat records) has joined, instead of waiting
    # out matchmaking_time for a target_group_size that the swarm cannot reach.
    cap_group_to_live_peers: bool = True


TUNED = AveragerTuning()
HIVEMIND_DEFAULTS = AveragerTuning(part_size_bytes=2**19, averager_threads=None, fast_checks=False,
                                   cap_group_to_live_peers=False)  # the averager before tuning, for A/B benchmarks


class PhaseClock:
    """Wall-clock stamps (time.time) that the averager process writes and the caller reads; shared memory."""

    NAMES = ("step_received", "group_assembled", "allreduce_done", "bulk_started", "bulk_failed")

    def __init__(self) -> None:
        self._stamps = mp.Array(ctypes.c_double, len(self.NAMES), lock=False)

    def stamp(self, name: str) -> None:
        self._stamps[self.NAMES.index(name)] = time.time()

    def reset(self) -> None:
        for i in range(len(self.NAMES)):
            self._stamps[i] = 0.0

    def read(self) -> dict[str, float]:
        return {name: float(self._stamps[i]) for i, name in enumerate(self.NAMES)}


class AdmissionGate:
    """The closed swarm's admitted set inside the averager process (its own DHT reads, its own event loop).

    Re-read at the start of every step (so a revocation is in force by the next round's matchmaking) and when an
    unknown peer knocks (a newly admitted joiner), at most every MISS_REFRESH_S.
    """

    def __init__(self, dht: DHT, owner_public: bytes, timeout: float, run_id: str | None = None) -> None:
        self.dht, self.view, self.timeout = dht, AdmissionView(owner_public, run_id), timeout
        self._lock: asyncio.Lock | None = None

    async def refresh(self) -> None:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            await read_view_async(self.dht, self.view, self.timeout)

    async def allows(self, peer: Any) -> bool:
        peer = str(peer)  # PeerID prints as base58
        if self.view.allows(peer):
            return True
        if time.monotonic() - self.view.refreshed_at >= MISS_REFRESH_S:
            await self.refresh()
        allowed = self.view.allows(peer)
        if not allowed:
            log.info("refused peer %s: not admitted to this closed swarm", peer)
        return allowed


STATE_BYTES_FACTOR = 4  # a state download may be this many times the averaged tensors' bytes (plus 1 MiB)


class ProcessAverager(DecentralizedAverager):
    """hivemind's averager with our state for joiners, byte counting and phase stamps in its own process."""

    def __init__(self, *args, state_provider: StateProvider, counter: ByteCounter, clock: PhaseClock,
                 threads: int | None, global_tensors: Sequence[torch.Tensor] | None = None,
                 robust: RobustSettings = RobustSettings(mode="none"), owner_public: bytes | None = None,
                 run_id: str | None = None,
                 bulk_timeout: float = 0.0, **kwargs) -> None:
        self._state_provider, self._counter, self._clock, self._threads = state_provider, counter, clock, threads
        self._robust = robust
        # A closed swarm's owner key; the gate itself is built in the averager process (it needs that event loop).
        self._owner_public, self._run_id, self._gate = owner_public, run_id, None
        self._bulk_timeout = bulk_timeout  # > 0: uncompressed groups whose members all have a bulk endpoint use it
        self._bulk_endpoints: list[str] | None = None
        self._bulk_groups: BulkGroups | None = None
        # The caller's global weights in shared memory (read here only in a healing round, under the tensor lock).
        self._global_tensors = list(global_tensors) if global_tensors is not None else None
        self._report: dict[str, Any] = {}
        super().__init__(*args, **kwargs)
        # A state (weights and outer optimizer buffers) is a few times the averaged tensors; a server that streams
        # more is refused mid-download instead of filling this peer's memory (checked whole after it arrived).
        self._max_state_bytes = STATE_BYTES_FACTOR * sum(t.numel() * t.element_size() for t in args[0]) + 2 ** 20

    def get_current_state(self):
        # hivemind's documented hook; runs in a background thread of *our* process when a joiner asks.
        metadata, tensors = self._state_provider()
        return metadata, [t.detach().cpu() for t in tensors], None

    def run(self) -> None:
        count_registry_traffic(self._counter)  # first thing in the forked process, before any traffic
        if self._threads:
            torch.set_num_threads(self._threads)  # this process only: the caller's training keeps its threads
        warm_up_codec(self.allreduce_kwargs["compression"])
        if self._owner_public is not None:
            self._gate = AdmissionGate(self.dht, self._owner_public,
                                       timeout=float(self.matchmaking_kwargs.get("request_timeout") or 5.0),
                                       run_id=self._run_id)
        # hivemind builds its Matchmaking by this module-level name; this is our forked process, nobody else's.
        _hivemind_averager.Matchmaking = AdmittedMatchmaking
        self.matchmaking_kwargs["gate"] = self._gate
        super().run()

    # ---- admission: every averaging RPC a peer can send us, and what we ask of others -----------------------
    async def _admits(self, peer: Any) -> bool:
        return self._gate is None or await self._gate.allows(peer)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admits(context.remote_id):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context.remote_id):
            return  # the same answer as a peer that does not share state: the joiner tries the next one
        async for message in super().rpc_download_state(request, context):
            yield message

    def load_state_from(self, only: Sequence[str] | None, timeout: float, exclude: Sequence[str] = ()):
        """hivemind's load_state_from_peers (wait=True), from the peers in ``only`` if given, never ``exclude``."""
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future,
                                                                  only=list(only) if only is not None else None,
                                                                  exclude=list(exclude))))
        return future.result(timeout=timeout)

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None,
                                     only: list[str] | None = None, exclude: Sequence[str] = ()):
        """hivemind's state download, but only from admitted peers (a closed swarm) and from ``only`` if given
        (the holders of the model a split's minority adopts), newest round first."""
        chunk_timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        wanted = {PeerID.from_base58(p) for p in only} if only is not None else None
        try:
            if self._gate is not None:
                await self._gate.refresh()
            key_manager = self._matchmaking.group_key_manager
            found = await self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True, return_future=True)
            priority = {PeerID(peer): (float(info.value), random.random())
                        for peer, info in (found.value if found is not None else {}).items()
                        if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))}
            for peer in sorted(priority, key=priority.get, reverse=True):
                if peer == self.peer_id or (wanted is not None and peer not in wanted) or \
                        peer.to_base58() in exclude:  # a server whose state this peer already refused
                    continue
                if self._gate is not None and not await self._gate.allows(peer):
                    continue  # a state from outside the swarm is never even downloaded
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors, received = None, [], [], 0
                    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                        received += len(message.metadata) + len(message.tensor_part.buffer)
                        if received > self._max_state_bytes:
                            raise ValueError(f"it sent over {self._max_state_bytes} bytes, more than this model's "
                                             "state")
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    # hivemind's client ends a stream whose server went away (exit, kill) as if it were whole
                    # (p2p_daemon: IncompleteReadError -> break): a joiner once took 2 of 16 tensors for a model
                    # of "a different shape" and stopped. A server that announces its count is held to it.
                    declared = metadata.get("n_tensors") if isinstance(metadata, dict) else None
                    if declared is not None and declared != len(tensors):
                        raise ValueError(f"the stream ended after {len(tensors)} of {declared} tensors (the "
                                         "server stopped mid-download?)")
                    if isinstance(metadata, dict):
                        metadata["served_by"] = peer.to_base58()  # ours, not the server's word
                        future.set_result((metadata, tensors))
                        return
                except Exception as e:  # that peer failed: try the next one
                    log.info("state download from %s failed: %r", peer, e)
        finally:
            if not future.done():
                future.set_result(None)

    def set_target_group_size(self, size: int) -> None:
        """Group size at which a leader starts at once, from the next step on (hivemind fixes it at construction).

        hivemind handles commands from the pipe in order, so a step sent after this one already sees the new size.
        """
        self._outer_pipe.send(("_set_target_group_size", [int(size)], {}))

    def set_round_leader(self, leader: str | None) -> None:
        """The designated leader of the next step (matchmaking.AdmittedMatchmaking.round_leader), or None."""
        self._outer_pipe.send(("_set_round_leader", [leader], {}))

    async def _set_round_leader(self, leader: str | None) -> None:
        self._matchmaking.round_leader = PeerID.from_base58(leader) if leader else None

    async def _set_target_group_size(self, size: int) -> None:
        mm = self._matchmaking
        mm.target_group_size = size
        # The key manager sizes its post-round key shuffle by the constructor's target and fails a leader whose
        # group is larger (random.sample(range(target), size)). We set the group bits before every step, so that
        # shuffle only needs to be valid: None sizes it by the group actually assembled.
        mm.group_key_manager.target_group_size = None
        # Lowered while we lead (a member we waited for went silent): start with the followers already here, as
        # hivemind does when the last awaited follower joins.
        if mm.is_looking_for_group and mm.current_followers and len(mm.current_followers) + 1 >= size:
            async with mm.lock_request_join_group:
                if not mm.assembled_group.done() and mm.current_leader is None and not mm.client_mode \
                        and not mm.designated_elsewhere() and len(mm.current_followers) + 1 >= size:
                    await mm.leader_assemble_group()

    async def _shutdown(self, timeout: Optional[float]) -> None:
        """hivemind's, but it finalizes only the groups whose all-reduce runner exists: hivemind calls finalize()
        on each registered group's future, and a group on the gloo path (no runner) or one still waiting for its
        runner put an AttributeError traceback at the end of every honest peer's log."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        remaining = set()
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                remaining.update(future.result().finalize(cancel=True))
            else:
                future.cancel()
        await asyncio.wait_for(asyncio.gather(*remaining), timeout)

    # The stamps wrap hivemind's internal coroutines and pass every argument through unchanged.
    async def _step(self, *args, **kwargs):
        self._clock.stamp("step_received")
        if self._gate is not None:
            await self._gate.refresh()  # a peer revoked since the last round is out of this one
        step = kwargs.get("step")
        try:
            return await super()._step(*args, **kwargs)
        except concurrent.futures.InvalidStateError:
            # We cancelled the step (stop, deadline, the round moved on) as its all-reduce finished: hivemind's
            # set_result then raises concurrent.futures.InvalidStateError, which its handler does not catch (it
            # lists asyncio's), and a traceback lands in the user's log. The caller already has its answer.
            if step is None or not step.cancelled():
                raise

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        self._clock.stamp("group_assembled")
        log.debug("group %s assembled under %s: %s", group_info.group_id.hex()[:8],
                  self._matchmaking.group_key_manager.current_key, [str(p)[-6:] for p in group_info.peer_ids])
        self._report = {"failed_fraction": 0.0, "failed_peers": [], "healed": False, "clipped": {}, "rejected": []}
        self._claims, self._round_robust = None, self._robust
        try:
            if self._gate is not None:
                outsiders = [str(p) for p in group_info.peer_ids if not await self._gate.allows(p)]
                if outsiders:  # a leader let in a peer we do not admit (e.g. revoked since its last read)
                    raise AllreduceException(f"group has non-admitted peers: {', '.join(outsiders)}")
            gathered = self._peek_gathered(group_info)
            self._ranks = [_rank(gathered.get(p), str(p)) for p in group_info.peer_ids]
            endpoints = [g.get(BULK_KEY) if isinstance(g, dict) else None
                         for g in (gathered.get(p) for p in group_info.peer_ids)]
            self._bulk_endpoints = endpoints if self._bulk_timeout and all(endpoints) else None
            mine = gathered.get(self.peer_id, {}) if isinstance(gathered.get(self.peer_id), dict) else {}
            metas = [g for g in gathered.values() if isinstance(g, dict)]
            weights_mode = heals([str(g.get("fingerprint") or "") for g in metas],
                                 [g.get("weights") is True for g in metas], int(mine.get("stage", 0) or 0))
            if weights_mode and (self._global_tensors is not None or mine.get("weights")):
                # Members hold different global models: averaging updates would keep them apart forever.
                # Average the local weights themselves (θ_local = θ_global − Δ), lossless, for this round
                # (a buffer that already holds weights, from a healed first stage, is sent as it is).
                if not mine.get("weights"):
                    with self.lock_averaged_tensors:
                        for buf, g in zip(self._averaged_tensors, self._global_tensors):
                            buf.neg_().add_(g)
                kwargs["compression"] = CountingCompression(NoCompression(), self._counter)
                self._report["healed"] = True
                # Weights carry no claim budget (the members declared their Δ norms), and a -θ has θ's norm, which
                # clipping to the median norm keeps: deviations from the coordinate median are bounded instead.
                if self._robust.mode != "none":
                    self._round_robust = replace(self._robust, mode="centered_clip")
            # Declared Δ norms (robust.ClaimBudget/ReducerCheck); not in a healing round (the tensors are weights).
            norms = [gathered.get(p, {}).get("norm") if isinstance(gathered.get(p), dict) else None
                     for p in group_info.peer_ids]
            # A member that declares no valid norm gets a claim of 0: its chunks count for nothing (and it is
            # reported), rather than one member switching the check off for the whole group.
            claims = [n if isinstance(n, float) and math.isfinite(n) and n >= 0 else 0.0 for n in norms]
            self._claims = None if self._report["healed"] or weights_mode else cap_claims(claims)
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            return {**gathered, REPORT_KEY: dict(self._report)}
        except BaseException as e:
            log.debug("group %s failed: %s", group_info.group_id.hex()[:8], describe(e))
            raise
        finally:
            self._clock.stamp("allreduce_done")

    def _peek_gathered(self, group_info) -> dict:
        """The members' gathered metadata, decoded the way hivemind's _aggregate_with_group does."""
        try:
            rows = [self.serializer.loads(g) for g in group_info.gathered]
            return {peer: self.serializer.loads(row[2]) for peer, row in zip(group_info.peer_ids, rows)}
        except Exception:  # malformed metadata: hivemind's own decoding fails the round right after
            return {}

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        codec = kwargs.get("compression")
        codec = codec.inner if isinstance(codec, CountingCompression) else codec
        if self._bulk_endpoints is not None and isinstance(codec, NoCompression):
            return await self._bulk_allreduce(tensors, group_info, group_id, float(kwargs.get("weight", 1.0)))
        runner = ExactAllReduceRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                      group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                      ranks=getattr(self, "_ranks", None), robust=self._round_robust,
                                      claims=getattr(self, "_claims", None), **kwargs)
        assert group_id in self._running_groups, "group was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        async for tensor, average in azip(as_aiter(*tensors), runner):
            tensor.copy_(average)  # the group's average itself: the very bytes every member decoded
        container = runner.tensor_part_container
        self._report["failed_fraction"] = container.failed_size / max(1, container.total_size)
        self._report["failed_peers"] = sorted(str(p) for p in runner.failed_reducers)
        self._report["failures"] = dict(runner.failures)
        self._report["clipped"] = runner.clipped()  # what this peer, as a reducer, had to bound
        self._report["rejected"] = runner.rejected()  # reducers whose averages broke the bound (zeroed)


    async def _bulk_allreduce(self, tensors, group_info, group_id: bytes, weight: float) -> None:
        """Every member reachable and the round uncompressed: the bytes go over gloo (federation/bulk.py). With
        robust aggregation each member reduces one slice from every sender's chunk of it (robust.reduce_part,
        the senders' claim budgets), and checks every reducer's slice (robust.ReducerCheck), as on hivemind."""
        peers = [str(p) for p in group_info.peer_ids]
        rank, endpoints, key = peers.index(str(self.peer_id)), list(self._bulk_endpoints), group_id.hex()
        if self._bulk_groups is None:  # in the averager process (after the fork): gloo groups live here
            self._bulk_groups = BulkGroups(self._bulk_timeout, threads=self._threads or 1,
                                           rendezvous=self.next_chunk_timeout)
        self._clock.stamp("bulk_started")
        try:
            traffic = await self._bulk_traffic(tensors, weight, rank, peers, endpoints, key)
        except BaseException:
            self._clock.stamp("bulk_failed")  # the caller stops advertising its endpoint for a while (BulkBackoff)
            raise
        self._counter.add_sent(traffic.sent)
        self._counter.add_received(traffic.received)
        self._report["transport"] = "gloo"

    async def _bulk_traffic(self, tensors, weight: float, rank: int, peers: list[str], endpoints: list[str],
                            key: str):
        """The gloo all-reduce itself (plain or robust); its bulk.Traffic."""
        loop, robust = asyncio.get_event_loop(), self._round_robust
        if robust.mode == "none":
            return await loop.run_in_executor(None, lambda: allreduce_mean(
                tensors, weight, rank, endpoints, key, self._bulk_groups))
        order = sorted(range(len(peers)), key=lambda i: self._ranks[i])
        claims = getattr(self, "_claims", None)
        budget = ClaimBudget(claims) if claims is not None else None
        check = ReducerCheck(claims) if claims is not None else None

        def reduce(parts, weights, order):
            spent: dict[int, float] = {}
            averaged, factors = reduce_part(parts, weights, order, robust,
                                            budget.caps() if budget is not None else None, spent)
            if budget is not None:
                budget.spend(spent)
            return averaged, factors

        part_numel = max(1, int(self.allreduce_kwargs.get("part_size_bytes", 2 ** 21)) // 4)
        traffic = await loop.run_in_executor(None, lambda: robust_mean(
            tensors, weight, rank, endpoints, key, self._bulk_groups, reduce, part_numel, order,
            check=check.accept if check is not None else None))
        self._report["clipped"] = {peers[i]: f for i, f in traffic.factors.items()}
        self._report["rejected"] = sorted(peers[i] for i in traffic.rejected)
        return traffic
