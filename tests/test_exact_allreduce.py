"""ExactAllReduceRunner in one process (real p2p daemons, no DHT): every member ends on the same bytes."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P

from photon_p2p.federation.hivemind_ext.allreduce import ExactAllReduceRunner
from photon_p2p.federation.compression import make_compression


async def _allreduce(tensors_by_peer, weights, codec_name: str, part_size_bytes: int = 4096, ranks=None,
                     robust=None, claims=None, evil: dict | None = None, runners_out: list | None = None):
    """``evil``: {member index: factor}: that member, as a reducer, scales every average it returns."""
    # Each new member dials every earlier one, so every pair is connected before the first part is sent: with
    # only a common bootstrap, a loaded machine could leave two members unable to find each other for a minute.
    p2ps, maddrs = [], []
    for _ in tensors_by_peer:
        p2ps.append(await P2P.create(initial_peers=list(maddrs), host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        maddrs += await p2ps[-1].get_visible_maddrs()
    try:
        peers = [p.peer_id for p in p2ps]
        runners = []
        for p2p, tensors, weight in zip(p2ps, tensors_by_peer, weights):
            runner = ExactAllReduceRunner(p2p=p2p, servicer_type=ExactAllReduceRunner, prefix=None, group_id=b"g",
                                          tensors=tensors, weight=weight, ordered_peer_ids=peers,
                                          peer_fractions=(1.0,) * len(peers),
                                          compression=make_compression(codec_name), part_size_bytes=part_size_bytes,
                                          ranks=[(r, "") for r in ranks] if ranks else None,
                                          **({"robust": robust} if robust else {}),
                                          **({"claims": claims} if claims else {}))
            if evil and len(runners) in evil:
                honest_encode, factor = runner._encoded_average, evil[len(runners)]
                runner._encoded_average = lambda i, avg, enc=honest_encode, f=factor: enc(i, avg * f)
            await runner.add_p2p_handlers(p2p)
            runners.append(runner)

        async def run(runner):
            out = []
            async for averaged in runner:
                out.append(averaged.clone())
            return out

        if runners_out is not None:
            runners_out.extend(runners)
        return await asyncio.wait_for(asyncio.gather(*map(run, runners)), 60)
    finally:
        await asyncio.gather(*(p.shutdown() for p in p2ps))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec, tolerance", [("none", 1e-6), ("fp16", 1e-3), ("uint8", 0.05), ("blockwise8", 0.03)])
def test_every_member_gets_the_same_bytes(codec, tolerance):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 50), (3000,), (7,)]
    tensors = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    expected = [sum(w * t[i] for w, t in zip(weights, tensors)) / sum(weights) for i in range(len(shapes))]
    results = asyncio.run(_allreduce([[t.clone() for t in ts] for ts in tensors], weights, codec))
    for member in results[1:]:
        for a, b in zip(results[0], member):
            assert torch.equal(a, b)  # bit-identical, whatever the codec
    for got, exp in zip(results[0], expected):
        assert float((got.reshape(exp.shape) - exp).norm() / exp.norm()) < tolerance


@pytest.mark.timeout(90)
def test_a_round_logs_no_reducer_warning():
    """hivemind's reducer that ExactAllReduceRunner replaces said "received 0.0% of input tensors" when collected,
    in every round of every peer's log."""
    import gc
    import logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    partition = logging.getLogger("hivemind.averaging.partition")
    partition.addHandler(handler)
    try:
        asyncio.run(_allreduce([[torch.ones(300)], [torch.zeros(300)]], [1.0, 1.0], "none"))
        gc.collect()
    finally:
        partition.removeHandler(handler)
    assert not [m for m in seen if "Reducer" in m], seen


@pytest.mark.timeout(90)
def test_zero_weight_members_only_listen_and_order_fixes_the_bytes():
    # A column of the two-stage scheme: members carry their row mean with the row's weight, or weight 0.
    g = torch.Generator().manual_seed(1)
    a, b, c = ([torch.randn(5000, generator=g)] for _ in range(3))
    got = asyncio.run(_allreduce([a, [t.clone() for t in b], c], [2.0, 0.0, 3.0], "blockwise8", ranks=[1, 9, 0]))
    for member in got[1:]:
        assert torch.equal(member[0], got[0][0])
    expected = (2 * a[0] + 3 * c[0]) / 5
    assert float((got[0][0] - expected).norm() / expected.norm()) < 0.03


def test_grid_plans_cover_every_row_in_every_column():
    from photon_p2p.federation.groups import plan_groups

    for n in range(1, 40):
        for target in (2, 3, 4, 8):
            ids = [f"p{i:02d}" for i in range(n)]
            plans = [plan_groups(ids, me, target) for me in ids]
            if n <= target:
                assert all(p.stages == 1 for p in plans)
                continue
            rows: dict[int, list] = {}
            cols: dict[int, list] = {}
            for p in plans:
                rows.setdefault(p.row, []).append(p)
                cols.setdefault(p.column, []).append(p)
            assert all(len(r) <= target for r in rows.values())
            assert all(len(r) == plans[0].row_size(k) for k, r in rows.items())
            for c, members in cols.items():
                assert len(members) == plans[0].column_size(c)
                # exactly one member of every row carries that row's weight into each column
                assert sorted(p.row for p in members if p.designated) == list(range(plans[0].rows))
                # every member names the same co-members (what a stage waits for before giving up)
                assert {p.column_members() for p in members} == {tuple(sorted(p.me for p in members))}
            for k, members in rows.items():
                assert {p.row_members() for p in members} == {tuple(sorted(p.me for p in members))}


def test_a_grid_key_names_its_member_list_so_different_views_never_meet():
    from photon_p2p.federation.averaging import _grid_key, group_bits
    from photon_p2p.federation.groups import plan_groups

    ids = ["a", "b", "c", "d"]
    full = [plan_groups(ids, me, 2) for me in ids]
    assert len({p.digest for p in full}) == 1  # every member of one view derives the same digest
    stale = plan_groups(["a", "b", "c"], "c", 2)  # c had not seen d's report yet
    assert stale.digest != full[2].digest and _grid_key(stale) != _grid_key(full[2])
    # the same row index under two views is two different matchmaking keys; one group of everyone has no digest
    assert group_bits(7, 1, 0, stale.digest) != group_bits(7, 1, 0, full[2].digest)
    assert group_bits(7) == format(7, "032b")
    assert _grid_key(plan_groups(["a", "b"], "a", 4)) == _grid_key(plan_groups(["a", "b", "c"], "a", 4)) == (1,)
    # 3 peers in groups of 2: rows of 2 and 1, one column with both rows' designated members
    trio = [plan_groups(["a", "b", "c"], me, 2) for me in "abc"]
    alone = [p for p in trio if p.row_size() == 1]
    assert len(alone) == 1 and alone[0].designated and alone[0].column_size() == 3


def _norms(tensors_by_peer):
    return [float(torch.cat([t.flatten() for t in ts]).norm()) for ts in tensors_by_peer]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec", ["none", "blockwise8"])
def test_robust_reducers_clip_a_scaled_member_and_members_stay_bit_identical(codec):
    from photon_p2p.federation.robust import RobustSettings

    g = torch.Generator().manual_seed(2)
    base = torch.randn(6000, generator=g)
    tensors = [[base + 0.3 * torch.randn(6000, generator=g)] for _ in range(4)]
    honest = sum(t[0] for t in tensors[:3]) / 3
    tensors[3] = [tensors[3][0] * 1e4]
    runners = []
    got = asyncio.run(_allreduce(tensors, [1.0] * 4, codec, robust=RobustSettings("clip", 2.0),
                                 claims=_norms(tensors), runners_out=runners))
    for member in got[1:]:
        assert torch.equal(member[0], got[0][0])
    assert float((got[0][0] - honest).norm()) < float(honest.norm())  # bounded: not 2500 x the honest mean
    bad = str(runners[0].ordered_peer_ids[3])
    reducing = [r for i, r in enumerate(runners) if r.tensor_part_container.num_parts_by_peer[i] > 0]
    assert len(reducing) >= 2
    for r in reducing:  # every reducer saw the scaled chunk of its part and says so
        assert set(r.clipped()) == {bad} and r.clipped()[bad] < 1e-3, r.clipped()
    assert all(r.rejected() == [] for r in runners)


@pytest.mark.timeout(90)
def test_a_reducer_that_inflates_its_average_is_rejected_alike_by_every_member():
    from photon_p2p.federation.robust import RobustSettings

    g = torch.Generator().manual_seed(3)
    tensors = [[torch.randn(6000, generator=g)] for _ in range(3)]
    expected = sum(t[0] for t in tensors) / 3
    runners = []
    got = asyncio.run(_allreduce([[t.clone() for t in ts] for ts in tensors], [1.0] * 3, "none",
                                 robust=RobustSettings("clip", 2.0), claims=_norms(tensors), evil={2: 1e3},
                                 runners_out=runners))
    for member in got[1:]:
        assert torch.equal(member[0], got[0][0])  # one verdict, one model
    evil = str(runners[0].ordered_peer_ids[2])
    assert [r.rejected() for r in runners] == [[evil]] * 3
    out = got[0][0]
    zeroed = out == 0
    assert 0.2 < float(zeroed.float().mean()) < 0.5  # the evil reducer's share, no update there
    torch.testing.assert_close(out[~zeroed], expected[~zeroed])


def test_a_stage_gives_up_only_when_its_own_members_have_left_the_round():
    # Columns finish at different times: the swarm moving on to the next round must not make a column that
    # is still matching give up (that left 4 silos in groups of 2 on two models); its own members leaving must.
    from types import SimpleNamespace

    from photon_p2p.federation.clock import SwarmClock

    clock = object.__new__(SwarmClock)
    clock.tracker = SimpleNamespace(members={"a": 5, "b": 6, "c": 6, "d": 5},
                                    global_progress=SimpleNamespace(epoch=6))
    assert not clock.left(5, ("d",))  # my column partner is still in round 5
    assert clock.left(5, ("b", "c"))  # everyone I wait for is in round 6 already
    assert not clock.left(5, ("b", "e"))  # an unknown peer has not (provably) left
    assert clock.left(5, ())  # no plan: the swarm as a whole has moved past round 5
    assert not clock.left(6, ())


def test_a_silo_takes_h_steps_unless_its_speed_is_far_from_the_swarms():
    from photon_p2p.federation.protocol import speed_quota

    assert speed_quota(8, 0.0, [3.0]) == 8  # own speed unknown (first round)
    assert speed_quota(8, 3.0, []) == 8  # alone
    assert speed_quota(8, 3.3, [3.0, 2.8, 3.1]) == 8  # equally fast up to noise: exactly H, like a fixed H
    # two fast silos and one at half their speed: each trains about the same wall time
    fast, slow = speed_quota(6, 2.0, [2.0, 1.0]), speed_quota(6, 1.0, [2.0, 2.0])
    assert (fast, slow) == (6, 4)  # the fast ones are within the band of the mean (1.67); 6 x 0.6 = 3.6
    assert speed_quota(8, 4.0, [1.0, 1.0, 1.0]) == 18  # 8 x 4 / 1.75
    assert speed_quota(8, 0.01, [10.0]) == 1  # never zero steps


def test_a_silo_that_synced_mid_round_takes_only_what_is_left_of_it():
    from types import SimpleNamespace

    from hivemind.utils import get_dht_time

    from photon_p2p.federation.clock import SwarmClock

    now = get_dht_time()
    rec = lambda steps, epoch=7: SimpleNamespace(epoch=epoch, samples_accumulated=steps, time=now, samples_per_second=2.0)
    clock = object.__new__(SwarmClock)
    clock.steps_per_peer = 8
    clock.tracker = SimpleNamespace(dht=SimpleNamespace(peer_id="me"), measured_speed=2.0,
                                    global_progress=SimpleNamespace(num_peers=3),
                                    records={"a": rec(6), "b": rec(5), "me": rec(0), "old": rec(8, epoch=6)},
                                    members={"a": 7, "b": 7, "me": 7, "old": 6})
    assert clock.quota(7, 8) == 8  # a round begun with the others: the whole quota
    assert clock.quota(7, 8, late=True) == 2  # the members are 6 (median, upper) of 8 steps in: 2 are left
