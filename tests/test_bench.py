"""The benchmark scripts a user runs from bench/: the scale model rebuilds from the committed measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from deadlines import within

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=within(120))


def test_scale_model_fits_the_measured_rounds_and_checks_the_held_out_ones(tmp_path):
    out = tmp_path / "scale"
    proc = run("bench/scale_model.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["costs"]["floor_s"] > 0 and data["costs"]["cpu_bytes_per_s"]["none"] > 0
    # every held-out check is a real comparison with a measurement, not a copy of the fit
    assert data["checks"] and all(c["measured_s"] > 0 and c["predicted_s"] > 0 for c in data["checks"])
    models = {r["model"] for r in data["rows"]}
    assert models == {"photon-125m", "photon-1.3b", "photon-3b", "photon-7b"}
    # link-bound: Photon's advantage over per-step DDP approaches H on the slowest link
    slow = [r for r in data["rows"] if r["gbit"] == 0.1]
    assert all(50 < r["ddp_over_photon"] <= 128 for r in slow)
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_scale_model_without_calibration_says_so_in_one_line(tmp_path):
    proc = run("bench/scale_model.py", "--calibration", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert "no calibration" in proc.stderr and "Traceback" not in proc.stderr


def test_one_model_figures_from_round_records():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scenarios", REPO / "bench" / "scenarios.py")
    one_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(one_model)

    def rec(rnd, model, solo=False, match=1.0, avg=2.0, **kw):
        return {"kind": "round", "round": rnd, "solo": solo, "averaging_s": avg, "phases": {"matchmaking": match},
                **model, **kw}

    new = lambda fp: {"fingerprint": fp}  # noqa: E731
    old = lambda x: {"global_checksum": x}  # noqa: E731
    silos = {0: [rec(1, new("a")), rec(2, new("b")), rec(3, new("c"), val_ppl=9.0)],
             1: [rec(1, new("a")), rec(2, new("x"), solo=True, reason="deadline", avg=30.0), rec(3, new("c"))],
             2: [rec(1, new("a")), rec(2, new("y"))]}
    r = one_model.analyze(silos, wait_silos=[0, 1], alive_at_end=[0, 1])
    assert r["peer_rounds"] == 8 and r["participation"] == 0.875
    assert r["distinct_by_round"] == {"1": 1, "2": 3, "3": 1} and r["max_distinct"] == 3
    assert r["final_round"] == 3 and r["final_distinct"] == 1 and r["end_models"] == 1
    assert r["splits"] == [{"round": 2, "models": 3, "silos": [0, 1, 2], "next_round_models": 1,
                            "next_round_silos": [0, 1], "healed_next": True}]
    # a split whose sides are not both seen at the next round is not called healed
    pairs = one_model.analyze({0: [rec(1, new("a")), rec(2, new("c"))], 1: [rec(1, new("a")), rec(2, new("c"))],
                               2: [rec(1, new("b"))]}, wait_silos=[], alive_at_end=[0, 1])
    assert pairs["splits"][0]["healed_next"] is None
    assert r["wait_s"] == {"median": 1.0, "max": 30.0}  # a solo round waited its whole averaging time
    assert r["solo_reasons"] == {"deadline": 1} and r["final_val_ppl"]["0"] == 9.0
    # the old code's float checksum is compared to 4 decimals
    assert one_model.model_id(old(1.00001)) == one_model.model_id(old(1.0)) != one_model.model_id(old(1.001))
    # ... and, up to float rounding, members of one old group (a few 1e-6 apart) hold one model
    assert one_model.count_models([old(5.00004), old(5.00006)]) == 2
    assert one_model.count_models([old(5.00004), old(5.00006), old(7.0)], coarse=True) == 2


def test_gpu_throughput_smoke_runs_every_code_path_on_cpu(tmp_path):
    """No GPU here: the tiny preset for 2 steps, trainer vs bare loop and the FSDP2 + activation checkpointing
    probe on a 1-rank gloo group, so the GPU benchmark cannot rot while no GPU is lent."""
    out = tmp_path / "smoke.json"
    proc = run("bench/gpu_throughput.py", "--smoke", "--compile", "off", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    (row,) = doc["throughput"]
    assert row["config"] == "tiny" and row["trainer_tok_s"] > 0 and row["bare_tok_s"] > 0
    assert row["ratio"] > 0 and "trainer_peak_gib" in row and "bare_mfu" in row
    (probe,) = doc["fsdp_probe"]
    assert probe["status"] == "ok" and probe["parallel"] == "fsdp+ac" and probe["tok_s"] > 0
    assert doc["largest_fsdp_ac_preset"] == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("peers", [8, 16])
def test_simulated_peers_average_as_one_group_on_one_model(tmp_path, peers):
    # Issue 22's testbed at its goal sizes (issue 23: 16): real peers (DHT, p2pd, averager, matchmaking, all-reduce
    # on 127.0.0.1) whose local phase sleeps. Every round that every live peer recorded ends on one model, the run
    # ends at the swarm's round on one model, and once the joiners are in, rounds are one group of all of them.
    out = tmp_path / f"s{peers}"
    proc = subprocess.run([sys.executable, "bench/scale.py", "--peers", str(peers), "--rounds", "8", "--local-steps",
                           "16", "--step-s", "0.25", "--numel", "65536", "--cap", "600", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=within(720))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    # Every round on one model, except that round 0 may still split while the peers start: the first peer, alone
    # for ~20 s, can assemble its group at its expiration with the one joiner that named it leader, a moment
    # before its roster shows the others (who named a lower id). Seen in CI as 2 + 6; round 1 healed it (G2).
    # That start-up race is a known gap of G1 (ARCHITECTURE.md), not hidden here: any other split fails.
    assert s["split_rounds"] in ([], [0]), s
    assert s["distinct_models_at_end"] == 1 and s["last_rounds"] == [8], s
    assert s["participation"] >= 0.75, s  # the start-up rounds (7 joiners downloading) may miss; later ones not


def _scale():
    """bench/scale.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale", REPO / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale


def _round_records(out: Path, i: int, *rounds: tuple, tail: str = "") -> None:
    """peer-i/metrics.jsonl with one round record per (averaged round, outcome, group size, fingerprint)."""
    d = out / f"peer-{i}"
    d.mkdir(exist_ok=True)
    lines = [{"kind": "round", "round": r + 1, "averaged_round": r, "time": 100.0 + r, "outcome": o,
              "solo": o in ("solo", "missed", "joined_late"), "group_size": g, "fingerprint": fp}
             for r, o, g, fp in rounds]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n" + tail)


def test_scale_scores_participation_and_one_model_from_round_records(tmp_path):
    scale = _scale()

    def peer(i: int, *rounds: tuple) -> None:
        _round_records(tmp_path, i, *rounds, tail="{cut by kill -9")

    # round 0: peer 0 alone in the swarm (full); round 1: all three; round 2: peer 2 missed it (a group of 2)
    peer(0, (0, "solo", 1, "a"), (1, "averaged", 3, "b"), (2, "averaged", 2, "c"))
    peer(1, (1, "averaged", 3, "b"), (2, "averaged", 2, "c"))
    peer(2, (1, "averaged", 3, "b"), (2, "missed", 1, "c"))
    s = scale.summarize(tmp_path)
    assert s["rounds_total"] == 3 and s["peer_rounds"] == 7 and s["one_model_rounds"] == 3
    assert s["participation"] == round(4 / 7, 4) and s["split_rounds"] == [] and s["distinct_models_at_end"] == 1
    # two models after a round that two groups averaged: a split; a lone peer that missed is not a full round
    (tmp_path / "peer-1" / "metrics.jsonl").write_text(json.dumps(
        {"kind": "round", "round": 3, "averaged_round": 2, "time": 102.0, "outcome": "averaged", "solo": False,
         "group_size": 2, "fingerprint": "z"}) + "\n")
    s = scale.summarize(tmp_path)
    assert s["split_rounds"] == [2] and s["distinct_models_at_end"] == 2


def test_scale_scores_a_late_joiner_apart_and_a_lone_round_beside_a_group_as_a_split(tmp_path):
    scale = _scale()

    def peer(i: int, *rounds: tuple) -> None:
        _round_records(tmp_path, i, *rounds)

    # round 0 closed (the first peer alone) before the joiners came: they caught up, then all three averaged
    peer(0, (0, "solo", 1, "a"), (1, "averaged", 3, "b"))
    peer(1, (0, "joined_late", 1, "a"), (1, "averaged", 3, "b"))
    peer(2, (0, "joined_late", 1, "a"), (1, "averaged", 3, "b"))
    s = scale.summarize(tmp_path)
    assert s["peer_rounds"] == 4 and s["participation"] == 1.0 and s["one_model_rounds"] == 2
    assert s["per_peer"]["peer-1"]["outcomes"] == {"joined_late": 1, "averaged": 1}
    # a group of 3 of which one member was killed before it could record the round: the two live ones were full
    peer(2, (0, "joined_late", 1, "a"))
    assert scale.summarize(tmp_path)["participation"] == 1.0
    # the joiners averaged round 0 again among themselves: two models, and nobody's round 0 was full
    peer(1, (0, "averaged", 2, "x"), (1, "healed", 3, "b"))
    peer(2, (0, "averaged", 2, "x"), (1, "healed", 3, "b"))
    s = scale.summarize(tmp_path)
    assert s["split_rounds"] == [0] and s["participation"] == round(3 / 6, 4)


def test_scale_reports_the_protocol_cost_per_peer_and_its_busiest_dht_node(tmp_path, capsys):
    scale = _scale()
    for i in range(3):
        _round_records(tmp_path, i, (0, "averaged", 3, "a"), (1, "averaged", 3, "b"), (2, "averaged", 3, "c"))

    def add(i: int, **fields) -> None:  # the same fields on each of peer i's round records
        path = tmp_path / f"peer-{i}" / "metrics.jsonl"
        recs = [{**json.loads(line), **fields} for line in path.read_text().splitlines()]
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    add(0, dht_reads=3, dht_served=40, dht_served_bytes=12000, phases={"matchmaking": 0.5, "allreduce": 0.1})
    add(1, dht_reads=3, dht_served=10, dht_served_bytes=2000, phases={"matchmaking": 0.25})
    add(2, dht_reads=4)  # an older peer's records: no served figures, no phases
    s = scale.summarize(tmp_path)
    p0, p2 = s["per_peer"]["peer-0"], s["per_peer"]["peer-2"]
    assert p0["dht_served_per_round"] == 40 and p0["dht_served_kb_per_round"] == 12.0
    assert p0["matchmaking_s_median"] == 0.5
    assert p2["dht_served_per_round"] is None and p2["matchmaking_s_median"] is None
    cost = s["cost"]
    assert cost["dht_reads_per_round"] == 3 and cost["dht_served_per_round"] == 25
    assert cost["matchmaking_s_median"] == 0.375  # the median of the two peers' medians
    assert cost["cpu_s_per_round"] is None and cost["pss_mb"] is None  # sampled by a live run only
    assert cost["busiest_dht_node"] == {"peer": "peer-0", "dht_served_per_round": 40, "dht_served_kb_per_round": 12.0,
                                        "by_kind": None}
    # --summarize on an older run's summary.json (CPU and RSS sampled, no PSS): what it lacks is None
    (tmp_path / "summary.json").write_text(json.dumps({"per_peer": {f"peer-{i}": {"cpu_s": 30.0, "rss_mb": 1100.0}
                                                                    for i in range(3)}}))
    assert scale.main(["--summarize", str(tmp_path)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["per_peer"]["peer-1"]["cpu_s_per_round"] == 10.0 and again["per_peer"]["peer-1"]["pss_mb"] is None
    assert again["cost"]["cpu_s_per_round"] == 10.0 and again["cost"]["rss_mb"] == 1100.0
    assert again["cost"]["pss_mb"] is None and again["cost"]["busiest_dht_node"]["peer"] == "peer-0"
    # no round record carries the served figures at all: no busiest node
    for i in (0, 1):
        add(i, dht_reads=3)
        path = tmp_path / f"peer-{i}" / "metrics.jsonl"
        path.write_text("".join(line.replace('"dht_served', '"old_served') + "\n"
                                for line in path.read_text().splitlines()))
    assert scale.summarize(tmp_path)["cost"]["busiest_dht_node"] is None
