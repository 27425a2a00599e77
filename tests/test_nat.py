"""Volunteers behind NAT, for real: network namespaces with MASQUERADE routers (bench/nat_net.py).

The slow test needs root, network namespaces and iptables; it skips with a one-line reason elsewhere.
The fast tests check what a peer says about its connection (heartbeat field, status column)."""

from __future__ import annotations

import json
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from photon_p2p.federation.network import connection_kind  # noqa: E402
from photon_p2p.federation.records import make_record  # noqa: E402
from photon_p2p.status_view import _address  # noqa: E402

ROUNDS = 4
# what each peer believed in a round: enough to explain a failed round from CI's output alone
_STORY = ("synced", "downloading", "local phase over", "roster", "also waiting", "moved past", "went silent",
          "did not come", "group of", "without this peer", "solo", "WARNING", "ERROR")


def _story(peers: dict, rounds: tuple[int, ...] = (0, 1)) -> str:
    """Each peer's log lines about the first rounds (peers log at info in the testbed, bench/nat_net.py)."""
    out = []
    for name, r in peers.items():
        lines = [ln for ln in r["log"].splitlines() if any(k in ln for k in _STORY)
                 and (any(f"round {n}" in ln for n in rounds) or "sync" in ln or "WARN" in ln or "ERR" in ln)]
        out += [f"--- {name}", *lines[:25]]
    return "\n".join(out)


def _three_peer_rounds(data, run_id: str) -> list[str]:
    """Overrides of every peer of a NAT test: a small model, ROUNDS rounds of 5 steps, groups of all 3 peers."""
    return ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64", "train.batch_size=8",
            "train.warmup_steps=5", "train.max_steps=1000", "train.eval_every=0", "train.log_every=5",
            "train.threads=1", f"data.path={data}", f"federation.run_id={run_id}", "federation.local_steps=5",
            f"federation.rounds={ROUNDS}", "federation.matchmaking_time=3", "federation.round_deadline=60",
            "federation.target_group_size=3", "federation.min_group_size=3", "federation.state_sync_timeout=60",
            "network.bootstrap_timeout=30"]


class _DHT:
    """Just enough of hivemind.DHT for connection_kind: run_coroutine answers with these remote addresses."""

    def __init__(self, addrs: list[str] | None) -> None:
        self.addrs = addrs

    def run_coroutine(self, fn, return_future: bool = False) -> Future:
        f: Future = Future()
        if self.addrs is not None:
            f.set_result(self.addrs)  # None: p2pd never answers
        return f


def test_connection_kind_from_open_connections():
    relay = "/ip4/10.77.0.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit"
    assert connection_kind(_DHT(["/ip4/10.77.0.2/tcp/1"]), client_mode=False, timeout=1) == "direct"
    assert connection_kind(_DHT(["/ip4/10.77.0.2/tcp/1"]), client_mode=True, timeout=1) == "client"
    assert connection_kind(_DHT(["/ip4/10.77.0.2/tcp/1", relay]), client_mode=False, timeout=1) == "relayed"
    # p2pd silent: the configuration's answer, within the deadline
    assert connection_kind(_DHT(None), client_mode=True, timeout=0.05) == "client"


def test_heartbeat_carries_connection_and_status_shows_it():
    snap = {"round": 1, "local_step": 5, "tokens": 10, "loss": 1.0, "val_ppl": 2.0, "tokens_per_s": 1.0,
            "compression": "none", "group_size": 3, "averaging_s": 1.0, "bytes_sent": 1, "bytes_received": 1,
            "client_mode": False, "version": "t", "maddrs": ["/ip4/10.0.0.5/tcp/7/p2p/QmX"], "fingerprint": "",
            "participation": 1.0, "connection": "relayed"}
    rec = make_record(snap, peer_id="QmX", run_id="r", time=1.0, interval=1.0, started_at=0.0)
    assert rec.connection == "relayed"
    assert _address(rec.dict()) == "(relayed) /ip4/10.0.0.5/tcp/7"
    old = {k: v for k, v in snap.items() if k != "connection"}  # a peer from before the field: still valid
    assert make_record(old, peer_id="QmX", run_id="r", time=1.0, interval=1.0, started_at=0.0).connection == ""


@pytest.mark.slow
def test_natted_volunteer_averages_every_round_and_ends_on_the_one_model(tmp_path, kjv_data):
    from nat_net import NatTestbed, nat_unsupported_reason, run_swarm

    why = nat_unsupported_reason()
    if why:
        pytest.skip(f"no NAT testbed here: {why}")
    # min_group_size=3: a round cannot close without the volunteer, so 4 group rounds prove it took part in each
    common = _three_peer_rounds(kjv_data, "nattest")
    no_solo = ["federation.allow_solo_start=false"]
    with NatTestbed(public=3, nats=1, rate_mbit=100) as tb:
        res = run_swarm(tb, tmp_path, silos=[1, 2], volunteers=[tb.volunteer(0)], bootstrap=0, common=common,
                        first=[], joiner=no_solo, volunteer=no_solo, timeout=400, status_from=0, run_id="nattest")
        masqueraded = tb.masqueraded_packets(0)
    peers = {name: r for name, r in res.items() if not name.startswith("_")}
    assert set(peers) == {"silo-0", "silo-1", "volunteer-0"}
    for name, r in peers.items():
        assert r["rc"] == 0, f"{name} exited with {r['rc']}:\n{r['log_tail']}"
    assert masqueraded > 0  # the volunteer's traffic really went out through its NAT
    vol = peers["volunteer-0"]
    assert [x for x in vol["records"] if x["kind"] == "sync"], "the volunteer did not download the swarm's state"
    rounds = {name: [x for x in r["records"] if x["kind"] == "round"] for name, r in peers.items()}
    # Every round is a group of all three on one model, but the volunteer may miss ONE round: a ghost member (seen
    # about once in 6-8 runs beside a busy core, 2026-12-07): the leader counted the volunteer in, but the
    # volunteer never got the leader's begin message; the silos averaged without its parts after the 10 s sender
    # timeout, and it caught up by download. A one-sided partial round (one member's stream from a reducer broke:
    # it kept 2 % of values unchanged) used to leave it on other bytes until the next round; it now takes its
    # group's model before recording the round (rejoin._mend_partial).
    for name, rs in rounds.items():
        assert [x["round"] for x in rs] == list(range(1, ROUNDS + 1)), f"{name}\n{_story(peers)}"
        assert all(x["group_size"] == 3 for x in rs if not x["solo"]), name
        missed = [(x["round"], x["reason"]) for x in rs if x["solo"]]
        assert len(missed) <= (1 if name == "volunteer-0" else 0), f"{name}: {missed}\n{_story(peers)}"
        assert all(x["bytes_sent"] > 0 and x["bytes_received"] > 0 for x in rs if not x["solo"]), name
    models = [len({rs[i]["fingerprint"] for rs in rounds.values()}) for i in range(ROUNDS)]
    assert models == [1] * ROUNDS, f"models per round: {models}\n{_story(peers, tuple(range(ROUNDS + 1)))}"
    # what `photon-peer status` says about each (their final heartbeats, asked from a public machine)
    status = res["_status"]
    assert status["rc"] == 0, status
    rows = json.loads(status["stdout"])["peers"]
    conn = {r["client_mode"]: r["connection"] for r in rows}
    assert len(rows) == 3 and conn == {True: "client", False: "direct"}, rows
    assert len({r["fingerprint"] for r in rows}) == 1 and {r["round"] for r in rows} == {ROUNDS}


@pytest.mark.slow
def test_natted_volunteers_average_with_a_helper_and_no_reachable_trainer(tmp_path, kjv_data):
    """Two client-mode volunteers behind different MASQUERADE NATs, a bootstrap node, and an averaging helper
    (federation.helper) on a reachable machine that trains nothing: the helper starts the run, serves the state,
    leads every round and reduces every part, so the volunteers average with each other every round and end
    bit-identical. (p2pd's circuit relay cannot carry a round in hivemind 1.1.12: BENCHMARKS.md.)"""
    from nat_net import NatTestbed, nat_unsupported_reason, run_swarm

    why = nat_unsupported_reason()
    if why:
        pytest.skip(f"no NAT testbed here: {why}")
    common = _three_peer_rounds(kjv_data, "helpertest")
    no_solo = ["federation.allow_solo_start=false"]
    with NatTestbed(public=2, nats=2, rate_mbit=100) as tb:
        res = run_swarm(tb, tmp_path, silos=[1], volunteers=[tb.volunteer(0), tb.volunteer(1)], bootstrap=0,
                        common=common, first=["federation.helper=true"], joiner=no_solo, volunteer=no_solo,
                        timeout=400, status_from=0, run_id="helpertest")
        masqueraded = [tb.masqueraded_packets(k) for k in range(2)]
    peers = {name: r for name, r in res.items() if not name.startswith("_")}
    assert set(peers) == {"silo-0", "volunteer-0", "volunteer-1"}
    for name, r in peers.items():
        assert r["rc"] == 0, f"{name} exited with {r['rc']}:\n{r['log_tail']}"
    assert all(m > 0 for m in masqueraded), masqueraded  # both really went out through their NATs
    helper = [x for x in peers["silo-0"]["records"] if x["kind"] == "round"]
    assert helper and all(x["tokens"] == 0 for x in helper), helper  # it trained nothing
    rounds = {name: [x for x in r["records"] if x["kind"] == "round"] for name, r in peers.items()}
    for name, rs in rounds.items():
        assert [x["round"] for x in rs] == list(range(1, ROUNDS + 1)), f"{name}\n{_story(peers)}"
        assert all(not x["solo"] and x["group_size"] == 3 for x in rs), f"{name}\n{_story(peers)}"
    models = [len({rs[i]["fingerprint"] for rs in rounds.values()}) for i in range(ROUNDS)]
    assert models == [1] * ROUNDS, f"models per round: {models}\n{_story(peers, tuple(range(ROUNDS + 1)))}"
    for name in ("volunteer-0", "volunteer-1"):  # each volunteer's Δ was in every mean: its weight, its tokens
        assert all(x["tokens"] > 0 and x["bytes_sent"] > 0 for x in rounds[name]), name
    status = res["_status"]
    assert status["rc"] == 0, status
    rows = json.loads(status["stdout"])["peers"]
    assert len(rows) == 3 and len({r["fingerprint"] for r in rows}) == 1, rows
