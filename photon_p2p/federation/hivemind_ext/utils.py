"""Helpers for the averager process that use hivemind's codec API (hivemind.compression)."""

from __future__ import annotations

import torch
from hivemind.compression import CompressionInfo


def warm_up_codec(codec) -> None:
    """Compress and extract a small tensor once, before serving any peer.

    bitsandbytes (blockwise8) and torch's quantizer load lazily on first use, which can take seconds on a loaded
    machine; inside a round that delay counts against next_chunk_timeout, so a peer waiting for this reducer's
    first part gives up and that part goes un-averaged.
    """
    inner = getattr(codec, "inner", codec)  # not through CountingCompression: these bytes never leave the process
    sample = torch.linspace(-1.0, 1.0, 8192)
    inner.extract(inner.compress(sample, CompressionInfo.from_tensor(sample, key=0)))
