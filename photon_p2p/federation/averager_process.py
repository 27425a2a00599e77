"""The hivemind averager process as photon_p2p runs it: exact all-reduce, healing, tuning, phase timestamps.

Every touch of hivemind's private internals lives here and in matchmaking.py (nowhere else), checked against the
pinned version (the check below runs before either is used):
- ``ExactAllReduceRunner``: hivemind's butterfly all-reduce returns each member ``own + compress(avg − own)``,
  so members end on different bytes (always with a lossy codec, by rounding even without one). Our reducers
  compress each averaged part ONCE and send every member those same bytes; members (the reducer included)
  adopt the decoded average as is. After a successful round every member holds bit-identical tensors.
- ``OrderedPartReducer``: a reducer sums its senders' parts in a canonical order (the "rank" each member
  gathers), not in arrival order, so two groups given the same inputs compute the same bytes (groups.py).
- Admission (closed swarms, federation/admission.py): ``AdmissionGate`` holds the admitted set in this process;
  join requests, all-reduce parts and state downloads from peers outside it are refused, and this peer neither
  follows a leader outside it (``AdmittedMatchmaking``), downloads state from one, nor averages in a group with one.
- Matchmaking (``AdmittedMatchmaking``, matchmaking.py): no ghost members, i.e. a leader never counts a follower
  that walked away (late "accepted", late "begin").
- Healing: when a group's gathered fingerprints differ, the members hold different global models; that round
  the averager turns Δ = θ_global − θ_local into θ_local in place and averages weights losslessly, so the group
  leaves the round on one model.

Where one round's time goes (see bench/allreduce_speed.py) is measured here: the forked averager process stamps
when it receives a step, when its group is assembled and when the all-reduce has written its result back, into
shared memory that the calling process reads after the round.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import math
import multiprocessing as mp
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Sequence, TypeVar

import hivemind
import hivemind.averaging.averager as _hivemind_averager
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils import MPFuture, ValueWithExpiration
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip
from hivemind.utils.streaming import combine_from_streaming

from photon_p2p.federation import FederationError
from photon_p2p.federation.admission import AdmissionView, read_view_async
from photon_p2p.federation.bulk import GATHER_KEY as BULK_KEY
from photon_p2p.federation.bulk import BulkGroups, allreduce_mean, robust_mean
from photon_p2p.federation.compression import ByteCounter, CountingCompression, count_registry_traffic
from photon_p2p.federation.matchmaking import AdmittedMatchmaking
from photon_p2p.federation.records import is_live, peer_id_of_owner, read_records
from photon_p2p.federation.robust import ClaimBudget, ReducerCheck, RobustSettings, cap_claims, reduce_part

PINNED_HIVEMIND = "1.1.12"
if hivemind.__version__ != PINNED_HIVEMIND:
    # The subclasses below override private coroutines of hivemind's averager and all-reduce runner.
    raise FederationError(f"photon_p2p needs hivemind=={PINNED_HIVEMIND} (found {hivemind.__version__}); "
                          f"pip install hivemind=={PINNED_HIVEMIND}")

log = logging.getLogger("photon_p2p.federation")
T = TypeVar("T")
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

    NAMES = ("step_received", "group_assembled", "allreduce_done")

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

    def __init__(self, dht: DHT, owner_public: bytes, timeout: float) -> None:
        self.dht, self.view, self.timeout = dht, AdmissionView(owner_public), timeout
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


class ProcessAverager(DecentralizedAverager):
    """hivemind's averager with our state for joiners, byte counting and phase stamps in its own process."""

    def __init__(self, *args, state_provider: StateProvider, counter: ByteCounter, clock: PhaseClock,
                 threads: int | None, global_tensors: Sequence[torch.Tensor] | None = None,
                 robust: RobustSettings = RobustSettings(mode="none"), owner_public: bytes | None = None,
                 bulk_timeout: float = 0.0, **kwargs) -> None:
        self._state_provider, self._counter, self._clock, self._threads = state_provider, counter, clock, threads
        self._robust = robust
        # A closed swarm's owner key; the gate itself is built in the averager process (it needs that event loop).
        self._owner_public, self._gate = owner_public, None
        self._bulk_timeout = bulk_timeout  # > 0: uncompressed groups whose members all have a bulk endpoint use it
        self._bulk_endpoints: list[str] | None = None
        self._bulk_groups: BulkGroups | None = None
        # The caller's global weights in shared memory (read here only in a healing round, under the tensor lock).
        self._global_tensors = list(global_tensors) if global_tensors is not None else None
        self._report: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

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
                                       timeout=float(self.matchmaking_kwargs.get("request_timeout") or 5.0))
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

    def load_state_from(self, only: Sequence[str] | None, timeout: float):
        """hivemind's load_state_from_peers (wait=True), from the peers in ``only`` if given."""
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future,
                                                                  only=list(only) if only is not None else None)))
        return future.result(timeout=timeout)

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None,
                                     only: list[str] | None = None):
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
                if peer == self.peer_id or (wanted is not None and peer not in wanted):
                    continue
                if self._gate is not None and not await self._gate.allows(peer):
                    continue  # a state from outside the swarm is never even downloaded
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata:
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

    def set_round_leader(self, leader: str | None, patience: float) -> None:
        """The designated leader of the next step (matchmaking.AdmittedMatchmaking.round_leader), or None."""
        self._outer_pipe.send(("_set_round_leader", [leader, float(patience)], {}))

    async def _set_round_leader(self, leader: str | None, patience: float) -> None:
        self._matchmaking.round_leader = PeerID.from_base58(leader) if leader else None
        self._matchmaking.leader_patience = patience

    async def _set_target_group_size(self, size: int) -> None:
        self._matchmaking.target_group_size = size
        # The key manager sizes its post-round key shuffle by the constructor's target and fails a leader whose
        # group is larger (random.sample(range(target), size)). We set the group bits before every step, so that
        # shuffle only needs to be valid: None sizes it by the group actually assembled.
        self._matchmaking.group_key_manager.target_group_size = None

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
        self._claims = None
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
            weights_mode = models_differ(gathered) or any(isinstance(g, dict) and g.get("weights")
                                                          for g in gathered.values())
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
                                      ranks=getattr(self, "_ranks", None), robust=self._robust,
                                      claims=getattr(self, "_claims", None), **kwargs)
        assert group_id in self._running_groups, "group was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        async for tensor, average in azip(as_aiter(*tensors), runner):
            tensor.copy_(average)  # the group's average itself: the very bytes every member decoded
        container = runner.tensor_part_container
        self._report["failed_fraction"] = container.failed_size / max(1, container.total_size)
        self._report["failed_peers"] = sorted(str(p) for p in runner.failed_reducers)
        self._report["clipped"] = runner.clipped()  # what this peer, as a reducer, had to bound
        self._report["rejected"] = runner.rejected()  # reducers whose averages broke the bound (zeroed)


    async def _bulk_allreduce(self, tensors, group_info, group_id: bytes, weight: float) -> None:
        """Every member reachable and the round uncompressed: the bytes go over gloo (federation/bulk.py). With
        robust aggregation each member reduces one slice from every sender's chunk of it (robust.reduce_part,
        the senders' claim budgets), and checks every reducer's slice (robust.ReducerCheck), as on hivemind."""
        peers = [str(p) for p in group_info.peer_ids]
        rank, endpoints, key = peers.index(str(self.peer_id)), list(self._bulk_endpoints), group_id.hex()
        loop = asyncio.get_event_loop()
        if self._bulk_groups is None:  # in the averager process (after the fork): gloo groups live here
            self._bulk_groups = BulkGroups(self._bulk_timeout, threads=self._threads or 1,
                                           rendezvous=self.next_chunk_timeout)
        if self._robust.mode == "none":
            traffic = await loop.run_in_executor(None, lambda: allreduce_mean(
                tensors, weight, rank, endpoints, key, self._bulk_groups))
        else:
            order = sorted(range(len(peers)), key=lambda i: self._ranks[i])
            claims = getattr(self, "_claims", None)
            budget = ClaimBudget(claims) if claims is not None else None
            check = ReducerCheck(claims) if claims is not None else None

            def reduce(parts, weights, order):
                spent: dict[int, float] = {}
                averaged, factors = reduce_part(parts, weights, order, self._robust,
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
        self._counter.add_sent(traffic.sent)
        self._counter.add_received(traffic.received)
        self._report["transport"] = "gloo"


def models_differ(gathered: dict[Any, Any]) -> bool:
    """Whether a group's members reported different global-model fingerprints (a split swarm meeting again)."""
    prints = {g.get("fingerprint") for g in gathered.values() if isinstance(g, dict) and g.get("fingerprint")}
    return len(prints) > 1


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce in which every member receives the same bytes for each averaged part.

    hivemind's runner sends each sender ``compress(avg − sent)``, so members end on different values. Here a
    reducer encodes each averaged part once, with the group's codec, and streams those bytes to every sender;
    it decodes the same bytes for its own copy. A part whose reducer failed comes back as zeros (no update),
    and the reducers that failed are listed in ``failed_reducers``.
    """

    def __init__(self, *args, compression: CompressionBase = NoCompression(), ranks: list | None = None,
                 robust: RobustSettings = RobustSettings(mode="none"), claims: list[float] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, compression=compression, **kwargs)
        # Sum senders in the order of their gathered rank (then peer id): the same inputs, the same bytes.
        by_peer = dict(zip(self.ordered_peer_ids, ranks or [str(p) for p in self.ordered_peer_ids]))
        order = sorted(range(len(self.sender_peer_ids)), key=lambda i: by_peer.get(self.sender_peer_ids[i], ""))
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        # super() built hivemind's own reducer, replaced below unused: at collection its __del__ would log
        # "Reducer: received 0.0% of input tensors" as a warning in every round. Finished, it has nothing to say.
        self.tensor_part_reducer.finished.set()
        by_index = dict(zip(self.ordered_peer_ids, claims)) if claims is not None else {}
        sender_claims = [by_index.get(p) for p in self.sender_peer_ids] if claims is not None else None
        self.tensor_part_reducer = OrderedPartReducer(shapes, len(self.sender_peer_ids), order, robust,
                                                      sender_claims)
        # Check every reducer's averages against the senders' claims (robust.ReducerCheck): a part beyond the
        # bound is replaced by zeros (no update), the same on every member, and the reducer is reported.
        self.check = ReducerCheck(claims) if claims is not None and robust.mode != "none" else None
        register = self.tensor_part_container.register_processed_part

        def checked(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if self.check is not None and not self.check.accept(peer_index, part):
                part = torch.zeros_like(part)
            register(peer_index, part_index, part)

        self.tensor_part_container.register_processed_part = checked
        # Encode results without counting (bytes are counted per message actually sent, below).
        self._codec = compression.inner if isinstance(compression, CountingCompression) else compression
        self._counter = compression.counter if isinstance(compression, CountingCompression) else None
        self._encoded: dict[int, asyncio.Future] = {}
        self._fetched: dict[int, int] = {}
        self.failed_reducers: list = []

    def clipped(self) -> dict[str, float]:
        """{sender peer id: smallest share of its contribution this reducer kept} for the senders it clipped or
        dropped (0.0 = dropped: non-finite, or past its declared norm); empty when everyone was within bounds."""
        return {str(self.sender_peer_ids[i]): f for i, f in self.tensor_part_reducer.factors.items()}

    def rejected(self) -> list[str]:
        """Reducers whose returned averages exceeded what their senders' declared norms allow."""
        return sorted(str(self.ordered_peer_ids[i]) for i in (self.check.rejected if self.check else ()))

    async def _encoded_average(self, part_index: int, averaged: torch.Tensor) -> runtime_pb2.Tensor:
        """The averaged part, compressed once; every caller gets the very same message."""
        if part_index not in self._encoded:
            info = CompressionInfo.from_tensor(averaged, key=part_index)
            loop = asyncio.get_event_loop()
            self._encoded[part_index] = asyncio.ensure_future(
                loop.run_in_executor(None, lambda: self._codec.compress(averaged, info)))
        message = await self._encoded[part_index]
        self._fetched[part_index] = self._fetched.get(part_index, 0) + 1
        if self._fetched[part_index] >= len(self.sender_peer_ids):
            del self._encoded[part_index]  # every sender has it: free the bytes early
        return message

    async def _communicate_with_peer(self, peer_id) -> None:
        if peer_id != self.peer_id:
            try:
                return await super()._communicate_with_peer(peer_id)
            except BaseException:
                self.failed_reducers.append(peer_id)
                raise
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        loop = asyncio.get_event_loop()
        for part_index, part in enumerate(self.parts_for_local_averaging):
            # Our own contribution goes through the codec like every remote one: two groups fed the same
            # inputs must compute the same bytes whichever member happens to reduce a part (groups.py).
            info = CompressionInfo.from_tensor(part, key=part_index)
            part = await loop.run_in_executor(None, lambda: self._codec.extract(self._codec.compress(part, info)))
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                     weight=self.weight)
            message = await self._encoded_average(part_index, averaged)
            decoded = await loop.run_in_executor(None, self._codec.extract, message)
            self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                          sender_index: int):
        part_index = 0
        try:
            async for part, weight in amap_in_executor(
                    lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight), stream,
                    max_prefetch=self.tensor_part_container.prefetch):
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                             weight=weight)
                    part_index += 1
                except BannedException:
                    break  # the sender was banned meanwhile: it gets nothing more
                message = await self._encoded_average(part_index - 1, averaged)
                if self._counter is not None:
                    self._counter.add_sent(message.ByteSize())
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=message)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


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

    def _get_local_progress(self, local_epoch: int, samples_accumulated: int) -> LocalTrainingProgress:
        progress = super()._get_local_progress(local_epoch, samples_accumulated)
        if self.measured_speed > 0:
            progress.samples_per_second = self.measured_speed
        return progress

    def run(self) -> None:
        # hivemind's run() leaves its thread's loop open; collected at interpreter exit after its self-pipe
        # socket, it prints an "Exception ignored" traceback. Same body, plus the close.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(asyncio.gather(self._progress_reporter(), self._progress_fetcher()))
        finally:
            self.shutdown_complete.set()
            # the reporter cancels its last store without awaiting it: finish that before closing, or Python
            # prints "Task was destroyed but it is pending!" at exit
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _parse_swarm_progress_data(self, metadata):
        metadata = admitted_progress(metadata, self.admits)
        records = progress_records(metadata)
        self.records = records
        self.members = {peer: int(r.epoch) for peer, r in records.items()}
        return super()._parse_swarm_progress_data(metadata)

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


def _rank(gathered: Any, peer_id: str) -> tuple:
    """A member's place in the canonical summation order: its gathered rank, then its peer id."""
    rank = gathered.get("rank", 0) if isinstance(gathered, dict) else 0
    return (rank if isinstance(rank, int) else 0, peer_id)


class OrderedPartReducer(TensorPartReducer):
    """hivemind's part reducer, but parts are summed in a fixed sender order once all have arrived.

    Zero-weight contributions are skipped: a zero-weight sender only receives the average. With ``robust`` on,
    each sender's influence on the part is bounded and non-finite chunks are dropped (robust.py).
    """

    def __init__(self, part_shapes, num_senders: int, order: list[int],
                 robust: RobustSettings = RobustSettings(mode="none"),
                 claims: list[float | None] | None = None) -> None:
        self.order, self._pending, self.robust = list(order), {}, robust
        self._budget = ClaimBudget(claims) if claims is not None and robust.mode != "none" else None
        self.factors: dict[int, float] = {}  # sender index -> smallest share of its contribution kept (robust.py)
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._pending = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException("attempted to aggregate a part in a finalized reducer")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._pending[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            parts = [self._pending.get(i, (None, 0.0))[0] for i in range(self.num_senders)]
            weights = [self._pending.get(i, (None, 0.0))[1] for i in range(self.num_senders)]
            spent: dict[int, float] = {}  # no sender counts beyond its own declared norm (robust.ClaimBudget)
            caps = self._budget.caps() if self._budget is not None else None
            try:
                averaged, factors = reduce_part(parts, weights, self.order, self.robust, caps, spent)
            except ValueError:  # every sender had weight 0: hivemind's reducer divides by zero here too
                averaged, factors = self.accumulator.div_(self.denominator), {}
            if self._budget is not None:
                self._budget.spend(spent)
            for index, factor in factors.items():
                self.factors[index] = min(factor, self.factors.get(index, 1.0))
            self.current_part_future.set_result(averaged)
            self.reset_accumulators()


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


def bounded(fn: Callable[[], T], timeout: float) -> T | None:
    """Run a call into the averager process that has no timeout of its own; None if it does not return in time.

    hivemind waits on its process without a deadline; if that process died, the call would block forever.
    """
    box: list = []

    def call() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller's thread below
            box.append((False, e))

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        return None
    ok, value = box[0]
    if not ok:
        raise value
    return value


def describe(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[-1][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def all_finite(tensors: list[torch.Tensor], fast: bool = True) -> bool:
    """Whether every value is finite; ``fast``: one sum per tensor (inf/nan propagate), exact pass only if needed."""
    return all((fast and bool(torch.isfinite(t.sum()))) or bool(torch.isfinite(t).all()) for t in tensors)


def warm_up_codec(codec) -> None:
    """Compress and extract a small tensor once, before serving any peer.

    bitsandbytes (blockwise8) and torch's quantizer load lazily on first use, which can take seconds on a loaded
    machine; inside a round that delay counts against next_chunk_timeout, so a peer waiting for this reducer's
    first part gives up and that part goes un-averaged.
    """
    inner = getattr(codec, "inner", codec)  # not through CountingCompression: these bytes never leave the process
    sample = torch.linspace(-1.0, 1.0, 8192)
    inner.extract(inner.compress(sample, CompressionInfo.from_tensor(sample, key=0)))

