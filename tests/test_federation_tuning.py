"""The averager's throughput settings keep its semantics: finite checks, partial detection, part layout, phases."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from photon_p2p.federation.averager_process import HIVEMIND_DEFAULTS, TUNED, PhaseClock, all_finite
from photon_p2p.federation.compression import make_compression
from photon_p2p.federation.partial import part_owners, unaveraged_parts


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


@pytest.mark.parametrize("tuning", [TUNED, HIVEMIND_DEFAULTS])
def test_probing_finds_the_same_stale_parts_as_a_full_comparison(tuning):
    part = tuning.part_size_bytes // 4
    sent = [torch.randn(7 * part + 123), torch.randn(3, part // 3 + 5), torch.zeros(2 * part)]
    received = [t.clone() for t in sent]
    gathered = {"me": {"round": 1}, "alive": {"round": 1}, "dead": {"round": 1}, "client": {"client": True}}
    codec = make_compression("none")
    layout = part_owners(received, [1.0, 1.0, 1.0, 0.0], codec, tuning.part_size_bytes)
    assert sum(len(p) for p in layout) > 6  # several parts per peer at this part size
    for t_index, parts in enumerate(layout):
        for n, (start, end, owner) in enumerate(parts):
            flat = received[t_index].reshape(-1)
            if owner == 1 and n % 2:  # averaged, but only between its probes: the full comparison decides
                flat[start + 1] += 1.0
            elif owner == 1:
                flat[start:end] += 1.0
    full = unaveraged_parts(sent, received, gathered, codec, me="me", part_size_bytes=tuning.part_size_bytes,
                            probe=False)
    probed = unaveraged_parts(sent, received, gathered, codec, me="me", part_size_bytes=tuning.part_size_bytes)
    assert probed == full and full[1] == ["dead"] and 0.0 < full[0] < 1.0


def test_tuned_part_layout_matches_hivemind():
    from hivemind.averaging.partition import TensorPartContainer

    tensors = [torch.randn(3 * TUNED.part_size_bytes // 4 + 17), torch.randn(1000)]
    codec = make_compression("fp16")  # part sizes count compressed bytes
    container = TensorPartContainer(tensors, [1.0, 1.0], compression=codec, part_size_bytes=TUNED.part_size_bytes)
    ours: dict[int, list[torch.Tensor]] = {}
    for t_index, parts in enumerate(part_owners(tensors, [1.0, 1.0], codec, TUNED.part_size_bytes)):
        for start, end, owner in parts:
            ours.setdefault(owner, []).append(tensors[t_index].reshape(-1)[start:end])
    for owner, theirs in enumerate(container._input_parts_by_peer):
        assert [len(t) for t in ours.get(owner, [])] == [len(t) for t, _ in theirs]


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
    import photon_p2p.federation.averager_process as ap

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
