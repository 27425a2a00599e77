"""Every deadline a test waits under comes from here: PHOTON_TEST_TIME_SCALE (default 1) stretches them all.

A test waits for the condition it asserts (a poll loop, a process's exit, a peer's message) and fails only
when that condition has not come by its deadline. On a machine slower or busier than a quiet 2-core one, raise
the scale (e.g. PHOTON_TEST_TIME_SCALE=2) instead of editing numbers; conftest.py scales pytest-timeout's
limits by the same factor, so a stretched wait is never cut short by the per-test timeout.
"""

from __future__ import annotations

import os


def _scale() -> float:
    raw = os.environ.get("PHOTON_TEST_TIME_SCALE", "").strip() or "1"
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 1:  # conftest.py turns this into pytest's one-line usage error
        raise ValueError(f"PHOTON_TEST_TIME_SCALE must be a number >= 1, got '{raw}'")
    return value


SCALE = _scale()


def within(seconds: float) -> float:
    """A test's deadline of ``seconds`` on a quiet machine, stretched by PHOTON_TEST_TIME_SCALE."""
    return seconds * SCALE
