"""`photon-peer status` and `bootstrap` against real hivemind DHTs on 127.0.0.1 (fake peers publish heartbeats)."""

from __future__ import annotations

import io
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from _fake_heartbeat_peer import (RUN, FakeDHT, fingerprint, group_alive, kill_group, reap, spawn,  # noqa: E402
                                  start_bootstrap, start_peer, values, wait_for_file)

from photon_p2p.config import NetworkConfig  # noqa: E402
from photon_p2p.federation import FederationError  # noqa: E402
from photon_p2p.federation.records import make_record  # noqa: E402
from photon_p2p.status import collect_status, render_table, run_status  # noqa: E402
from photon_p2p.status_view import WIDTH, short_id, model_line as summary_model_line  # noqa: E402
from deadlines import within

A, B, C = fingerprint("A"), fingerprint("B"), fingerprint("C")


def peer(i: int) -> str:
    """The peer id fake_swarm gives spec ``i``."""
    return f"Qm{'abcdefghijklmnopqrstuv'[i] * 30}"


def fake_swarm(specs: list[dict]) -> FakeDHT:
    """A FakeDHT holding one record per spec: values(i) overridden by the spec, published ``age`` s ago."""
    from hivemind.utils import ValueWithExpiration, get_dht_time

    dht, now = FakeDHT(), get_dht_time()
    for i, spec in enumerate(specs):
        spec = dict(spec)
        age, state = spec.pop("age", 0.0), spec.pop("state", "running")
        rec = make_record({**values(i), **spec}, peer_id=peer(i), run_id=RUN,
                          maddrs=[f"/ip4/10.0.0.{i}/tcp/4000/p2p/Qm{i}"], time=now - age, interval=1.0,
                          started_at=now - 100, state=state)
        dht.entries[f"[owner:{i}]".encode()] = ValueWithExpiration(rec.dict(), now + 60)
    return dht


def test_a_helper_is_named_with_the_bytes_it_carried():
    dht = fake_swarm([{"round": 4}, {"round": 4, "role": "helper", "tokens": 0, "bytes_sent": 5_049_496,
                                     "bytes_received": 5_049_496}])
    status = collect_status(dht, RUN, timeout=1.0)
    text = render_table(status, wide=True)
    assert f"helper {short_id(peer(1))} (trains nothing" in text and "carried 5.05MB out, 5.05MB in" in text
    assert [line.split()[-3] for line in text.splitlines() if line.startswith(short_id(peer(1)))] == ["helper"]
    assert "helper" not in render_table(collect_status(fake_swarm([{"round": 4}]), RUN, timeout=1.0))


def test_collect_status_marks_stale_and_left_and_sorts():
    dht = fake_swarm([{"round": 4}, {"round": 6, "age": 30.0}, {"round": 5, "state": "left"}, {"round": 3}])
    status = collect_status(dht, RUN, timeout=1.0)
    states = [(p["round"], p["status"], p["lag"]) for p in status["peers"]]
    assert states == [(4, "live", 0), (3, "live", 1), (6, "stale", 0), (5, "left", 0)]
    s = status["summary"]
    assert (s["live_peers"], s["stale_peers"], s["left_peers"], s["global_round"]) == (2, 1, 1, 4)
    assert s["total_tokens"] == 1000 + 2000 + 3000 + 4000 and s["tokens_per_s"] == pytest.approx(100 + 400)
    assert s["median_loss"] == pytest.approx(4.5)  # live peers only: 3.0 and 6.0
    text = render_table(status, wide=True)
    assert "2 live peers" in text and "(1 stale, 1 left)" in text and "30s ago" in text
    assert "/ip4/10.0.0.1/tcp/4000 " in text and "/p2p/" not in text  # the id has its own column
    assert "? = peer id not proven" in text
    assert collect_status(dht, RUN, timeout=1.0, stale_after=60.0)["summary"]["live_peers"] == 3
    gone = collect_status(fake_swarm([{"age": 30.0}]), RUN, timeout=1.0)
    assert "no live peers" in render_table(gone) and gone["summary"]["live_peers"] == 0


def model_line(status: dict) -> str:
    """The consistency line render_table prints right under the header ("" if none), unwrapped."""
    line = summary_model_line(status["summary"])
    if line:  # printed second, wrapped at 80 columns
        second = render_table(status).split("\n", 1)[1]
        flat = " ".join(line.split())
        assert " ".join(second.split())[:len(flat)] == flat
    return line


def test_one_model_at_the_newest_round_and_peers_behind_are_not_a_split():
    # Three live peers agree at round 12; one is behind with an older model; a stale one at 12 disagrees but
    # is not live, so it does not count (its record may be minutes old).
    dht = fake_swarm([{"round": 12, "fingerprint": A, "participation": 1.0},
                      {"round": 12, "fingerprint": A, "participation": 0.5},
                      {"round": 11, "fingerprint": B, "participation": 0.25},
                      {"round": 12, "fingerprint": A, "participation": 0.75},
                      {"round": 12, "fingerprint": C, "age": 30.0}])
    status = collect_status(dht, RUN, timeout=1.0)
    s = status["summary"]
    assert (s["models"], s["split"], s["behind_peers"], s["global_round"]) == (1, False, 1, 12)
    assert s["median_participation"] == pytest.approx(0.625)  # live peers only: 0.25, 0.5, 0.75, 1.0
    assert s["model_groups"] == [{"fingerprint": A, "round": 12, "peers": [peer(0), peer(1), peer(3)]},
                                 {"fingerprint": B, "round": 11, "peers": [peer(2)]}]
    assert [p["fingerprint"] for p in status["peers"]] == [A, A, A, B, C]  # rows keep their fingerprint
    assert model_line(status) == f"one model: {A[:8]} held by all 3 live peers at round 12, 1 behind"
    assert "SPLIT" not in render_table(status)
    assert json.loads(json.dumps(status))["summary"] == s  # JSON output carries the same fields

    alone = collect_status(fake_swarm([{"round": 12, "fingerprint": A}]), RUN, timeout=1.0)
    assert model_line(alone) == f"one model: {A[:8]} held by the only live peer at round 12"


def test_split_at_the_same_round_names_each_model_and_its_peers():
    dht = fake_swarm([{"round": 12, "fingerprint": B}, {"round": 12, "fingerprint": A},
                      {"round": 12, "fingerprint": A}, {"round": 11, "fingerprint": C}])
    status = collect_status(dht, RUN, timeout=1.0)
    s = status["summary"]
    assert (s["models"], s["split"], s["behind_peers"]) == (2, True, 1)
    # newest round first, then the biggest group: the majority model leads
    assert [(g["round"], g["fingerprint"], g["peers"]) for g in s["model_groups"]] == [
        (12, A, [peer(1), peer(2)]), (12, B, [peer(0)]), (11, C, [peer(3)])]
    assert model_line(status) == (
        f"SPLIT: live peers at round 12 hold 2 different models: {A[:8]} (peers ..bbbbbbbbbbbb, ..cccccccccccc), "
        f"{B[:8]} (peers ..aaaaaaaaaaaa); they re-merge when they next meet in a group")
    assert json.loads(json.dumps(status))["summary"]["split"] is True


def test_peers_without_a_fingerprint_are_not_a_model_of_their_own():
    dht = fake_swarm([{"round": 12, "fingerprint": A}, {"round": 12, "fingerprint": ""},
                      {"round": 12, "fingerprint": B}])
    s = collect_status(dht, RUN, timeout=1.0)["summary"]
    assert (s["models"], s["split"]) == (2, True)
    assert model_line(collect_status(dht, RUN, timeout=1.0)).endswith(
        "; 1 reports no fingerprint; they re-merge when they next meet in a group")
    agree = collect_status(fake_swarm([{"round": 12, "fingerprint": A}, {"round": 12, "fingerprint": ""}]), RUN, 1.0)
    assert (agree["summary"]["models"], agree["summary"]["split"]) == (1, False)
    assert model_line(agree) == f"one model: {A[:8]} held by 1 of 2 live peers (1 reports no fingerprint) at round 12"
    unknown = collect_status(fake_swarm([{"round": 12, "fingerprint": ""}]), RUN, 1.0)
    assert unknown["summary"]["models"] == 0 and model_line(unknown) == ""
    assert collect_status(fake_swarm([{"age": 30.0}]), RUN, 1.0)["summary"]["models"] == 0  # nobody live


def test_table_has_model_and_participation_columns():
    status = collect_status(fake_swarm([{"round": 12, "fingerprint": A, "participation": 0.875, "group_size": 3,
                                         "waited": 3, "leader": "x"},
                                        {"round": 12, "fingerprint": "", "participation": 0.0}]), RUN, 1.0)
    lines = render_table(status, wide=True).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert lines[header].split()[5:7] == ["MODEL", "PART"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:] if line.startswith("..")}
    assert rows["..aaaaaaaaaaaa?"][5:7] == [A[:8], "88%"]
    assert rows["..bbbbbbbbbbbb?"][5:7] == ["-", "0%"]
    # GROUP: the last group's size over the peers its round waited for (the peer's roster); an older peer: the size
    assert lines[header].split()[8] == "GROUP" and rows["..aaaaaaaaaaaa?"][8] == "3/3"
    assert rows["..bbbbbbbbbbbb?"][8] == str(status["peers"][1]["group_size"])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A bootstrap node and three fake peers with distinct rounds/tokens; every process group killed at the end."""
    tmp, procs = tmp_path_factory.mktemp("swarm"), []
    try:
        _, addr = start_bootstrap(procs)
        peers = [start_peer(procs, tmp, f"p{i}", addr, values(i)) for i in range(3)]
        infos = [wait_for_file(tmp / f"p{i}.json", p, within(60)) for i, p in enumerate(peers)]
        yield {"addr": addr, "infos": infos, "procs": procs, "tmp": tmp}
    finally:
        reap(procs)


def status_of(addr: str, run_id: str = RUN, **kwargs) -> str:
    out = io.StringIO()
    # A generous stale_after: on a loaded 2-core machine a 1 s heartbeat can be late without the peer being dead.
    kwargs.setdefault("stale_after", 15.0)
    assert run_status(NetworkConfig(initial_peers=[addr], bootstrap_timeout=10, request_timeout=5), run_id,
                      out=out, **kwargs) == 0
    return out.getvalue()


@pytest.mark.timeout(60)
def test_status_table_lists_peers(swarm):
    text = status_of(swarm["addr"], wide=True)
    head = text.splitlines()[0]
    assert head == f"run '{RUN}': round 12, 3 live peers"
    flat = " ".join(text.split())
    assert "6.00k tokens, 600 tokens/s, median loss 4.0000" in flat
    newest_model = values(2)["fingerprint"][:8]  # each fake peer is at its own round: two are behind
    assert text.splitlines()[1] == f"one model: {newest_model} held by the only live peer at round 12, 2 behind"
    table = [line for line in text.splitlines()[1:] if line.startswith("..")]
    assert len(table) == 3
    # sorted by round, newest first; lag counts rounds behind the newest
    for line, i, lag in zip(table, (2, 1, 0), (0, 1, 2)):
        cells = line.split()
        assert swarm["infos"][i]["peer_id"].endswith(cells[0].lstrip(".")), cells
        assert cells[1].startswith("/ip4/127.0.0.1/tcp/") and cells[3:5] == [str(10 + i), str(lag)]
        assert cells[5:7] == [values(i)["fingerprint"][:8], f"{values(i)['participation']:.0%}"]
    assert "?" not in text  # identities were given, so every peer id is proven by its signing key


@pytest.mark.timeout(60)
def test_status_json_matches(swarm):
    doc = json.loads(status_of(swarm["addr"], as_json=True))
    s = doc["summary"]
    assert (s["live_peers"], s["global_round"], s["total_tokens"]) == (3, 12, 6000)
    assert s["tokens_per_s"] == pytest.approx(600.0)
    assert s["median_loss"] == pytest.approx(statistics.median([3.0, 4.0, 5.0]))
    assert s["median_val_ppl"] == pytest.approx(21.0)
    assert s["median_participation"] == pytest.approx(0.75)  # 1.0, 0.75, 0.5
    # each fake peer is at its own round: the one at the newest round is the whole "swarm", the others are behind
    assert (s["models"], s["split"], s["behind_peers"]) == (1, False, 2)
    assert s["model_groups"][0] == {"fingerprint": values(2)["fingerprint"], "round": 12,
                                    "peers": [swarm["infos"][2]["peer_id"]]}
    by_id = {p["peer_id"]: p for p in doc["peers"]}
    for i, info in enumerate(swarm["infos"]):
        row, want = by_id[info["peer_id"]], values(i)
        assert {k: row[k] for k in want} == want
        assert row["status"] == "live" and row["verified"] and row["lag"] == 2 - i
        assert row["maddrs"] == info["maddrs"] and row["run_id"] == RUN and row["last_seen"] < 5


@pytest.mark.timeout(60)
def test_unknown_run_id_says_so_and_names_seen_runs(swarm):
    text = status_of(swarm["addr"], run_id="no-such-run").strip()
    assert text.startswith("no peers have published heartbeats for run 'no-such-run' (the node at ")
    assert "is reachable" in text and f"runs seen in this swarm: {RUN}" in text


@pytest.mark.timeout(90)
def test_killed_peer_goes_stale_then_disappears(swarm):
    from photon_p2p.config import NetworkConfig as Net
    from photon_p2p.federation.network import start_dht
    from photon_p2p.federation.records import install_validators

    victim = start_peer(swarm["procs"], swarm["tmp"], "victim", swarm["addr"], values(3), ttl=6.0)
    info = wait_for_file(swarm["tmp"] / "victim.json", victim, within(60))
    dht = start_dht(Net(initial_peers=[swarm["addr"]], host_maddrs=["/ip4/127.0.0.1/tcp/0"]), client_mode=True)
    try:
        install_validators(dht, RUN)
        rows = {p["peer_id"]: p["status"] for p in collect_status(dht, RUN, 5.0, stale_after=15.0)["peers"]}
        assert rows.get(info["peer_id"]) == "live" and len(rows) == 4
        kill_group(victim)  # a machine failure: the peer, its DHT process and p2pd die together
        killed, seen = time.monotonic(), set()
        while time.monotonic() - killed < 20:
            status = collect_status(dht, RUN, 5.0, stale_after=1.5)
            rows = {p["peer_id"]: p["status"] for p in status["peers"]}
            seen.add(rows.get(info["peer_id"], "gone"))
            if info["peer_id"] not in rows:
                break
            time.sleep(0.5)
        assert "gone" in seen, f"record of the killed peer still listed after {time.monotonic() - killed:.1f}s"
        assert "stale" in seen  # between its last heartbeat and its record's expiry it is shown as stale
        status = collect_status(dht, RUN, 5.0, stale_after=15.0)
        assert status["summary"]["live_peers"] == 3 and info["peer_id"] not in {p["peer_id"] for p in status["peers"]}
    finally:
        dht.shutdown()


@pytest.mark.timeout(60)
def test_bare_bootstrap_says_no_peers_and_stops_cleanly():
    procs: list = []
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc, addr = start_bootstrap(procs)
            assert "/p2p/" in addr
            text = status_of(addr, run_id="photon").strip()
            assert text.startswith("no peers have published heartbeats for run 'photon'") and "\n" not in text
            kill_group(proc, sig)  # as a terminal's Ctrl-C or systemd's stop do: DHT process and p2pd get it too
            assert proc.wait(timeout=within(15)) == 0
            assert "stopping" in proc.stdout.read()
            assert group_gone_within(proc.pid, within(5)), "the bootstrap node left helper processes behind"
    finally:
        reap(procs)


def group_gone_within(pgid: int, seconds: float) -> bool:
    """Whether every process of the group (DHT process, p2pd) has exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group_alive(pgid)


@pytest.mark.timeout(30)
def test_unreachable_address_fails_fast_with_one_line():
    from hivemind.p2p import P2P, PeerID

    key = Path(__import__("tempfile").mkdtemp()) / "id.key"
    P2P.generate_identity(str(key))
    nobody = f"/ip4/127.0.0.1/tcp/9/p2p/{PeerID.from_identity(key.read_bytes()).to_base58()}"
    t0 = time.monotonic()
    with pytest.raises(FederationError) as err:
        run_status(NetworkConfig(initial_peers=[nobody], bootstrap_timeout=3, request_timeout=2), "photon")
    assert time.monotonic() - t0 < 10
    assert "could not reach" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FederationError, match="invalid multiaddr"):
        run_status(NetworkConfig(initial_peers=["127.0.0.1:4000"]), "photon")
    with pytest.raises(FederationError, match="needs --initial-peers"):
        run_status(NetworkConfig(initial_peers=[]), "photon")


@pytest.mark.timeout(60)
def test_watch_refreshes_until_ctrl_c_and_leaves_no_processes(swarm):
    code = ("import sys; from photon_p2p.status import run_status; from photon_p2p.config import NetworkConfig; "
            f"sys.exit(run_status(NetworkConfig(initial_peers=[{swarm['addr']!r}]), {RUN!r}, as_json=True, "
            "watch=0.5))")
    procs: list = []
    try:
        proc = spawn(["-c", code], procs, stdout=subprocess.PIPE)
        docs = [json.loads(proc.stdout.readline()) for _ in range(3)]  # one JSON document per refresh
        assert all(len(d["peers"]) >= 3 for d in docs)
        assert docs[0]["time"] < docs[1]["time"] < docs[2]["time"]
        kill_group(proc, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground process group
        assert proc.wait(timeout=within(15)) == 0
        assert group_gone_within(proc.pid, within(5)), "status left its DHT process or p2pd behind"
    finally:
        reap(procs)


def test_a_peer_that_keeps_being_clipped_is_flagged():
    bad = peer(2)
    status = collect_status(fake_swarm([
        {"round": 7, "clipped": {bad: {"rounds": 4, "factor": 0.0002}}},
        {"round": 7, "clipped": {bad: {"rounds": 3, "factor": 0.001}, peer(0): {"rounds": 1, "factor": 0.9}}},
        {"round": 7, "clipped": {bad: {"rounds": 9, "factor": 0.5}}},  # its own word about itself is ignored
    ]), RUN, 1.0)
    assert status["summary"]["clipped_peers"] == [bad]
    row = {r["peer_id"]: r for r in status["peers"]}
    assert row[bad]["clipped_by_others"] == {"rounds": 4, "factor": 0.0002, "reporters": [peer(0), peer(1)]}
    assert row[peer(0)]["clipped_by_others"]["rounds"] == 1 and row[peer(1)]["clipped_by_others"] is None
    text = render_table(status, wide=True)
    assert f"CLIPPED: peer ..{bad[-12:]} was clipped or dropped by 2 reducer(s) in up to 4" in " ".join(text.split())
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert lines[header].split()[7] == "CLIPPED"
    cells = {line.split()[0]: line.split()[7] for line in lines[header + 1:] if line.startswith("..")}
    assert cells[f"..{bad[-12:]}?"] == "4x2" and cells[f"..{peer(1)[-12:]}?"] == "-"
def test_table_shows_each_silos_ranks_and_device():
    """A torchrun silo reports world_size and device in its heartbeat; records from older peers have neither."""
    status = collect_status(fake_swarm([{"world_size": 8, "device": "cuda"}, {}]), RUN, 1.0)
    assert sorted((r["world_size"], r["device"]) for r in status["peers"]) == [(1, ""), (8, "cuda")]
    lines = render_table(status, wide=True).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert lines[header].split()[-3:] == ["SILO", "LAST", "SEEN"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:] if line.startswith("..")}
    assert rows["..aaaaaaaaaaaa?"][-3] == "8xcuda" and rows["..bbbbbbbbbbbb?"][-3] == "1"


def test_table_shows_each_peers_compute_utilization():
    status = collect_status(fake_swarm([{"utilization": 0.984}, {}]), RUN, 1.0)
    assert status["summary"]["median_utilization"] == pytest.approx(0.984)
    lines = render_table(status, wide=True).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    col = lines[header].split().index("UTIL")
    cells = sorted(line.split()[col] for line in lines[header + 1:] if line.startswith(".."))
    assert cells == ["-", "98%"]  # a peer that predates the field shows "-"


def test_a_big_swarm_fits_an_80_column_terminal_summary_first():
    # issue 23 (22 peers, as many as the fake holds; the widths do not grow with N): the round, how many models, the roster and who missed the last round come first; the table fits
    # 80 columns (--wide has every column); --json carries the same summary.
    specs = [{"round": 57, "fingerprint": A, "group_size": 30, "waited": 32, "leader": peer(0),
              "tokens_per_s": 12345.0, "participation": 0.97} for _ in range(22)]
    specs[3].update(group_size=1)  # missed round 56: averaged alone while its roster waited for 32
    specs[4].update(group_size=1, round=56, fingerprint=B)  # ... and one still catching up
    specs[5].update(age=30.0)  # stale
    status = collect_status(fake_swarm(specs), RUN, timeout=1.0)
    s = status["summary"]
    assert s["last_round"] == {"group": 30, "waited": 32, "leader": peer(0), "missed": [peer(3), peer(4)]}
    text = render_table(status)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, max(lines, key=len)
    assert lines[0] == f"run '{RUN}': round 57, 21 live peers (1 stale, 0 left)"
    assert lines[1].startswith(f"one model: {A[:8]} held by all 20 live peers at round 57, 1 behind")
    flat = " ".join(text.split())
    assert f"last round: group of 30 of 32 waited for, leader ..{peer(0)[-12:]}; missed by ..{peer(3)[-12:]}, " \
           f"..{peer(4)[-12:]}" in flat
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert header < 10 and lines[header].split() == ["PEER", "STATE", "ROUND", "MODEL", "GROUP", "PART", "TOK/S",
                                                     "LOSS", "SEEN"]
    assert len([line for line in lines[header + 1:] if line.startswith("..")]) == 22
    assert max(len(line) for line in render_table(status, wide=True).splitlines()) > WIDTH  # everything: wide
    assert json.loads(json.dumps(status))["summary"]["last_round"]["missed"] == [peer(3), peer(4)]


def test_escape_sequences_in_other_peers_records_never_reach_the_terminal():
    # issue 24, item 11: states, devices and addresses come from other peers' records, raw
    status = collect_status(fake_swarm([{"device": "cu\x1b]2;pwned\x07da", "state": "run\x1b[2J\nning"}, {}]),
                            RUN, 1.0)
    for wide in (False, True):
        text = render_table(status, wide=wide)
        assert "\x1b" not in text and "\x07" not in text and "\nning" not in text  # nor a row of its own
    assert "\\x1b]2;pwned\\x07" in render_table(status, wide=True)  # shown escaped, not dropped


@pytest.mark.timeout(90)
def test_a_bootstrap_node_told_the_run_and_owner_key_refuses_what_the_peers_would(tmp_path):
    # issue 24, item 12: the bootstrap node stored any token, revocation or heartbeat; a closed swarm's peers
    # refused them, but a reader asking the bootstrap node first got them
    from photon_p2p.credentials import create_owner_key, fingerprint as key_fp, load_owner_private, make_token
    from photon_p2p.federation.admission import admitted_key
    from photon_p2p.federation.records import RUNS_KEY

    create_owner_key(tmp_path / "owner.key")
    owner = load_owner_private(tmp_path / "owner.key")
    create_owner_key(tmp_path / "stranger.key")
    stranger = load_owner_private(tmp_path / "stranger.key")
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    key = admitted_key(key_fp(owner.public_key()))
    procs: list = []
    try:
        proc = spawn(["-m", "photon_p2p.cli", "bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", RUN,
                      "--swarm-owner-key", str(tmp_path / "owner.key.pub")], procs, stdout=subprocess.PIPE)
        addr, said = "", []
        for line in proc.stdout:
            said.append(line)
            if line.startswith("/ip4/") and not addr:
                addr = line.strip()
            if line.startswith("bootstrap node validates:"):
                break
        assert addr and f"run(s) {RUN}" in said[-1] and "closed swarm, owner key" in said[-1], said
        # The client DHT runs in a fresh interpreter: hivemind forks its DHT process, and forked from this pytest
        # process (threads of earlier tests running) the child hung before it was ready in about half the runs.
        tries = [(key, make_token(stranger, peer, 600), peer),  # another owner's token
                 (RUNS_KEY, "not a time", "some-run"),  # a malformed run-id hint
                 (key, make_token(owner, peer, 600), peer)]  # the owner's own: stored
        code = (
            "import json, sys\n"
            "from hivemind.utils import get_dht_time\n"
            "from photon_p2p.config import NetworkConfig\n"
            "from photon_p2p.federation.network import start_dht, stop_dht\n"
            "addr, tries = sys.argv[1], json.loads(sys.argv[2])\n"
            "net = NetworkConfig(initial_peers=[addr], host_maddrs=['/ip4/127.0.0.1/tcp/0'], bootstrap_timeout=30)\n"
            "dht = start_dht(net, initial_peers=[addr], client_mode=True)\n"
            "try:\n"
            "    later = get_dht_time() + 30\n"
            "    print(json.dumps([bool(dht.store(k, v, later, subkey=s, return_future=True).result(timeout=10))\n"
            "                      for k, v, s in tries]))\n"
            "finally:\n"
            "    stop_dht(dht)\n")
        client = spawn(["-c", code, addr, json.dumps(tries)], procs, stdout=subprocess.PIPE)
        out, _ = client.communicate(timeout=within(60))
        assert client.returncode == 0 and json.loads(out.strip().splitlines()[-1]) == [False, False, True], out
    finally:
        reap(procs)


def test_a_run_id_is_refused_only_as_a_near_miss_of_one_that_peers_train():
    # issue 24, item 11: the run-id hint is anyone's to write; an outsider publishing names kept a new run's first
    # peer from starting ("no peer trains run id X"), and so did a second run on a shared bootstrap node
    from photon_p2p.federation.records import near_miss

    runs = ["photon-125m", "test", "Exp"]
    assert near_miss("photon-125n", runs) == "photon-125m"  # one key off
    assert near_miss("photn-125m", runs) == "photon-125m"
    assert near_miss("tset", runs) == "test"  # two letters swapped
    assert near_miss("exp", runs) == "Exp"  # another case
    assert near_miss("photon-1b3", runs) is None  # three edits: a run of its own
    assert near_miss("my-new-run", runs) is None and near_miss("photon-125m", runs) is None
