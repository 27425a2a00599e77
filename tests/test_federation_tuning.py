"""The averager's throughput settings keep its semantics: finite checks, partial detection, part layout, phases."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from photon_p2p.federation.compression import make_compression
from photon_p2p.federation.hivemind_ext.averager import HIVEMIND_DEFAULTS, TUNED, PhaseClock
from photon_p2p.federation.util import all_finite


@pytest.mark.parametrize("fast", [True, False])
def test_all_finite_is_exact_even_when_the_sum_overflows(fast):
    big = torch.full((10,), 3e38)  # every value finite, their sum is inf: the fast path must fall back
    assert all_finite([torch.randn(100), big], fast=fast)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.randn(100)
        t[37] = bad
        assert not all_finite([torch.randn(5), t], fast=fast)
    opposite = torch.tensor([float("inf"), float("-inf")])  # sums to nan
    assert not all_finite([opposite], fast=fast)


def _stamp(clock: PhaseClock) -> None:
    clock.stamp("group_assembled")


def test_phase_clock_is_shared_with_a_forked_process():
    clock = PhaseClock()
    proc = mp.get_context("fork").Process(target=_stamp, args=(clock,))
    proc.start()
    proc.join(30)
    stamps = clock.read()
    assert stamps["group_assembled"] > 0 and stamps["step_received"] == 0
    clock.reset()
    assert not any(clock.read().values())


def test_live_group_target_counts_fresh_running_peers(monkeypatch):
    import photon_p2p.federation.hivemind_ext.progress_tracker as ap

    def row(peer, state="running", last_seen=1.0):
        return {"peer_id": peer, "state": state, "last_seen": last_seen, "interval": 30.0}

    rows = [row("me"), row("a"), row("b"), row("gone", state="left"), row("dead", last_seen=1000.0)]
    monkeypatch.setattr(ap, "read_records", lambda dht, run_id, timeout: rows)
    assert ap.live_group_target(None, "run", "me", target=8, min_size=2, timeout=1.0) == 3
    assert ap.live_group_target(None, "run", "me", target=2, min_size=2, timeout=1.0) == 2  # never above target
    assert ap.live_group_target(None, "run", "me", target=8, min_size=4, timeout=1.0) == 8  # too few: as before
    rows[:] = []  # no heartbeats (e.g. a bare averager): the configured target
    assert ap.live_group_target(None, "run", "me", target=8, min_size=2, timeout=1.0) == 8

    def fail(*_):
        raise TimeoutError

    monkeypatch.setattr(ap, "read_records", fail)
    assert ap.live_group_target(None, "run", "me", target=8, min_size=2, timeout=1.0) == 8
