"""The daemon's round logic driven by an in-process fake swarm: clock, catch-up, healing, the non-finite guard."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import tiny_overrides
from fake_swarm import FakeNet, factory
from photon_p2p.config import load_config
from photon_p2p.daemon import PeerDaemon
from photon_p2p.federation import FederationError
from photon_p2p.federation.swarm import check_state, fingerprint
from photon_p2p.metrics import read_metrics

pytestmark = pytest.mark.timeout(180)
_INIT = threading.Lock()  # model init draws from torch's global RNG: silos in threads must not interleave there


def make_daemon(tmp_path, data, net: FakeNet, name: str, slow: float = 0.0, **extra) -> PeerDaemon:
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
    if slow:
        setup = daemon._setup_training

        def slowed() -> None:  # a silo with half the compute: every inner step takes longer
            setup()
            step = daemon.trainer.train_step

            def slow_step() -> float:
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


def rounds(daemon: PeerDaemon) -> list[dict]:
    return [r for r in read_metrics(daemon.run_dir) if r["kind"] == "round"]


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
    slow = make_daemon(tmp_path, kjv_data, net, "slow", slow=0.15, **extra)
    net.tokens_per_peer = 4 * 8 * 64  # H=4 steps of batch 8 x 64 tokens, as the real clock computes it
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
    halves = {"a": ["a", "b"], "b": ["a", "b"], "c": ["c", "d"], "d": ["c", "d"]}
    net = FakeNet(plan=lambda r, me: halves[me] if r == 0 else None)
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
    assert check_state({"round": 4, "fingerprint": fp}, t, [{"round": 4, "fingerprint": fp}]) == ""
    assert "non-finite" in check_state({"round": 4}, [torch.tensor([float("nan")])], [])
    assert "does not match" in check_state({"round": 4, "fingerprint": "0" * 64}, t, [])
    other = fingerprint([torch.ones(3), torch.ones(2)])
    why = check_state({"round": 4, "fingerprint": fp}, t, [{"round": 4, "fingerprint": other}] * 2)
    assert "differs from the 2 live peer(s)" in why
    # heartbeats of peers at other rounds say nothing about this state
    assert check_state({"round": 4, "fingerprint": fp}, t, [{"round": 5, "fingerprint": other}]) == ""
