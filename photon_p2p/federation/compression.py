"""Codecs for pseudo-gradients (hivemind compression objects) with byte counters that work across the fork."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import time

import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    Uniform8BitQuantization,
)
from hivemind.proto import runtime_pb2

from photon_p2p.federation import FederationError

CODECS: dict[str, type[CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "scaled-fp16": ScaledFloat16Compression,
    "uint8": Uniform8BitQuantization,
    "blockwise8": BlockwiseQuantization,  # bitsandbytes, ~1 GB/s on CPU
}


def make_compression(name: str) -> CompressionBase:
    """The hivemind codec for a config name (federation.compression)."""
    if name not in CODECS:
        raise FederationError(f"unknown compression '{name}' (choose one of {', '.join(CODECS)})")
    if name == "blockwise8":
        # hivemind imports bitsandbytes on first use, inside the all-reduce: ~2.5 s here, long enough for the
        # group to drop us as a silent sender. Import it now, before the averager forks.
        try:
            # bitsandbytes logs a warning about an optional CPU 4-bit kernel we never use; keep the peer's log clean.
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
            import bitsandbytes.functional  # noqa: F401
        except ImportError:
            raise FederationError("compression 'blockwise8' needs bitsandbytes (pip install bitsandbytes)") from None
    return CODECS[name]()


def roundtrip(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What a peer receives when ``tensor`` is sent with codec ``name`` (compress, then extract, locally).

    The daemon's error feedback keeps ``tensor - roundtrip(name, tensor)`` for the next round.
    """
    codec = make_compression(name)
    src = tensor.detach()
    out = codec.extract(codec.compress(src.cpu(), CompressionInfo.from_tensor(src.cpu()), allow_inplace=False))
    return out.to(device=tensor.device, dtype=tensor.dtype).reshape(tensor.shape)


class ByteCounter:
    """Bytes sent / received by an averager; shared memory, so counts made in its forked process are visible here.

    Must be created before the averager process starts (the fork copies the handles).
    """

    def __init__(self) -> None:
        self._sent = mp.Value(ctypes.c_int64, 0)
        self._received = mp.Value(ctypes.c_int64, 0)
        self._codec_s = mp.Value(ctypes.c_double, 0.0)  # seconds spent in compress/extract, summed over threads

    def add_sent(self, n: int) -> None:
        with self._sent.get_lock():  # compress/extract run in executor threads of the averager process
            self._sent.value += n

    def add_received(self, n: int) -> None:
        with self._received.get_lock():
            self._received.value += n

    def add_codec_time(self, seconds: float) -> None:
        with self._codec_s.get_lock():
            self._codec_s.value += seconds

    def snapshot(self) -> tuple[int, int]:
        return int(self._sent.value), int(self._received.value)

    def codec_seconds(self) -> float:
        return float(self._codec_s.value)

    def wait_quiet(self, quiet: float = 0.05, limit: float = 1.0) -> None:
        """Wait (at most ``limit`` s) until no byte was counted for ``quiet`` s.

        A peer's all-reduce returns once its own averaged parts are back, while, as a reducer, it may still be
        streaming results to slower peers; without this wait those bytes land in the next round's count.
        """
        end, last = time.monotonic() + limit, self.snapshot()
        while time.monotonic() < end:
            time.sleep(quiet)
            now = self.snapshot()
            if now == last:
                return
            last = now


class CountingCompression(CompressionBase):
    """Delegates to a hivemind codec and counts the serialized size of every message it makes or reads."""

    def __init__(self, inner: CompressionBase, counter: ByteCounter) -> None:
        self.inner, self.counter = inner, counter
        self.compression_type = inner.compression_type

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        start = time.perf_counter()
        message = self.inner.compress(tensor, info, allow_inplace)
        self.counter.add_codec_time(time.perf_counter() - start)
        self.counter.add_sent(message.ByteSize())
        return message

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        self.counter.add_received(serialized_tensor.ByteSize())
        start = time.perf_counter()
        tensor = self.inner.extract(serialized_tensor)
        self.counter.add_codec_time(time.perf_counter() - start)
        return tensor

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)

    def __repr__(self) -> str:
        return f"Counting({self.inner!r})"
