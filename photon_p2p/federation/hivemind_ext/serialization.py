"""hivemind's codec registry, counted: mirrors hivemind/compression/serialization.py."""

from __future__ import annotations

from hivemind.compression import serialization

from photon_p2p.federation.compression import ByteCounter, CountingCompression


def count_registry_traffic(counter: ByteCounter) -> None:
    """Count the traffic that hivemind (de)serializes through its codec registry rather than our codec object.

    In an all-reduce, a peer's own parts go out through the codec object passed to the averager, but the averaged
    parts it returns as a reducer and everything it receives go through ``serialize_torch_tensor`` /
    ``deserialize_torch_tensor``, which look codecs up in a module-level registry. Call this only inside the
    averager's own (forked) process, so that the parent process's registry stays untouched.
    """
    registry = serialization._BASE_COMPRESSION_TYPES
    for key, codec in list(registry.items()):
        if not isinstance(codec, CountingCompression):
            registry[key] = CountingCompression(codec, counter)
