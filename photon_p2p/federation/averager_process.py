"""The hivemind averager process as photon_p2p runs it: tuning, phase timestamps, and bounded calls into it.

Where one round's time goes (see bench/allreduce_speed.py) is measured here: the forked averager process stamps
when it receives a step, when its group is assembled and when the all-reduce has written its result back, into
shared memory that the calling process reads after the round.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo

from photon_p2p.federation.compression import ByteCounter, count_registry_traffic
from photon_p2p.federation.records import is_live, read_records

T = TypeVar("T")
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
                 threads: int | None, **kwargs) -> None:
        self._state_provider, self._counter, self._clock, self._threads = state_provider, counter, clock, threads
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

    async def _aggregate_with_group(self, *args, **kwargs):
        self._clock.stamp("group_assembled")
        try:
            return await super()._aggregate_with_group(*args, **kwargs)
        finally:
            self._clock.stamp("allreduce_done")


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

