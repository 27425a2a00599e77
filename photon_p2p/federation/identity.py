"""fingerprint: the sha256 that says two peers hold one model (kept free of hivemind, like global_state)."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """sha256 (hex) of the tensors' exact bytes, shapes and dtypes: equal iff two peers hold the same state."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().data)
    return h.hexdigest()
