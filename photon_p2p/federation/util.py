"""Small helpers of the federation layer that need no hivemind: bounded calls, short error text, finite checks."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


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
