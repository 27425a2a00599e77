"""The hivemind averager process as photon_p2p runs it: exact all-reduce, healing, tuning, phase timestamps.

Every touch of hivemind's private internals lives here (and nowhere else), checked against the pinned version:
- ``ExactAllReduceRunner``: hivemind's butterfly all-reduce returns each member ``own + compress(avg − own)``,
  so members end on different bytes (always with a lossy codec, by rounding even without one). Our reducers
  compress each averaged part ONCE and send every member those same bytes; members (the reducer included)
  adopt the decoded average as is. After a successful round every member holds bit-identical tensors.
- ``OrderedPartReducer``: a reducer sums its senders' parts in a canonical order (the "rank" each member
  gathers), not in arrival order, so two groups given the same inputs compute the same bytes (groups.py).
- Healing: when a group's gathered fingerprints differ, the members hold different global models; that round
  the averager turns Δ = θ_global − θ_local into θ_local in place and averages weights losslessly, so the group
  leaves the round on one model.

Where one round's time goes (see bench/allreduce_speed.py) is measured here: the forked averager process stamps
when it receives a step, when its group is assembled and when the all-reduce has written its result back, into
shared memory that the calling process reads after the round.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import hivemind
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

from photon_p2p.federation import FederationError
from photon_p2p.federation.bulk import GATHER_KEY as BULK_KEY
from photon_p2p.federation.bulk import allreduce_mean
from photon_p2p.federation.compression import ByteCounter, CountingCompression, count_registry_traffic
from photon_p2p.federation.records import is_live, read_records

PINNED_HIVEMIND = "1.1.12"
if hivemind.__version__ != PINNED_HIVEMIND:
    # The subclasses below override private coroutines of hivemind's averager and all-reduce runner.
    raise FederationError(f"photon_p2p needs hivemind=={PINNED_HIVEMIND} (found {hivemind.__version__}); "
                          f"pip install hivemind=={PINNED_HIVEMIND}")

T = TypeVar("T")
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


class ProcessAverager(DecentralizedAverager):
    """hivemind's averager with our state for joiners, byte counting and phase stamps in its own process."""

    def __init__(self, *args, state_provider: StateProvider, counter: ByteCounter, clock: PhaseClock,
                 threads: int | None, global_tensors: Sequence[torch.Tensor] | None = None,
                 bulk_timeout: float = 0.0, **kwargs) -> None:
        self._state_provider, self._counter, self._clock, self._threads = state_provider, counter, clock, threads
        self._bulk_timeout = bulk_timeout  # > 0: uncompressed groups whose members all have a bulk endpoint use it
        self._bulk_endpoints: list[str] | None = None
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
        super().run()

    def set_target_group_size(self, size: int) -> None:
        """Group size at which a leader starts at once, from the next step on (hivemind fixes it at construction).

        hivemind handles commands from the pipe in order, so a step sent after this one already sees the new size.
        """
        self._outer_pipe.send(("_set_target_group_size", [int(size)], {}))

    async def _set_target_group_size(self, size: int) -> None:
        self._matchmaking.target_group_size = size

    # The stamps wrap hivemind's internal coroutines and pass every argument through unchanged.
    async def _step(self, *args, **kwargs):
        self._clock.stamp("step_received")
        return await super()._step(*args, **kwargs)

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        self._clock.stamp("group_assembled")
        self._report = {"failed_fraction": 0.0, "failed_peers": [], "healed": False}
        try:
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
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            return {**gathered, REPORT_KEY: dict(self._report)}
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
                                      ranks=getattr(self, "_ranks", None), **kwargs)
        assert group_id in self._running_groups, "group was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        async for tensor, average in azip(as_aiter(*tensors), runner):
            tensor.copy_(average)  # the group's average itself: the very bytes every member decoded
        container = runner.tensor_part_container
        self._report["failed_fraction"] = container.failed_size / max(1, container.total_size)
        self._report["failed_peers"] = sorted(str(p) for p in runner.failed_reducers)


    async def _bulk_allreduce(self, tensors, group_info, group_id: bytes, weight: float) -> None:
        """Every member reachable and the round uncompressed: the bytes go over gloo (federation/bulk.py)."""
        rank = list(group_info.peer_ids).index(self.peer_id)
        endpoints = list(self._bulk_endpoints)
        loop = asyncio.get_event_loop()
        traffic = await loop.run_in_executor(
            None, lambda: allreduce_mean(tensors, weight, rank, endpoints, group_id.hex(), self._bulk_timeout,
                                         threads=self._threads or 1))
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
                 **kwargs) -> None:
        super().__init__(*args, compression=compression, **kwargs)
        # Sum senders in the order of their gathered rank (then peer id): the same inputs, the same bytes.
        by_peer = dict(zip(self.ordered_peer_ids, ranks or [str(p) for p in self.ordered_peer_ids]))
        order = sorted(range(len(self.sender_peer_ids)), key=lambda i: by_peer.get(self.sender_peer_ids[i], ""))
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        self.tensor_part_reducer = OrderedPartReducer(shapes, len(self.sender_peer_ids), order)
        # Encode results without counting (bytes are counted per message actually sent, below).
        self._codec = compression.inner if isinstance(compression, CountingCompression) else compression
        self._counter = compression.counter if isinstance(compression, CountingCompression) else None
        self._encoded: dict[int, asyncio.Future] = {}
        self._fetched: dict[int, int] = {}
        self.failed_reducers: list = []

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


def progress_members(metadata: Any) -> dict[str, int]:
    """{peer id: round} from the clock's DHT value (ProgressTracker's records; the epoch is our round)."""
    members: dict[str, int] = {}
    if isinstance(metadata, dict):
        for entry in metadata.values():
            try:
                record = LocalTrainingProgress.parse_obj(entry.value)
                members[PeerID(record.peer_id).to_base58()] = int(record.epoch)
            except Exception:  # a malformed or foreign entry is simply no member
                continue
    return members


class RoundTracker(ProgressTracker):
    """hivemind's ProgressTracker that also remembers which peers reported which epoch (= round) last fetch."""

    members: dict[str, int] = {}

    def _parse_swarm_progress_data(self, metadata):
        self.members = progress_members(metadata)
        return super()._parse_swarm_progress_data(metadata)


def _rank(gathered: Any, peer_id: str) -> tuple:
    """A member's place in the canonical summation order: its gathered rank, then its peer id."""
    rank = gathered.get("rank", 0) if isinstance(gathered, dict) else 0
    return (rank if isinstance(rank, int) else 0, peer_id)


class OrderedPartReducer(TensorPartReducer):
    """hivemind's part reducer, but parts are summed in a fixed sender order once all have arrived.

    Zero-weight contributions are skipped: a zero-weight sender only receives the average.
    """

    def __init__(self, part_shapes, num_senders: int, order: list[int]) -> None:
        self.order, self._pending = list(order), {}
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
            for index in self.order:
                part, weight = self._pending.get(index, (None, 0.0))
                if part is not None and weight != 0.0:
                    self.accumulator.add_(part, alpha=weight)
                    self.denominator += weight
            self.current_part_future.set_result(self.accumulator.div_(self.denominator))
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

