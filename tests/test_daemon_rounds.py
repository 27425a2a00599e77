"""The daemon's round logic driven by an in-process fake swarm: clock, catch-up, healing, the non-finite guard."""

from __future__ import annotations

import threading
import time
import traceback
from typing import Callable

import pytest
import torch

from conftest import tiny_overrides
from fake_swarm import FakeNet, FakeSwarm, factory
from photon_p2p.config import load_config
from photon_p2p.daemon import PeerDaemon
from photon_p2p.ledger import RoundLedger
from photon_p2p.federation import FederationError
from photon_p2p.federation.identity import fingerprint
from photon_p2p.federation.swarm import check_state
from photon_p2p.metrics import read_metrics
from deadlines import within

pytestmark = pytest.mark.timeout(180)
_INIT = threading.Lock()  # model init draws from torch's global RNG: silos in threads must not interleave there


def make_daemon(tmp_path, data, net: FakeNet, name: str, slow: float = 0.0,
                hold: Callable[[], None] | None = None, **extra) -> PeerDaemon:
    """``slow``: seconds added to every inner step; ``hold``: called before every inner step (may block)."""
    overrides = {"name": name, "data.path": str(data), "federation.rounds": 2, "federation.local_steps": 4,
                 "federation.round_clock": "steps", "train.eval_every": 0, "federation.min_group_size": 2,
                 **extra}
    cfg = load_config([], tiny_overrides(tmp_path / name, **overrides))
    daemon = PeerDaemon(cfg, progress=False, make_swarm=factory(net, name))
    setup_once = daemon._setup_training

    def serialized_setup() -> None:
        with _INIT:
            setup_once()

    daemon._setup_training = serialized_setup
    if slow or hold:
        setup = daemon._setup_training

        def slowed() -> None:  # a silo with half the compute: every inner step takes longer
            setup()
            step = daemon.trainer.train_step

            def slow_step() -> float:
                if hold:
                    hold()
                time.sleep(slow)
                return step()
            daemon.trainer.train_step = slow_step

        daemon._setup_training = slowed
    return daemon


def run_all(daemons: list[PeerDaemon], timeout: float = 150) -> dict[str, object]:
    """Run daemons in threads (as separate silos would run), return each one's result or exception."""
    out: dict[str, object] = {}

    def go(d: PeerDaemon) -> None:
        try:
            out[d.cfg.name] = d.run()
        except Exception as e:  # the test inspects it
            out[d.cfg.name] = e

    threads = [threading.Thread(target=go, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a daemon did not finish"
    return out


def records(daemon: PeerDaemon, kind: str) -> list[dict]:
    return [r for r in read_metrics(daemon.run_dir) if r["kind"] == kind]


def rounds(daemon: PeerDaemon) -> list[dict]:
    return records(daemon, "round")


def test_group_rounds_leave_every_member_on_the_same_bytes(tmp_path, kjv_data):
    net = FakeNet()
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"train.seed": i}) for i, n in enumerate("abc")]
    out = run_all(daemons)
    assert len({out[d.cfg.name]["fingerprint"] for d in daemons}) == 1, out
    for d in daemons:
        assert out[d.cfg.name]["participation"] == 1.0
        assert all(not r["solo"] and r["group_size"] == 3 for r in rounds(d))
        assert d.fingerprint() == fingerprint(d.state.weights + d.state.outer.state_tensors())
        assert d.heartbeat()["fingerprint"] == d.fingerprint()


def test_swarm_clock_gives_a_slow_silo_fewer_steps_and_both_average_every_round(tmp_path, kjv_data):
    net = FakeNet()
    extra = {"federation.round_clock": "swarm", "federation.rounds": 3}
    fast = make_daemon(tmp_path, kjv_data, net, "fast", **extra)
    # twice the batch too: the quota is in steps (H scaled by measured speed), never in tokens (a token target
    # once made the big silo wait for twice the swarm's work, and it never caught up)
    slow = make_daemon(tmp_path, kjv_data, net, "slow", slow=0.15, **{**extra, "train.batch_size": 16})
    out = run_all([fast, slow])
    assert out["fast"]["fingerprint"] == out["slow"]["fingerprint"], out
    assert out["fast"]["participation"] == out["slow"]["participation"] == 1.0
    assert fast.trainer.step > slow.trainer.step  # the fast silo did more of the swarm's work
    assert slow.trainer.step >= 3  # ...and the slow one still contributed every round


def test_a_silo_that_misses_a_round_folds_its_work_and_is_back_next_round(tmp_path, kjv_data):
    # round 0: a and b average without c; c must not throw its work away and must be in round 1's group
    net = FakeNet(plan=lambda r, me: ["a", "b"] if r == 0 and me != "c" else (["c"] if r == 0 else None))
    daemons = [make_daemon(tmp_path, kjv_data, net, n) for n in "abc"]  # one initial model, as after joining
    out = run_all(daemons)
    late = rounds(daemons[2])
    assert late[0]["solo"], late
    assert not late[-1]["solo"] and late[-1]["group_size"] == 3, late
    syncs = [r for r in read_metrics(daemons[2].run_dir) if r["kind"] == "sync"]
    assert syncs, "the late silo should adopt the swarm's newer state"
    assert not any(r["healed"] for d in daemons for r in rounds(d))  # adopting it avoided a split
    assert len({out[d.cfg.name]["fingerprint"] for d in daemons}) == 1, out


@pytest.mark.parametrize("outer", [{"federation.outer_optimizer": "nesterov", "federation.outer_lr": 0.7},
                                   {"federation.outer_optimizer": "fedyogi", "federation.outer_lr": 0.01,
                                    "federation.outer_lr_schedule": "cosine"}], ids=["nesterov", "fedyogi-cosine"])
def test_a_split_swarm_heals_when_its_halves_meet(tmp_path, kjv_data, outer):
    """The backstop when the minority cannot download the majority's model: the next group holds both models and
    averages weights (healed)."""
    halves = {"a": ["a", "b"], "b": ["a", "b"], "c": ["c", "d"], "d": ["c", "d"]}
    net = FakeNet(plan=lambda r, me: halves[me] if r == 0 else None, targeted_downloads=False)
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"train.seed": i, "federation.outer_momentum": 0.9, **outer})
               for i, n in enumerate("abcd")]
    out = run_all(daemons)
    first = [rounds(d)[0] for d in daemons]
    assert first[0]["fingerprint"] != first[2]["fingerprint"]  # two models after round 0
    second = [rounds(d)[1] for d in daemons]
    assert all(r["healed"] and r["group_models"] == 2 for r in second), second
    assert len({out[d.cfg.name]["fingerprint"] for d in daemons}) == 1, out  # one model again, momentum included
    f = daemons[0].cfg.federation  # every peer applied the schedule's lr of the global round it stepped
    for d in daemons:
        stepped = [r for r in rounds(d) if not r["healed"]]
        assert [r["outer_lr"] for r in stepped] == [d.state.outer.lr_at(r["round"] - 1) for r in stepped]
        assert all(r["outer_lr"] <= f.outer_lr for r in stepped)


@pytest.mark.parametrize("split", ["pairs", "three-two"])
def test_a_visible_split_is_gone_before_the_next_round_averages(tmp_path, kjv_data, split):
    """G2: round 0 leaves two models (two pairs, or three and two). Before round 1 averages, the minority (ties:
    the larger fingerprint) adopts the majority's model, keeping its local work: round 1's group holds ONE model
    going in (no healing needed) and every peer leaves it on one model."""
    groups = {"pairs": {"a": ["a", "b"], "b": ["a", "b"], "c": ["c", "d"], "d": ["c", "d"]},
              "three-two": {"a": ["a", "b", "c"], "b": ["a", "b", "c"], "c": ["a", "b", "c"], "d": ["d", "e"],
                            "e": ["d", "e"]}}[split]
    net = FakeNet(plan=lambda r, me: groups[me] if r == 0 else None)
    # one initial model (as joiners download it); each silo still draws its own data (seed x silo name)
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"federation.rounds": 2}) for n in sorted(groups)]
    out = run_all(daemons)
    after0 = {d.cfg.name: rounds(d)[0]["fingerprint"] for d in daemons}
    assert len(set(after0.values())) == 2, after0
    second = [rounds(d)[1] for d in daemons]
    assert all(not r["healed"] and r["group_models"] == 1 and r["group_size"] == len(groups) for r in second), second
    adopted = {d.cfg.name for d in daemons if any(r["kind"] == "split" for r in read_metrics(d.run_dir))}
    if split == "three-two":
        assert adopted == {"d", "e"}
    else:
        loser = max(set(after0.values()))  # a tie: the smaller fingerprint wins
        assert adopted == {n for n, fp in after0.items() if fp == loser}
    assert len({o["fingerprint"] for o in out.values()}) == 1, out


def test_an_averaging_helper_trains_nothing_holds_the_model_and_moves_no_mean(tmp_path, kjv_data, capsys):
    """federation.helper: it takes no step, joins every group with weight 0 (the mean is the same bytes as the two
    trainers' alone) and leaves each round on the swarm's model, which it can then serve."""
    # one initial model everywhere (as joiners download it); each silo draws its own data (seed x silo name)
    pair_net = FakeNet()
    alone = [make_daemon(tmp_path / "pair", kjv_data, pair_net, n) for n in "ab"]
    net = FakeNet()
    daemons = [make_daemon(tmp_path / "helped", kjv_data, net, n) for n in "ab"]
    helper = make_daemon(tmp_path / "helped", kjv_data, net, "h", **{"federation.helper": True,
                                                                      "federation.round_clock": "swarm"})
    out = run_all(daemons + [helper])
    assert helper.trainer.step == 0 and helper.trainer.tokens == 0
    assert capsys.readouterr().out.count("averaging helper: trains nothing") == 1  # its banner says so
    for d in daemons + [helper]:
        assert [r["group_size"] for r in rounds(d)] == [3, 3], rounds(d)
    assert len({out[d.cfg.name]["fingerprint"] for d in daemons + [helper]}) == 1, out
    pair = run_all(alone)
    assert pair["a"]["fingerprint"] == out["a"]["fingerprint"]  # weight 0: the helper moved nothing


def test_a_helper_that_cannot_download_the_swarms_state_stops_instead_of_starting_its_own(tmp_path, kjv_data):
    """Only client-mode volunteers are live (they serve no state): a helper starting from scratch would average
    their updates onto a model of its own and serve it to joiners. It stops with a clear error instead."""
    net = FakeNet(barrier_timeout=3.0)
    silo = make_daemon(tmp_path, kjv_data, net, "a", **{"federation.rounds": 1})
    helper = make_daemon(tmp_path, kjv_data, net, "h", **{
        "federation.helper": True, "federation.round_clock": "swarm", "federation.state_sync_timeout": 2,
        "network.initial_peers": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"]})

    class ServesNothing(FakeSwarm):
        def load_state(self, *args, **kwargs):
            return None

    helper.make_swarm = lambda cfg, weights, state: ServesNothing(net, "h", weights, state)
    first = threading.Thread(target=silo.run)
    first.start()
    try:
        deadline = time.monotonic() + within(30)
        while not (net.peers.get("a") is not None and net.peers["a"].snapshot is not None):
            assert time.monotonic() < deadline, "the silo never started"
            time.sleep(0.05)
        with pytest.raises(FederationError, match="an averaging helper starts from the swarm's state"):
            helper.run()
    finally:
        first.join(60)


@pytest.mark.parametrize("who", ["one", "every"])
def test_a_partial_round_ends_on_one_model(tmp_path, kjv_data, who):
    """G1 through a partial round. "one": c's stream from one reducer broke (2 % of its values): it alone kept
    them unchanged, then adopted its group's model before recording the round, so round 0's records hold one
    model. "every": the reducer itself failed, every member kept the same values: one model, no download."""
    net = FakeNet(broken=lambda r, me: 0.02 if r == 0 and (who == "every" or me == "c") else 0.0)
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"train.seed": i}) for i, n in enumerate("abc")]
    out = run_all(daemons)
    first = {d.cfg.name: rounds(d)[0] for d in daemons}
    broken = {"c"} if who == "one" else {"a", "b", "c"}
    assert {n for n, r in first.items() if r["outcome"] == "partial" and r["partial"] == 0.02} == broken, first
    assert len({r["fingerprint"] for r in first.values()}) == 1, first  # one model on record after round 0
    mended = {d.cfg.name for d in daemons
              if any(r["kind"] == "split" and "partial" in r for r in read_metrics(d.run_dir))}
    assert mended == ({"c"} if who == "one" else set())
    assert len({o["fingerprint"] for o in out.values()}) == 1, out


def test_a_diverging_silo_rolls_back_never_sends_and_stops(tmp_path, kjv_data):
    net = FakeNet(barrier_timeout=10.0)
    honest = [make_daemon(tmp_path, kjv_data, net, n, **{"train.seed": i, "federation.rounds": 3})
              for i, n in enumerate("ab")]
    bad = make_daemon(tmp_path, kjv_data, net, "bad", **{"train.lr": 50.0, "train.grad_clip": 0.0,
                                                         "train.warmup_steps": 0, "federation.rounds": 3})
    out = run_all(honest + [bad])
    assert isinstance(out["bad"], FederationError) and "diverged" in str(out["bad"]), out["bad"]
    assert [r for r in read_metrics(bad.run_dir) if r["kind"] == "rollback"]
    assert not rounds(bad)  # it never finished a round, so it never sent a pseudo-gradient
    for d in honest:
        assert all(bool(torch.isfinite(g).all()) for g in d.state.weights)
        assert all("bad" not in r["peers"] for r in rounds(d))
    assert out["a"]["fingerprint"] == out["b"]["fingerprint"]


def test_downloaded_states_are_checked():
    t = [torch.ones(3), torch.zeros(2)]
    fp = fingerprint(t)
    meta = {"round": 4, "fingerprint": fp, "served_by": "s"}
    assert check_state(meta, t, [{"peer_id": "a", "round": 4, "fingerprint": fp}]) == ""
    assert "non-finite" in check_state({"round": 4}, [torch.tensor([float("nan")])], [])
    assert "does not match" in check_state({"round": 4, "fingerprint": "0" * 64}, t, [])
    other = fingerprint([torch.ones(3), torch.ones(2)])
    why = check_state(meta, t, [{"peer_id": p, "round": 4, "fingerprint": other} for p in "ab"])
    assert "differs from the 2 live peer(s)" in why
    # the server alone in the swarm: nothing to compare with
    assert check_state(meta, t, [{"peer_id": "s", "round": 4, "fingerprint": fp}]) == ""
    # others, but none at the state's round: one round past theirs is a swarm whose first peer is ahead;
    # further only from the peer this one joined from
    behind = [{"peer_id": "a", "round": 3, "fingerprint": other}, {"peer_id": "s", "round": 4, "fingerprint": fp}]
    assert check_state(meta, t, behind) == ""
    far = [{**behind[0], "round": 2}, behind[1]]
    assert "no live peer other than its server" in check_state(meta, t, far)
    assert check_state(meta, t, far, trusted="s") == ""


def test_a_far_future_state_with_its_own_heartbeat_replaces_no_model(tmp_path, kjv_data):
    # issue 24, item 1: "m" advertises round 99 in its heartbeat and serves a forged state for it. Its own word
    # vouched for it and every peer that synced adopted it; peers also tried to download it after every round.
    net = FakeNet(plan=lambda r, me: ["a", "b", "c"])
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"federation.rounds": 3}) for n in "abc"]
    forged_fp = {}

    def serve_forged():
        meta, tensors = daemons[0].shared_state()
        forged = [torch.zeros_like(t) for t in tensors]
        forged_fp["m"] = fingerprint(forged)
        return {**meta, "round": 99, "fingerprint": forged_fp["m"]}, forged

    from fake_swarm import FakeSwarm
    attacker = FakeSwarm(net, "m", [], serve_forged)
    attacker.start(lambda: {"round": 99, "fingerprint": forged_fp.get("m", ""), "state": "running"})
    out = run_all(daemons)
    serve_forged()
    assert {o["round"] for o in out.values()} == {3}, out
    held = {o["fingerprint"] for o in out.values()}
    assert len(held) == 1 and forged_fp["m"] not in held
    for d in daemons:
        assert not records(d, "sync") and not records(d, "refused_state")  # not even tried: nobody vouched for 99


# ---- federation.overlap: average round r while round r+1 trains --------------------------------------------------
def slowed_averaging(net: FakeNet, name: str, delay: float):
    """A fake swarm whose averages take ``delay`` seconds longer (a slow link), so that overlap has work to hide."""
    make = factory(net, name)

    def build(cfg, global_params, state_provider):
        swarm = make(cfg, global_params, state_provider)
        average = swarm.average

        def slow_average(*args, **kwargs):
            time.sleep(delay)
            return average(*args, **kwargs)

        swarm.average = slow_average
        return swarm

    return build


def test_overlap_trains_while_averaging_and_every_round_leaves_one_model(tmp_path, kjv_data):
    net = FakeNet()
    extra = {"federation.overlap": True, "federation.rounds": 4, "federation.local_steps": 4}
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"train.seed": i, **extra}) for i, n in enumerate("ab")]
    for d in daemons:
        d.make_swarm = slowed_averaging(net, d.cfg.name, 0.4)
    out = run_all(daemons)
    assert out["a"]["fingerprint"] == out["b"]["fingerprint"], out
    per_peer = [rounds(d) for d in daemons]
    assert [len(r) for r in per_peer] == [4, 4]
    for ra, rb in zip(*per_peer):  # bit-identical global state after every round, not only at the end
        assert ra["round"] == rb["round"] and ra["fingerprint"] == rb["fingerprint"], (ra, rb)
        assert not ra["solo"] and ra["group_size"] == 2
    for d in daemons:
        recs = rounds(d)
        assert all(r["compute_s"] > 0 and r["wait_s"] >= 0 for r in recs)
        # rounds 0-2 were averaged while the next round trained: the trainer did not sit through the 0.4 s
        assert all(r["wait_s"] < 0.4 for r in recs[:3]), [r["wait_s"] for r in recs]
        # ...and it took more than H steps per averaged round (the overlapped steps of the round in flight)
        assert d.trainer.step >= 4 * 4
        assert 0.0 < d.heartbeat()["utilization"] <= 1.0


def test_without_overlap_the_trainer_waits_for_every_average(tmp_path, kjv_data):
    net = FakeNet()
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"federation.rounds": 2}) for n in "ab"]
    for d in daemons:
        d.make_swarm = slowed_averaging(net, d.cfg.name, 0.4)
    run_all(daemons)
    for d in daemons:
        # the trainer sat through (almost) all of the 0.4 s: the averaging thread started it a moment before the
        # trainer began to wait (a metrics line in between), so allow that moment on a loaded machine
        assert all(r["wait_s"] >= 0.3 for r in rounds(d)), [r["wait_s"] for r in rounds(d)]
        assert d.trainer.step == 2 * 4
        # where the pause went, one "pause" record per round: the wait, then each part of finishing the round
        pauses = records(d, "pause")
        assert [p["round"] for p in pauses] == [r["round"] for r in rounds(d)]
        for p, r in zip(pauses, rounds(d)):
            parts = [p[k] for k in ("apply_s", "catch_up_s", "eval_s", "checkpoint_s", "swarm_s")]
            assert p["wait_s"] == r["wait_s"] and all(x >= 0 for x in parts), p
            assert p["total_s"] == pytest.approx(sum(parts), abs=1e-6), p
        assert pauses[-1]["eval_s"] > 0  # the last round evaluates the global model


def test_overlap_carries_the_work_done_meanwhile_onto_the_new_global_weights(tmp_path):
    from photon_p2p.config import FederationConfig
    from photon_p2p.global_state import GlobalState

    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    state = GlobalState(params, FederationConfig(outer_optimizer="fedavg", outer_lr=1.0))
    with torch.no_grad():
        params[0].sub_(torch.tensor([0.5, 0.5]))  # round r's local work
        delta = state.pseudo_gradient()
        base = [p.detach().clone() for p in params]
        params[0].sub_(torch.tensor([0.25, 0.0]))  # round r+1 trains while round r is averaged
    mean = [torch.tensor([0.1, 0.3])]  # what the group averaged instead of our own 0.5
    state.apply(mean, carry_from=base)
    assert torch.allclose(state.weights[0], torch.tensor([0.9, 1.7]))  # θ_g − mean Δ
    assert torch.allclose(params[0], torch.tensor([0.65, 1.7]))  # the new θ_g plus the 0.25 of round r+1
    assert torch.allclose(state.pseudo_gradient()[0], torch.tensor([0.25, 0.0]))  # next Δ: exactly that work
    assert state.round == 1 and delta[0].tolist() == [0.5, 0.5]


def test_sigint_during_a_background_average_saves_the_unaveraged_work(tmp_path, kjv_data):
    net = FakeNet()
    d = make_daemon(tmp_path, kjv_data, net, "a", **{"federation.overlap": True, "federation.rounds": 0})

    def build(cfg, global_params, state_provider):
        swarm = factory(net, "a")(cfg, global_params, state_provider)

        def never_matched(deltas, round_no, weight, *, stop, **kwargs):  # waits for a group that never forms
            stop.wait(60)
            from photon_p2p.federation.averaging import RoundResult
            return RoundResult(round_no, True, 1, [], weight, 0.0, 0, 0, "stopped")

        swarm.average = never_matched
        return swarm

    d.make_swarm = build
    thread = threading.Thread(target=d.run)
    thread.start()
    deadline = time.monotonic() + within(60)
    while d.inflight is None or d.ledger.round_steps < 2:  # round 0 is in the averager, round 1 is training
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    t0 = time.monotonic()
    d.stop.set()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    from photon_p2p.checkpoint import load_checkpoint

    saved = load_checkpoint(d.run_dir)["federation"]
    assert saved["round"] == 0  # nothing was averaged...
    # ...and none of the work is lost: round 0's tokens and the overlapped steps are both still to be averaged
    assert saved["round_tokens"] == d.trainer.tokens and saved["round_steps"] == d.trainer.step


def run_pocket(tmp_path, data, fast_rounds: int, serve: Callable[[PeerDaemon, int], None] | None = None):
    """a and b average as a pair for ``fast_rounds``; c and d fall behind together (each step waits until the pair
    is two rounds ahead, on any machine) and average as a pocket of their own for 2 rounds. ``serve(daemon, i)``
    may replace what the i-th of a, b serves. Every daemon must finish; returns (the pair, the pocket)."""
    pairs = {"a": ["a", "b"], "b": ["a", "b"], "c": ["c", "d"], "d": ["c", "d"]}
    net = FakeNet(plan=lambda r, me: pairs[me])
    fast = [make_daemon(tmp_path, data, net, n, **{"federation.rounds": fast_rounds}) for n in "ab"]
    for i, d in enumerate(fast):
        if serve is not None:
            serve(d, i)

    def behind() -> None:
        deadline = time.monotonic() + within(60)
        # a fast silo may still be setting up (setups are serialized): it has no round yet, count it as 0
        while min(f.round if hasattr(f, "state") else 0 for f in fast) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    slow = [make_daemon(tmp_path, data, net, n, slow=0.2, hold=behind, **{"federation.rounds": 2}) for n in "cd"]
    out = run_all(fast + slow)
    failed = {n: "".join(traceback.format_exception(v)) for n, v in out.items() if isinstance(v, Exception)}
    assert not failed, failed
    return fast, slow


def test_a_pocket_of_peers_that_fell_behind_together_adopts_the_swarms_state(tmp_path, kjv_data):
    # c and d slowed down at once and keep averaging with each other (a group is a group) while a and b move on:
    # two models under one run id. After a round of their own, they see live peers past it and adopt that state.
    fast, slow = run_pocket(tmp_path, kjv_data, fast_rounds=8)
    for d in slow:
        syncs = records(d, "sync")
        assert any("group at" in r["reason"] for r in syncs), syncs
        assert d.round > 2  # it jumped to the swarm's round instead of counting its pocket's rounds
    for d in fast:
        assert not records(d, "sync")  # the swarm ahead never goes back


def test_the_global_model_is_evaluated_past_each_multiple_of_eval_every_steps_not_every_round(tmp_path, kjv_data):
    # H = 4 < eval_every = 6: rounds end at steps 4, 8, 12, 16, 20; multiples of 6 are first passed at 8, 12 and
    # 20 (18), and the last round always evaluates; evaluating every round would cost the trainer 5 of them
    net = FakeNet()
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"federation.rounds": 5, "train.eval_every": 6,
                                                          "train.eval_batches": 1}) for n in "ab"]
    run_all(daemons)
    for d in daemons:
        evals = records(d, "eval")
        assert [e["step"] for e in evals] == [8, 12, 20], evals
        assert all(r["val_ppl"] > 0 for r in evals)


def test_a_finite_run_ends_at_the_swarms_round_on_one_model(tmp_path, kjv_data):
    """G5: federation.rounds is the swarm's round. c misses the last round (no group): the others, done, keep
    serving the state until c has caught up (downloaded it), so all three stop at round 3 on one model. Without
    that, they left at once and c ended on its own model."""
    net = FakeNet(plan=lambda r, me: ["a", "b"] if r == 2 else None)
    daemons = [make_daemon(tmp_path, kjv_data, net, n, **{"federation.rounds": 3}) for n in "abc"]
    out = run_all(daemons)
    assert {o["round"] for o in out.values()} == {3}, out
    assert len({o["fingerprint"] for o in out.values()}) == 1, out
    c = list(read_metrics(daemons[2].run_dir))
    assert [r["outcome"] for r in c if r["kind"] == "round"][-1] == "missed"
    assert any(r["kind"] == "sync" for r in c)  # it downloaded the swarm's round-3 state from a lingering peer


def test_a_suspended_inner_step_does_not_count_as_compute():
    # SIGSTOP (or a sleeping laptop) inside one inner step: counted whole, a 30 s stop made the resumed silo look
    # 100x slower on the swarm clock, and the others' rosters did not wait for it for rounds.
    books = RoundLedger()
    assert [books.step_seconds(t) for t in (0.2, 0.2, 0.3)] == [0.2, 0.2, 0.3]  # usual steps count as taken
    assert books.step_seconds(30.0) == pytest.approx(books.step_s)  # a suspension counts as a usual step
    assert books.stalled_s == pytest.approx(30.0 - books.step_s)  # and is kept out of the phase's compute time
    assert books.step_seconds(1.0) == 1.0  # a slower machine (5x) is real compute, and the average follows it
    assert books.step_s > 0.2
    books.took_step(tokens=64, took=0.2)
    assert (books.round_steps, books.round_tokens, books.clock_steps) == (1, 64, 1)
    books.next_round()
    assert (books.round_steps, books.round_tokens, books.clock_busy_s) == (0, 0, 0.0)


def test_a_malformed_state_from_a_peer_is_refused_and_the_peer_trains_on(tmp_path, kjv_data):
    # issue 24, item 2: a server whose state's round was a string (or NaN), or whose outer state had another shape,
    # made int() or adopt() raise in the peer downloading it, and the daemon exited. Here the two peers ahead
    # serve such states to a pocket that fell behind: the pocket refuses each one, and every daemon finishes.
    def malformed(d: PeerDaemon, i: int) -> None:
        honest = d.shared_state

        def serve():
            meta, tensors = honest()
            if i == 0:
                return {**meta, "round": str(meta["round"] + 90)}, tensors
            return meta, [*tensors[:-1], torch.zeros(3)]  # fedavg's state is empty: a stray tensor is refused too
        d.shared_state = serve

    _, slow = run_pocket(tmp_path, kjv_data, fast_rounds=6, serve=malformed)
    for d in slow:
        refused = records(d, "refused_state")
        assert refused and all("not a count" in r["reason"] or "shape" in r["reason"] or "does not match"
                               in r["reason"] for r in refused), refused
        assert not [r for r in records(d, "sync") if "group at" in r["reason"]]  # nothing bad was adopted


def test_a_joiner_whose_first_round_closed_before_it_came_catches_up_and_counts_it_as_joining(tmp_path, kjv_data):
    # c downloads the state at round 0 while a and b are already averaging it without c: c catches up to round 1
    # (it must not average round 0 again), records round 0 as joined_late, and its participation counts from
    # round 1, where all three average on one model.
    net = FakeNet(plan=lambda r, me: ["a", "b"] if r == 0 else None)
    joined = threading.Event()

    def until_c_joined() -> None:  # a and b stay in round 0 until c holds its state
        joined.wait(within(60))
    a, b = (make_daemon(tmp_path, kjv_data, net, n, hold=until_c_joined, **{"federation.rounds": 3}) for n in "ab")
    c = make_daemon(tmp_path, kjv_data, net, "c", **{"federation.rounds": 3, "network.initial_peers": [
        "/ip4/127.0.0.1/tcp/1/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"]})
    join = c._join

    def join_once_the_swarm_serves() -> None:
        deadline = time.monotonic() + within(60)
        while not all(n in net.peers and net.peers[n].snapshot for n in "ab") and time.monotonic() < deadline:
            time.sleep(0.02)
        join()
        joined.set()
    c._join = join_once_the_swarm_serves
    out = run_all([a, b, c])
    assert {o["round"] for o in out.values()} == {3}, out
    assert len({o["fingerprint"] for o in out.values()}) == 1, out
    got = rounds(c)
    assert [r["outcome"] for r in got] == ["joined_late", "averaged", "averaged"], got
    assert got[-1]["participation"] == 1.0  # joining is not a missed round
    assert any(r["reason"].startswith("swarm is at round 1") for r in records(c, "sync"))
