"""Detecting a partial all-reduce: parts whose reducer failed come back holding this peer's own values.

hivemind splits the flattened tensors into parts and gives each group member a contiguous range of them to
reduce; when a member dies mid-way, the others keep their local values for its unfinished parts and report
success. We rebuild the same part layout (hivemind's TensorPartContainer rule) and look for parts that came back
bit-identical to what we sent. The part size must be the one the averager was given (AveragerTuning).
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionBase, CompressionInfo


def part_owners(tensors: list[torch.Tensor], fractions: list[float], codec: CompressionBase,
                part_size_bytes: int = DEFAULT_PART_SIZE_BYTES) -> list[list[tuple[int, int, int]]]:
    """For each tensor, its parts as (start, end, owner index), exactly as hivemind assigns them."""
    total = sum(t.numel() for t in tensors)
    pivots = (np.cumsum(fractions) / np.sum(fractions) * total).astype(np.int64)
    pivots[-1] = total
    length, peer, out = 0, 0, []
    for i, t in enumerate(tensors):
        info = CompressionInfo.from_tensor(t, key=i)
        part_size = int(part_size_bytes / (t.element_size() * codec.estimate_compression_ratio(info)))
        parts = []
        for start in range(0, t.numel(), part_size):
            size = min(part_size, t.numel() - start)
            owner = peer
            if length + size > pivots[peer]:
                # a part straddling two peers' ranges goes to the one with the largest overlap
                first, overlaps = peer, [pivots[peer] - length]
                while length + size > pivots[peer]:
                    peer += 1
                    overlaps.append(min(length + size, pivots[peer]) - pivots[peer - 1])
                owner = first + int(np.argmax(overlaps))
            parts.append((start, start + size, owner))
            length += size
        out.append(parts)
    return out


def unaveraged_parts(sent: list[torch.Tensor], received: list[torch.Tensor], gathered: dict[str, dict],
                     codec: CompressionBase, me: str | None = None, part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
                     probe: bool = True, clear: bool = False) -> tuple[float, list[str]]:
    """(fraction of values that were not averaged, peers whose parts those were) for a finished all-reduce.

    ``clear``: zero the stale parts of ``received`` in place, so the caller's outer step leaves those values
    where the whole group already agrees (its shared global model) instead of moving each survivor by its own Δ.

    ``probe``: first compare three values of every part at once; only parts whose probes all match (a stale part,
    or a legitimately unchanged one) are compared in full. Same answer, one pass over the data fewer.
    """
    peers = list(gathered)  # hivemind returns the gathered data in the group's order, which sets the layout
    if len(peers) < 2:
        return 0.0, []
    # Same load balancing as hivemind: client-mode peers reduce nothing, everyone else an equal share.
    bandwidths = [0.0 if isinstance(g, dict) and g.get("client") else None for g in gathered.values()]
    if all(b == 0.0 for b in bandwidths):
        return 0.0, []
    fractions = load_balance_peers(sum(t.numel() for t in received), bandwidths, 0)
    stale, failed, total = 0, set(), 0
    for before, after, parts in zip(sent, received, part_owners(received, list(fractions), codec, part_size_bytes)):
        flat_before = before.detach().reshape(-1).to("cpu", after.dtype)
        flat_after = after.reshape(-1)
        total += flat_after.numel()
        parts = [p for p in parts if peers[p[2]] != me]  # our own parts are reduced locally, never go missing
        if probe and parts:
            changed = _probe_changed(flat_before, flat_after, parts)
            parts = [p for p, c in zip(parts, changed) if not c]
        for start, end, owner in parts:
            b, a = flat_before[start:end], flat_after[start:end]
            # an all-zero part (e.g. a frozen tensor) is legitimately unchanged by averaging
            if torch.equal(a, b) and bool(b.any()):
                stale += end - start
                failed.add(peers[owner])
                if clear:
                    flat_after[start:end] = 0
    return (stale / total if total else 0.0), sorted(failed)


def _probe_changed(before: torch.Tensor, after: torch.Tensor, parts: list[tuple[int, int, int]]) -> list[bool]:
    """For each part, whether its first, middle or last value changed: then it was certainly averaged."""
    index = torch.tensor([[s, (s + e - 1) // 2, e - 1] for s, e, _ in parts], dtype=torch.long)
    return (before[index] != after[index]).any(dim=1).tolist()
