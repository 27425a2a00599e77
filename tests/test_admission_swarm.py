"""Closed swarms with real peers on 127.0.0.1 (separate processes): outsiders cannot average, serve state or show
up in status; admitted peers can; a revoked peer is out from the next round on."""

from __future__ import annotations

import io
import time

import pytest

from _fake_heartbeat_peer import RUN, reap, start_bootstrap, start_peer, values, wait_for_file
from peer_helpers import spawn  # noqa: F401  (fixture)
from photon_p2p.config import NetworkConfig
from photon_p2p.credentials import create_identity, create_owner_key, load_owner_private, make_token, public_bytes
from photon_p2p.status import run_status
from test_cli_errors import run_cli
from deadlines import within

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SHAPES = [[64, 16], [300]]


@pytest.fixture
def owner(tmp_path):
    create_owner_key(tmp_path / "owner.key")
    return load_owner_private(tmp_path / "owner.key")


def admitted(tmp_path, owner, name: str) -> dict:
    """Spec fields of a closed-swarm peer: its identity, the owner's public key, a token for its peer id."""
    peer_id = create_identity(tmp_path / f"{name}.id")
    (tmp_path / f"{name}.token").write_text(make_token(owner, peer_id, 3600))
    return {"net": {"identity_path": str(tmp_path / f"{name}.id")}, "owner_pub": str(tmp_path / "owner.key.pub"),
            "token": str(tmp_path / f"{name}.token")}


def average_all(peers, tmp_path, round_no: int, tag: str) -> list[dict]:
    for i, p in enumerate(peers):
        p.send(cmd="average", seed=10 + i, round=round_no, weight=1.0, out=str(tmp_path / f"{tag}{i}.pt"))
    return [p.expect("averaged", within(60)) for p in peers]


def test_outsider_cannot_average_or_serve_state(spawn, tmp_path, owner):
    base = {"shapes": SHAPES}
    a = spawn({**base, **admitted(tmp_path, owner, "a"), "state_meta": {"round": 0, "from": "a"}})
    addr = a.expect("ready", within(90))["maddrs"][:1]
    b = spawn({**base, **admitted(tmp_path, owner, "b"), "initial_peers": addr})
    # The outsider runs the same code without any admission: it enforces nothing and holds no token.
    c = spawn({**base, "initial_peers": addr, "state_meta": {"round": 50, "from": "outsider"}, "state_seed": 7})
    for p in (b, c):
        p.expect("ready", within(90))
    ids = {name: p.ready["peer_id"] for name, p in zip("abc", (a, b, c))}

    ra, rb, rc = average_all([a, b, c], tmp_path, 1, "r")
    assert not ra["solo"] and sorted(ra["peers"]) == sorted([ids["a"], ids["b"]]), ra
    assert sorted(rb["peers"]) == sorted(ra["peers"]) and rc["solo"], (rb, rc)

    # The outsider now shares state with the highest priority (round 51); admitted peers never download it.
    c.send(cmd="average", seed=3, round=50, weight=1.0, out=str(tmp_path / "c50.pt"))
    assert c.expect("averaged", within(60))["solo"]
    b.send(cmd="load_state", timeout=20, out=str(tmp_path / "b_state.pt"))
    got = b.expect("state", within(60))["meta"]
    assert got is not None and got.get("from") == "a", got
    # ... and admitted peers do not serve it: it finds nobody who will (a and b both share state by now).
    c.send(cmd="load_state", timeout=20, out=str(tmp_path / "c_state.pt"))
    assert c.expect("state", within(60))["meta"] is None


def test_revoked_peer_is_out_within_a_round(spawn, tmp_path, owner):
    base = {"shapes": SHAPES}
    a = spawn({**base, **admitted(tmp_path, owner, "a")})
    addr = a.expect("ready", within(90))["maddrs"][:1]
    others = [spawn({**base, **admitted(tmp_path, owner, n), "initial_peers": addr}) for n in "bc"]
    for p in others:
        p.expect("ready", within(90))
    peers = [a, *others]
    first = average_all(peers, tmp_path, 1, "r1_")
    assert all(not r["solo"] and r["group_size"] == 3 for r in first), first  # all admitted: one group of 3

    victim = others[1].ready["peer_id"]
    # asked for one shorter than the victim's token: it lasts past the token (expired first, it let the peer back)
    r = run_cli("revoke", "--peer-id", victim, "--key", str(tmp_path / "owner.key"), "--initial-peers", addr[0],
                "--timeout", "30", "--expires", "60s")
    assert r.returncode == 0 and "revoked" in r.stdout and "past its token's expiry" in r.stdout, r.stderr
    second = average_all(peers, tmp_path, 2, "r2_")  # the very next round
    assert [sorted(x["peers"]) for x in second[:2]] == [sorted(p.ready["peer_id"] for p in peers[:2])] * 2, second
    assert second[2]["solo"], second[2]


@pytest.mark.timeout(120)
def test_status_hides_outsiders_and_revoked_peers(tmp_path, owner):
    procs: list = []
    pub = str(tmp_path / "owner.key.pub")
    try:
        _, addr = start_bootstrap(procs)
        peer_id = create_identity(tmp_path / "in.key")
        (tmp_path / "in.token").write_text(make_token(owner, peer_id, 3600))
        inside = start_peer(procs, tmp_path, "in", addr, values(0), ttl=30.0, owner_pub=pub,
                            token=str(tmp_path / "in.token"))
        outside = start_peer(procs, tmp_path, "out", addr, values(1), ttl=30.0)
        infos = [wait_for_file(tmp_path / f"{n}.json", p, within(60)) for n, p in (("in", inside), ("out", outside))]
        assert infos[0]["peer_id"] == peer_id
        fp = public_bytes(owner.public_key())

        def status(**kwargs) -> str:
            out = io.StringIO()
            assert run_status(NetworkConfig(initial_peers=[addr], bootstrap_timeout=10, request_timeout=5), RUN,
                              out=out, stale_after=30.0, **kwargs) == 0
            return " ".join(out.getvalue().split())  # the summary wraps at 80 columns

        text = status(owner_public=fp)
        assert peer_id[-12:] in text and infos[1]["peer_id"][-12:] not in text, text
        assert "closed swarm, owner key" in text and ", 1 admitted" in text, text
        assert "records claim a closed swarm" in status()  # without the key: said, not verified
        r = run_cli("revoke", "--peer-id", peer_id, "--key", str(tmp_path / "owner.key"), "--initial-peers", addr)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + within(30)
        while peer_id[-12:] in (text := status(owner_public=fp)) and time.monotonic() < deadline:
            time.sleep(1)
        assert peer_id[-12:] not in text and ", 0 admitted" in text, text
    finally:
        reap(procs)


def test_daemons_in_a_closed_swarm(tmp_path, kjv_data, owner):
    """`photon-peer run` end to end: two admitted silos average together, an outsider with the run id stays alone;
    the banner says which kind of swarm each one is in."""
    from swarm import Swarm

    swarm = Swarm(tmp_path, kjv_data)
    # the default round clock: only admitted peers' progress records end a round and name its members
    common = {"federation.rounds": 2, "federation.min_group_size": 2}

    def closed_args(name: str) -> list[str]:
        spec = admitted(tmp_path, owner, name)
        return ["--identity", spec["net"]["identity_path"], "--swarm-owner-key", spec["owner_pub"],
                "--token", spec["token"]]

    try:
        a = swarm.start("a", extra=common, args=closed_args("a"))
        addr = a.address()
        b = swarm.start("b", initial=[addr], extra=common, args=closed_args("b"))
        outsider = swarm.start("o", initial=[addr], extra=common)
        for p in (a, b, outsider):
            assert p.wait(within(200)) == 0, p.log()[-3000:]
        for p in (a, b):
            assert "closed swarm, owner key" in p.log(), p.log()[-3000:]
            assert any(not r["solo"] and r["group_size"] == 2 for r in p.rounds()), p.rounds()
        assert "OPEN swarm" in outsider.log()
        assert all(r["solo"] for r in outsider.rounds()), outsider.rounds()
        assert not outsider.records("sync")  # it never got the closed swarm's state
    finally:
        swarm.close()
