"""Pseudo-gradient averaging between real peer processes on 127.0.0.1 (hivemind DHT + DecentralizedAverager)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from peer_helpers import PeerPool, make_tensors, spawn  # noqa: F401  (spawn is a fixture)
from deadlines import within

SHAPES = [[256, 256], [40000]]
TRIO_AVERAGERS = {
    # target = min = 3: the group starts as soon as all three have joined, and never without one of them
    "none": {"compression": "none", "target_group_size": 3, "min_group_size": 3},  # transport auto: gloo here
    "hivemind": {"compression": "none", "transport": "hivemind", "target_group_size": 3, "min_group_size": 3},
    "uint8": {"compression": "uint8", "target_group_size": 3, "min_group_size": 3},
    "blockwise8": {"compression": "blockwise8", "target_group_size": 3, "min_group_size": 3},
    "rounds": {"target_group_size": 2, "min_group_size": 2, "matchmaking_time": 1.0, "round_deadline": 4.0},
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    pool = PeerPool(tmp_path_factory.mktemp("trio"))
    try:
        yield pool.swarm(3, {"shapes": SHAPES, "averagers": TRIO_AVERAGERS})
    finally:
        pool.reap()


def run_round(peers, averager: str, rounds, weights, seeds, out_dir: Path, timeout: float = 30):
    """Every peer averages its seeded tensors at the same moment; returns (results, tensors after) per peer."""
    outs = [out_dir / f"{averager}-{i}-{time.monotonic_ns()}.pt" for i in range(len(peers))]
    for peer, r, w, s, out in zip(peers, rounds, weights, seeds, outs):
        peer.send(cmd="average", averager=averager, round=r, weight=w, seed=s, out=str(out))
    results = [peer.expect("averaged", timeout) for peer in peers]
    return results, [torch.load(out) for out in outs]


def weighted_mean(weights, seeds):
    tensors = [make_tensors(SHAPES, s) for s in seeds]
    return [sum(w * t[i] for w, t in zip(weights, tensors)) / sum(weights) for i in range(len(SHAPES))]


@pytest.mark.timeout(60)
def test_three_peers_hold_exactly_the_weighted_mean(trio, tmp_path):
    weights, seeds = [1.0, 2.0, 5.0], [11, 12, 13]
    results, after = run_round(trio, "none", [1, 1, 1], weights, seeds, tmp_path)
    expected = weighted_mean(weights, seeds)
    for res, tensors in zip(results, after):
        assert not res["solo"] and res["group_size"] == 3 and res["reason"] == "", res
        assert res["weight_total"] == pytest.approx(8.0) and len(set(res["peers"])) == 3
        assert res["bytes_sent"] > 0 and res["bytes_received"] > 0
        assert res["transport"] == "gloo", res  # every member reachable and uncompressed: the bulk path
        for got, exp in zip(tensors, expected):
            torch.testing.assert_close(got, exp, atol=1e-6, rtol=0)
        for got, first in zip(tensors, after[0]):
            assert torch.equal(got, first)  # every member holds the very same bytes


@pytest.mark.timeout(60)
def test_the_hivemind_transport_gives_the_same_mean_as_gloo(trio, tmp_path):
    weights, seeds = [2.0, 1.0, 1.0], [41, 42, 43]
    via_gloo, gloo_after = run_round(trio, "none", [5, 5, 5], weights, seeds, tmp_path)
    via_hivemind, hivemind_after = run_round(trio, "hivemind", [5, 5, 5], weights, seeds, tmp_path)
    assert {r["transport"] for r in via_gloo} == {"gloo"} and {r["transport"] for r in via_hivemind} == {"hivemind"}
    for tensors in hivemind_after[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tensors, hivemind_after[0]))
    for a, b in zip(gloo_after[0], hivemind_after[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the same mean, summed in another order
    # Together the members move 2(n-1) vectors either way (a ring, or all-to-all + all-gather, or hivemind's
    # butterfly, whose per-member share follows its load balancing, so only the group's total compares); hivemind
    # adds its per-part message overhead, the gloo paths a weight and some padding.
    payload = 2 * 2 * sum(torch.Size(s).numel() for s in SHAPES) * 4
    for results in (via_gloo, via_hivemind):
        assert payload <= sum(r["bytes_sent"] for r in results) <= 1.25 * payload, results


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec, tolerance", [("uint8", 0.05), ("blockwise8", 0.03)])
def test_8bit_codecs_agree_within_codec_error_and_send_4x_less(trio, tmp_path, codec, tolerance):
    weights, seeds = [3.0, 1.0, 2.0], [21, 22, 23]
    expected = weighted_mean(weights, seeds)
    # On a loaded 2-core machine a reducer occasionally misses its chunk deadline; that round is then reported
    # as partial (its share left un-updated), a legitimate outcome covered by the SIGKILL test. This test is
    # about the codecs, so it asks for a complete round, up to three tries, and checks that one.
    for attempt in range(3):
        plain, _ = run_round(trio, "none", [2 + 2 * attempt] * 3, weights, seeds, tmp_path)
        results, after = run_round(trio, codec, [2 + 2 * attempt] * 3, weights, seeds, tmp_path)
        if all(r["partial"] == 0 for r in plain + results):
            break
    for res, tensors in zip(results, after):
        assert not res["solo"] and res["group_size"] == 3, res
        for got, exp in zip(tensors, expected):
            assert float((got - exp).norm() / exp.norm()) < tolerance
        if all(r["partial"] == 0 for r in results):
            for got, first in zip(tensors, after[0]):
                assert torch.equal(got, first)  # the reducers sent every member the same compressed average
    sent_plain, sent_8bit = sum(r["bytes_sent"] for r in plain), sum(r["bytes_sent"] for r in results)
    assert sent_8bit > 0 and 3.0 < sent_plain / sent_8bit < 5.5, (sent_plain, sent_8bit)
    assert sum(r["bytes_received"] for r in results) == sent_8bit  # every byte sent in the group is received


@pytest.mark.timeout(60)
def test_peers_at_different_rounds_never_group(trio, tmp_path):
    seeds = [31, 32]
    results, after = run_round(trio[:2], "rounds", [3, 4], [1.0, 1.0], seeds, tmp_path)
    for res, tensors, seed in zip(results, after, seeds):
        assert res["solo"] and res["group_size"] == 1 and res["bytes_sent"] == 0, res
        for got, mine in zip(tensors, make_tensors(SHAPES, seed)):
            assert torch.equal(got, mine)  # untouched: the caller applies its own Δ


@pytest.mark.timeout(60)
def test_gathered_round_mismatch_discards_the_result(trio, tmp_path):
    # Rounds 2**32 apart share a group key (the key holds the round mod 2**32), so only the gathered
    # metadata can tell them apart: the leader refuses the other round's request (matchmaking), and a group that
    # assembled anyway would be thrown away by both ("round mismatch"). Nothing is averaged either way.
    seeds = [41, 42]
    results, after = run_round(trio[:2], "rounds", [7, 7 + 2**32], [1.0, 1.0], seeds, tmp_path)
    for res, tensors, seed in zip(results, after, seeds):
        assert res["solo"] and res["reason"] in ("no group found", "round mismatch"), res
        for got, mine in zip(tensors, make_tensors(SHAPES, seed)):
            assert torch.equal(got, mine)


@pytest.mark.timeout(90)
def test_joiner_downloads_the_state_a_peer_serves(spawn, tmp_path):
    meta = {"round": 5, "run_id": "test", "inner_step": 640}
    server = spawn({"shapes": SHAPES, "state_meta": meta, "state_seed": 77})
    maddrs = server.expect("ready", within(60))["maddrs"]
    joiner = spawn({"shapes": SHAPES, "initial_peers": maddrs[:1], "state_seed": 78})
    joiner.expect("ready", within(60))
    out = tmp_path / "state.pt"
    joiner.send(cmd="load_state", timeout=15, out=str(out))
    got = joiner.expect("state", within(30))
    assert got["meta"] == {**meta, "served_by": server.ready["peer_id"]}  # who served it: our word, not its
    for got_t, exp in zip(torch.load(out), make_tensors(SHAPES, 77)):
        assert torch.equal(got_t, exp)


@pytest.mark.timeout(90)
def test_a_state_far_larger_than_the_model_is_refused_mid_download(spawn, tmp_path):
    # issue 24, item 13: a server could stream any number of bytes into a joiner's memory
    server = spawn({"shapes": SHAPES, "state_meta": {"round": 5}, "state_shapes": [[4_000_000]]})
    maddrs = server.expect("ready", within(60))["maddrs"]
    joiner = spawn({"shapes": SHAPES, "initial_peers": maddrs[:1]})
    joiner.expect("ready", within(60))
    joiner.send(cmd="load_state", timeout=15, out=str(tmp_path / "state.pt"))
    assert joiner.expect("state", within(30))["meta"] is None


@pytest.mark.slow  # ~15 s each: the default suite stays under 10 minutes on 2 cores
@pytest.mark.timeout(120)
@pytest.mark.parametrize("hang", [0.0, 10.0], ids=["fails", "hangs-past-the-deadline"])
def test_a_member_that_breaks_gloo_sends_its_group_to_hivemind_for_the_next_rounds(spawn, tmp_path, hang):
    # issue 24 (bench/scenarios.py adversary --attack gloo-weights): one member that fails every gloo collective
    # made every round of its group fail at the deadline; the members now back off gloo after a failure
    # (bulk.BulkBackoff)
    fed = {"compression": "none", "target_group_size": 3, "min_group_size": 3, "allreduce_timeout": within(4.0),
           "round_deadline": within(8.0)}
    first = spawn({"shapes": SHAPES, "averagers": {"main": fed}})
    maddrs = first.expect("ready", within(60))["maddrs"]
    tried_gloo = tmp_path / "gloo-tries.txt"
    peers = [first] + [spawn({"shapes": SHAPES, "averagers": {"main": fed}, "initial_peers": maddrs[:1],
                              **({"break_gloo": str(tried_gloo), "break_gloo_hang": hang} if i == 1 else {})})
                       for i in range(2)]
    for p in peers[1:]:
        p.expect("ready", within(60))
    (tmp_path / "r").mkdir()
    tried = run_round(peers, "main", [1, 1, 1], [1.0] * 3, [1, 2, 3], tmp_path / "r", timeout=within(40))[0]
    assert all(r["transport"] != "gloo" for r in tried), tried  # nobody averaged over gloo in round 1
    results, after = run_round(peers, "main", [2, 2, 2], [1.0] * 3, [4, 5, 6], tmp_path / "r", timeout=within(40))
    for res in results:
        assert not res["solo"] and res["group_size"] == 3 and res["transport"] == "hivemind", res
    for tensors in after[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[0]))
    # round 1's first attempt was the only gloo one: its retry and round 2 went straight to hivemind
    assert tried_gloo.read_text().split() == ["gloo"]


@pytest.mark.timeout(90)
def test_a_state_cut_short_is_refused_not_taken_for_another_model(spawn, tmp_path):
    # hivemind ends a download whose server exited mid-stream as if it were whole: a joiner of the test suite
    # once got a truncated list and stopped on "different model shape". The server says how many it sends.
    server = spawn({"shapes": SHAPES, "state_meta": {"round": 5, "n_tensors": 3}, "state_shapes": [[4], [4]]})
    maddrs = server.expect("ready", within(60))["maddrs"]
    joiner = spawn({"shapes": SHAPES, "initial_peers": maddrs[:1]})
    joiner.expect("ready", within(60))
    joiner.send(cmd="load_state", timeout=15, out=str(tmp_path / "state.pt"))
    assert joiner.expect("state", within(30))["meta"] is None


@pytest.mark.timeout(150)
def test_sigkill_of_one_of_four_peers_mid_allreduce(spawn, tmp_path):
    fed = {"target_group_size": 4, "min_group_size": 4, "allreduce_timeout": 8.0, "round_deadline": 12.0}
    shapes = [[4_000_000]]  # 16 MB per peer: long enough on loopback to be killed mid-transfer
    peers = spawn.swarm(4, {"shapes": shapes, "averagers": {"main": fed}})
    outs = [tmp_path / f"out{i}.pt" for i in range(4)]
    for i, (peer, out) in enumerate(zip(peers, outs)):
        peer.send(cmd="average", round=1, weight=1.0 + i, seed=50 + i, out=str(out), announce_traffic=(i == 3))
    peers[3].expect("traffic", within(30))
    os.killpg(peers[3].pid, signal.SIGKILL)  # the victim's whole process group, as a machine failure would
    killed_at = time.monotonic()
    for peer, out in zip(peers[:3], outs):
        res = peer.expect("averaged", fed["allreduce_timeout"] + 10)
        assert res["finite"], res
        # Usually the group finishes without the victim and its share gets no update (zero Δ, so the survivors
        # stay on one model); then the result must say so and blame the victim. On a loaded machine a survivor that reduced a
        # part while waiting on the victim can miss its own deadline too, so it may be blamed as well, but
        # only group members can be, and the victim always is.
        if res["partial"] > 0:
            group = {p.ready["peer_id"] for p in peers}
            assert peers[3].ready["peer_id"] in res["failed_peers"], res
            assert set(res["failed_peers"]) <= group and res["reason"].startswith("partial"), res
        tensors = torch.load(out)
        assert all(bool(torch.isfinite(t).all()) for t in tensors)
        zeros = sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
        assert zeros >= res["partial"] - 1e-9, (zeros, res)
    assert time.monotonic() - killed_at < fed["allreduce_timeout"] + 10


@pytest.mark.timeout(120)
def test_groups_reshuffle_between_rounds(spawn, tmp_path):
    # 4 peers in groups of 2: information only spreads through the swarm if the pairs change between rounds.
    fed = {"target_group_size": 2, "min_group_size": 2, "matchmaking_time": 1.0, "round_deadline": 6.0}
    peers = spawn.swarm(4, {"shapes": [[1000]], "averagers": {"main": fed}})
    index = {peer.ready["peer_id"]: i for i, peer in enumerate(peers)}
    pairings = []
    for round_no in range(8):
        results, _ = run_round(peers, "main", [round_no] * 4, [1.0] * 4, [1, 2, 3, 4], tmp_path)
        groups = {tuple(sorted(index[p] for p in r["peers"])) for r in results if not r["solo"]}
        if len(groups) == 2 and all(len(g) == 2 for g in groups):
            pairings.append(tuple(sorted(groups)))
    assert len(pairings) >= 4, pairings
    assert len(set(pairings)) >= 2, pairings


@pytest.mark.timeout(150)
def test_a_group_holding_two_models_averages_weights_and_leaves_on_one(spawn, tmp_path):
    # Two halves of a split swarm (global weights G1 and G2, fingerprints "x" and "y") meet in one group: the
    # round averages local weights θ = G − Δ (lossless, whatever the codec) and every member gets the same bytes.
    fed = {"target_group_size": 4, "min_group_size": 4, "compression": "blockwise8"}
    first = spawn({"shapes": SHAPES, "averagers": {"main": fed}, "global_seed": 101})
    maddrs = first.expect("ready", within(60))["maddrs"]
    peers = [first] + [spawn({"shapes": SHAPES, "averagers": {"main": fed}, "initial_peers": maddrs[:1],
                              "global_seed": 101 if i == 0 else 102}) for i in range(3)]
    for p in peers[1:]:
        p.expect("ready", within(60))
    globals_seeds, prints, seeds, weights = [101, 101, 102, 102], ["x", "x", "y", "y"], [61, 62, 63, 64], [1, 2, 3, 4]
    outs = [tmp_path / f"heal{i}.pt" for i in range(4)]
    for p, fp, s, w, out in zip(peers, prints, seeds, weights, outs):
        p.send(cmd="average", round=9, weight=float(w), seed=s, out=str(out), fingerprint=fp)
    results = [p.expect("averaged", within(60)) for p in peers]
    locals_ = [[g - d for g, d in zip(make_tensors(SHAPES, gs), make_tensors(SHAPES, s))]
               for gs, s in zip(globals_seeds, seeds)]
    expected = [sum(w * loc[i] for w, loc in zip(weights, locals_)) / sum(weights) for i in range(len(SHAPES))]
    after = [torch.load(out) for out in outs]
    for res in results:
        assert res["healed"] and not res["solo"] and res["group_size"] == 4, res
    if all(r["partial"] == 0 for r in results):
        for tensors in after:
            for got, exp, first_t in zip(tensors, expected, after[0]):
                torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
                assert torch.equal(got, first_t)


@pytest.mark.timeout(150)
def test_one_member_declaring_another_model_does_not_make_a_healing_round(spawn, tmp_path):
    # issue 24, item 3: a member declaring a fake fingerprint made the round average weights, with no claim
    # budget and no reducer check (its -θ then halved the model). Now one member's word heals nothing: the
    # round averages updates, as if it had declared the others' model.
    fed = {"target_group_size": 4, "min_group_size": 4}
    first = spawn({"shapes": SHAPES, "averagers": {"main": fed}, "global_seed": 101})
    maddrs = first.expect("ready", within(60))["maddrs"]
    peers = [first] + [spawn({"shapes": SHAPES, "averagers": {"main": fed}, "initial_peers": maddrs[:1],
                              "global_seed": 101}) for _ in range(3)]
    for p in peers[1:]:
        p.expect("ready", within(60))
    prints, seeds, outs = ["x", "x", "x", "fake"], [61, 62, 63, 64], [tmp_path / f"f{i}.pt" for i in range(4)]
    for p, fp, s, out in zip(peers, prints, seeds, outs):
        p.send(cmd="average", round=9, weight=1.0, seed=s, out=str(out), fingerprint=fp)
    results = [p.expect("averaged", within(60)) for p in peers]
    for res in results:
        assert not res["healed"] and not res["solo"] and res["group_size"] == 4, res
    expected = [sum(make_tensors(SHAPES, s)[i] for s in seeds) / 4 for i in range(len(SHAPES))]
    after = [torch.load(out) for out in outs]
    if all(r["partial"] == 0 for r in results):
        for got, exp in zip(after[0], expected):  # the mean of the updates, not of weights
            torch.testing.assert_close(got, exp, atol=1e-2, rtol=1e-2)


def grid_round(peers, tmp_path, round_no: int, weights, seeds, members, timeout: float = 60,
               later: dict | None = None):
    """One round with a members list (groups.py): each peer averages its seed's tensors with its weight.
    ``later``: {peer id: (stale members, seconds)}: that peer first holds the stale list, then the full one.
    Returns (results, tensors after, expected weighted mean)."""
    outs = [tmp_path / f"r{round_no}-{i}.pt" for i in range(len(peers))]
    for p, w, s, out in zip(peers, weights, seeds, outs):
        cmd = dict(cmd="average", round=round_no, weight=w, seed=s, out=str(out), members=members, target=2)
        stale = (later or {}).get(p.ready["peer_id"])
        if stale is not None:
            cmd.update(members=stale[0], members_later=members, later_s=stale[1])
        p.send(**cmd)
    results = [p.expect("averaged", timeout) for p in peers]
    return results, [torch.load(out) for out in outs], weighted_mean(weights, seeds)


def assert_one_exact_model(after, expected) -> None:
    for tensors in after:
        for got, exp, first_t in zip(tensors, expected, after[0]):
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
            assert torch.equal(got, first_t)


@pytest.mark.slow  # ~16-22 s: the default suite stays under 10 minutes on 2 cores (it was 9:59)
@pytest.mark.timeout(150)
def test_more_peers_than_the_group_size_still_end_on_one_model(spawn, tmp_path):
    # 4 live peers, groups of at most 2: rows {0,2} {1,3} average, then columns {0,1} {2,3} average the row
    # means. Every peer must hold exactly the global weighted mean, the same bytes on all four.
    fed = {"target_group_size": 2, "min_group_size": 2, "compression": "blockwise8"}
    peers = spawn.swarm(4, {"shapes": SHAPES, "averagers": {"main": fed}})
    members = [p.ready["peer_id"] for p in peers]
    results, after, expected = grid_round(peers, tmp_path, 3, [1.0, 2.0, 3.0, 4.0], [71, 72, 73, 74], members)
    for res in results:
        assert not res["solo"] and res["group_size"] == 4 and res["weight_total"] == pytest.approx(10.0), res
        assert len(res["peers"]) == 3  # its row partner and its column partner, besides itself
    if all(r["partial"] == 0 and not r["reason"] for r in results):
        for tensors in after:
            for got, exp, first_t in zip(tensors, expected, after[0]):
                assert float((got - exp).norm() / exp.norm()) < 0.03  # two 8-bit stages
                assert torch.equal(got, first_t)  # both columns computed the very same bytes


@pytest.mark.timeout(150)
def test_an_accepted_answer_slower_than_request_timeout_leaves_no_ghost(spawn, tmp_path):
    # matchmaking_time 0.2 ms makes request_timeout 0.1 ms (it is capped at half of it), shorter than any join
    # answer through p2pd, while straggler_wait keeps the window 3 s. hivemind's follower walked away at
    # request_timeout although its leader, whose group of 2 that acceptance filled, had already counted it: the
    # leader averaged with a ghost (partial) and the follower found no group. Under CPU load the same happens
    # at the usual 0.75-2.5 s (the grid test's intermittent group_size 2). matchmaking.py waits for the answer.
    fed = {"target_group_size": 2, "min_group_size": 2, "compression": "none", "transport": "hivemind",
           "matchmaking_time": 0.0002, "straggler_wait": within(3.0), "round_deadline": within(20.0)}
    peers = spawn.swarm(2, {"shapes": SHAPES, "averagers": {"main": fed}})
    members = [p.ready["peer_id"] for p in peers]
    outs = [tmp_path / f"g{i}.pt" for i in range(2)]
    for p, w, s, out in zip(peers, [1.0, 3.0], [61, 62], outs):
        p.send(cmd="average", round=7, weight=w, seed=s, out=str(out), members=members, target=2)
    results = [p.expect("averaged", within(60)) for p in peers]
    for res in results:
        assert not res["solo"] and res["group_size"] == 2 and res["partial"] == 0, res
    assert_one_exact_model([torch.load(out) for out in outs], weighted_mean([1.0, 3.0], [61, 62]))


@pytest.mark.timeout(150)
def test_three_peers_in_groups_of_two_all_reach_the_mean(spawn, tmp_path):
    # 3 peers, groups of at most 2: rows of 2 and 1. The peer alone in its row cannot form a hivemind group of
    # one; it must go straight to the column with its own Δ, not sit the round out while the other two average.
    fed = {"target_group_size": 2, "min_group_size": 2, "compression": "none"}
    peers = spawn.swarm(3, {"shapes": SHAPES, "averagers": {"main": fed}})
    members = [p.ready["peer_id"] for p in peers]
    # weights: a row's weight (2 peers) stays within clip's weight cap
    results, after, expected = grid_round(peers, tmp_path, 4, [2.0, 3.0, 2.5], [81, 82, 83], members)
    for res in results:
        assert not res["solo"] and res["group_size"] == 3 and res["weight_total"] == pytest.approx(7.5), res
        assert not res["clipped"], res  # honest rows: clipping (the default) leaves the exact mean
    assert_one_exact_model(after, expected)


@pytest.mark.slow  # ~16-22 s: the default suite stays under 10 minutes on 2 cores (it was 9:59)
@pytest.mark.timeout(150)
def test_peers_that_read_the_members_a_moment_apart_regroup_onto_one_grid(spawn, tmp_path):
    # Two of four peers read the round's members before each other's report had arrived: each holds a grid of 3
    # that the others do not. The grid's digest keeps them out of the others' rows (no mixed grids); their next
    # read sees all four, they regroup, and every peer ends on the same bytes: the exact weighted mean of 4.
    fed = {"target_group_size": 2, "min_group_size": 2, "compression": "none", "round_deadline": 20.0}
    peers = spawn.swarm(4, {"shapes": SHAPES, "averagers": {"main": fed}})
    members = sorted(p.ready["peer_id"] for p in peers)
    late = {members[2], members[3]}  # in the full grid, rows {0, 2} {1, 3}: each late peer's row partner is on time
    stale = {me: ([m for m in members if m not in late or m == me], 3.0) for me in late}
    results, after, expected = grid_round(peers, tmp_path, 5, [1.0, 2.0, 3.0, 4.0], [91, 92, 93, 94], members,
                                          timeout=within(90), later=stale)
    for res in results:
        assert not res["solo"] and res["group_size"] == 4 and res["weight_total"] == pytest.approx(10.0), \
            [(p.ready["peer_id"][-4:], p.ready["peer_id"] in late, r["reason"], r["group_size"]) for p, r in
             zip(peers, results)]
    assert_one_exact_model(after, expected)
