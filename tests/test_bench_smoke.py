"""Every bench/ script still runs: its smallest setting here, or, where even that needs root and network namespaces,
real daemons or minutes, its --help, its report code on the committed results and its main pieces, with a real
tiny run under -m slow (run the slow ones under `flock /tmp/photon-bench.lock`: they start peers and train)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO
from deadlines import within

RESULTS = REPO / "bench" / "results"
SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "toolkit")


def run(script: str, *args: object, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT.py ARGS` from the repository root; it must exit 0."""
    proc = subprocess.run([sys.executable, f"bench/{script}.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=within(timeout), env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_bench(name: str) -> ModuleType:
    """bench/NAME.py, imported as the scripts import each other (bench/ on sys.path, not a package)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


@pytest.fixture
def main_of(monkeypatch):
    """bench/NAME.py's main() in this process, with ARGV as its command line; returns its exit code."""
    def call(name: str, *argv: object) -> int | None:
        mod = load_bench(name)
        monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", *map(str, argv)])
        return mod.main()
    return call


def copy(rel: str, dst: Path) -> Path:
    """A copy of bench/results/REL (file or dir) under ``dst``: scripts rewrite what they report from."""
    src = RESULTS / rel
    out = dst / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, out)
    return out


def netns_or_skip(nat: bool = False) -> None:
    why = load_bench("nat_net").nat_unsupported_reason() if nat else load_bench("netns").unsupported_reason()
    if why:
        pytest.skip(f"no network namespaces here: {why}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, main_of, capsys):
    with pytest.raises(SystemExit) as e:
        main_of(name, "--help")
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_toolkit_pieces(tmp_path):
    kit = load_bench("toolkit")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "round", "round": 1}\n{"kind": "eval"}\n{"kind": "rou')
    assert kit.records(tmp_path) == [{"kind": "round", "round": 1}, {"kind": "eval"}]  # the torn line is skipped
    assert kit.records(tmp_path, "eval") == [{"kind": "eval"}] and kit.records(tmp_path / "nope") == []
    cmd = kit.peer_cmd(tmp_path, ["a=1"], initial=["/ip4/x"], run_id="r", host="10.0.0.1")
    assert cmd[1:4] == ["-m", "photon_p2p.cli", "run"] and cmd[-2:] == ["--initial-peers", "/ip4/x"]
    assert ["--set", "a=1"] == cmd[cmd.index("--set"):][:2] and "/ip4/10.0.0.1/tcp/0" in cmd
    assert kit.wrapped_silo(["--x", "v", "--", "run"], "--x", "u") == ("v", ["run"])
    assert kit.wrapped_silo(["run"], "--x", "u") is None
    with pytest.raises(kit.BenchError, match="usage: u"):
        kit.wrapped_silo(["--x", "v"], "--x", "u")
    assert kit.fmt(None) == "-" and kit.fmt(1.234, ".1f") == "1.2" and kit.mean([], None) is None
    kit.write_json(tmp_path / "a" / "b.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"k": 1}
    with kit.bench_lock(str(tmp_path / "lock")) as t:
        assert t > 0


# ---- the smallest real runs ---------------------------------------------------------------------------------------
def test_scale_model(main_of, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main_of("scale_model", "--out", tmp_path / "m") == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["rows"] and doc["checks"] and (tmp_path / "m.png").stat().st_size > 10_000


def test_gpu_throughput(tmp_path):
    run("gpu_throughput", "--smoke", "--compile", "off", "--out", tmp_path / "g.json")
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["throughput"][0]["ratio"] > 0 and doc["largest_fsdp_ac_preset"] == "tiny"


def test_trainer_throughput():
    out = run("trainer_throughput", "--steps", 1, "--repeats", 1, "--set", "model.seq_len=32",
              "--set", "train.batch_size=2").stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["trainer_tok_s"] > 0 and row["bare_tok_s"] > 0 and row["device"] in ("cpu", "cuda")


def test_trainer_throughput_against_a_commit():
    out = run("trainer_throughput", "--ref", "HEAD", "--steps", 1, "--repeats", 1).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["ref_tok_s"] > 0 and row["this_tok_s"] > 0 and len(row["samples"]["ref"]) == 1


def test_make_embedded_corpus(main_of, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "shakespeare.txt").write_text("".join(f"=== play {i} ===\nTo be, or not {i}.\n" for i in range(8)))
    (src / "kjv.txt").write_text("Genesis\n" + "In the beginning.\n" * 40 + "Matthew\n" + "Blessed are they.\n" * 40)
    (src / "brown.txt").write_text("".join(f"A line of prose {i}.\n" for i in range(200)))
    main_of("make_embedded_corpus", "--source-dir", src, "--target-bytes", 400, "--skip-tokenizer",
            "--assets", tmp_path / "corpus")
    import lzma

    kjv = lzma.decompress((tmp_path / "corpus" / "kjv.txt.xz").read_bytes()).decode()
    assert "In the beginning" in kjv and "Blessed" in kjv and len(kjv) <= 500


def test_scenarios_reports(main_of, tmp_path, capsys):
    """The three families' tables from the committed results (their runs: -m slow)."""
    res = copy("one_model", tmp_path)
    assert main_of("scenarios", "one-model", "--report-only", "--results", res, "--out", tmp_path / "none") == 0
    assert "| three | new" in (res / "table.md").read_text() and "lr50 (new)" in capsys.readouterr().out
    res = copy("trust", tmp_path)
    assert main_of("scenarios", "trust", "--report-only", "--results", res, "--out", tmp_path / "none") == 0
    assert "| honest-none |" in (res / "table.md").read_text()
    assert main_of("scenarios", "adversary", "--table", "--results", copy("adversary", tmp_path)) == 0
    assert "| forged-state |" in capsys.readouterr().out


def test_scenario_silos(tmp_path, monkeypatch):
    sc = load_bench("scenarios")
    monkeypatch.setenv(sc.NOTE_ENV, "")  # attack_swarm sets it for its silos: undone after the test
    trust = sc.trust_swarm("collude", tmp_path / "t", tmp_path / "val", 1, 2)
    hostile = sc.attack_swarm("dht-wipe", 2, tmp_path / "a", tmp_path / "val", 1, 2)
    script = str(REPO / "bench" / "scenarios.py")
    for sw, silo, change in ((trust, 3, "tamper:scale:1e4"), (hostile, 2, "hostile:dht-wipe")):
        sw.maddrs = ["/ip4/127.0.0.1/tcp/1/p2p/x"]
        assert sw.cmd(silo)[1:6] == [script, "--silo", change, "--", "run"] and "--initial-peers" in sw.cmd(silo)
        assert sw.cmd(1)[1:4] == ["-m", "photon_p2p.cli", "run"] and "--initial-peers" not in sw.cmd(0)
    with pytest.raises(sc.BenchError, match="unknown silo change"):
        sc.changed_silo("nope:1", ["run"])
    assert sc.parse_args(["one-model", "--scenarios", "three", "lr50", "--code", "new"]).scenarios == ["three", "lr50"]


def test_sweep(main_of, tmp_path, capsys):
    res = copy("sweep", tmp_path)
    assert main_of("sweep", "--list", "--results", res) == 0
    assert "done " in capsys.readouterr().out
    assert main_of("sweep", "--report-only", "--results", res) == 0
    assert "| key | side |" in (res / "sweep.md").read_text()
    assert main_of("sweep", "--equal-tokens", res / "runs.jsonl", "--results", tmp_path / "eq") == 0
    assert json.loads((tmp_path / "eq" / "equal_tokens.json").read_text())["runs"]


def test_fed_sim(main_of, tmp_path, capsys):
    assert main_of("fed_sim", "--smoke", "--list", "--results", tmp_path / "r") == 0
    assert "central" in capsys.readouterr().out
    res = copy("sim-125m", tmp_path)
    assert main_of("fed_sim", "--report-only", "--results", res) == 0
    assert (res / "curves.png").stat().st_size > 10_000


def test_convergence(tmp_path):
    conv = load_bench("convergence")
    curve = [(100, 400.0), (200, 100.0)]
    assert conv.tokens_to_reach(curve, 200.0) == pytest.approx(150.0)
    runs = {"central": {"final_ppl": 100.0, "curve": curve}, "fed-iid": {"final_ppl": 110.0, "curve": curve},
            "fed-noniid": {"final_ppl": 120.0, "curve": curve}, "diloco-noniid": {"final_ppl": 130.0, "curve": curve}}
    summary = conv.compare(runs, 1.05)
    assert summary["ratio_fed-iid_over_central"] == 1.1 and summary["photon_vs_diloco"]["target_ppl"] == 136.5
    args = conv.argparse.Namespace(local_steps=8, rounds=2, peers=2, eval_batches=1, round_deadline=60.0,
                                   eval_every_rounds=1, central_lr=3e-3, central_threads=1, runs=conv.ALL_RUNS)
    specs = conv.run_specs(args, {s: tmp_path / s for s in [*conv.SOURCES, "union"]})
    assert [s.name for s in specs] == conv.ALL_RUNS and "train.max_steps=16" in specs[0].overrides
    for i, ppl in enumerate((300.0, 200.0)):
        d = tmp_path / "fed-iid" / f"peer-{i}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"kind": "round", "round": 1, "tokens": 10, "val_ppl": ppl,
                                                     "solo": False, "group_size": 2, "averaging_s": 1.0}) + "\n")
    s = conv.summarize("fed-iid", tmp_path / "fed-iid")
    assert s["curve"] == [(20, 300.0)] and s["peer_rounds"] == 2 and s["solo_rounds"] == 0


def test_allreduce_speed(main_of, tmp_path):
    main_of("allreduce_speed", "--replot", RESULTS / "allreduce_speed.json", "--out", tmp_path / "a")
    assert "| peers | case | gloo (s) |" in (tmp_path / "a.md").read_text()
    ar = load_bench("allreduce_speed")
    args = ar.parse_args(["--codecs", "none", "fp16", "--oversized-target", "8"])
    assert ar.cases(args)[-1] == ("none, target 8", "none", 8) and "bulk" not in ar.modes_for("fp16", args)


def test_dht_cost(main_of, capsys):
    with pytest.raises(SystemExit) as e:  # the smallest swarm it measures is 4 nodes (-m slow)
        main_of("dht_cost", "--nodes", 2)
    assert e.value.code == 2 and "at least 4" in capsys.readouterr().err


def test_stop_latency():
    sl = load_bench("stop_latency")
    log = "a\nTraceback (most recent call last):\n  File x\n    y()\nValueError: bad\nmore"
    assert sl.last_exception(log) == "ValueError: bad" and os.getpid() in sl.session_pids(os.getsid(0))


# ---- the netns benchmarks: their reports from the committed results, their testbeds' plans --------------------------
@pytest.mark.parametrize("name,raw", [("comm_bytes", "comm_bytes"), ("low_bandwidth", "low_bandwidth"),
                                      ("low_bandwidth", "overlap_seeds"), ("nat", "nat")])
def test_netns_benchmark_reports(name, raw, main_of, tmp_path):
    shutil.copy(RESULTS / f"{raw}.json", tmp_path / "r.json")
    assert main_of(name, "--replot", "--out", tmp_path / "r") == 0
    assert (tmp_path / "r.md").read_text().count("|") > 20 and (tmp_path / "r.png").stat().st_size > 10_000


def test_netns():
    netns = load_bench("netns")
    tb = netns.Testbed(3, rate_mbit=10)  # what it would build: nothing is built before setup()
    assert tb.n == 3 and tb.bridge and len(set(tb.addrs)) == 3 and all(a.startswith(tb.subnet) for a in tb.addrs)
    assert tb.argv(1, ["true"]) == ["ip", "netns", "exec", tb.ns[1], "true"]
    with pytest.raises(netns.NetnsError):
        netns.Testbed(1)


def test_nat_net():
    nat_net = load_bench("nat_net")
    tb = nat_net.NatTestbed(public=2, nats=2)
    assert tb.addr(tb.public(1)) == "10.77.0.2" and tb.addr(tb.volunteer(1)) == "192.168.2.2"
    assert tb.others == [tb.hub, *tb.routers] and tb.ifnames == ["eth0"] * 4


def test_relay_probe():
    probe = load_bench("relay_probe")
    compile(probe.NODE, "relay_probe.NODE", "exec")  # the node script each namespace runs


# ---- real tiny runs (-m slow) ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_netns_self_check():
    netns_or_skip()
    for peers in (2, 3):
        out = run("netns", "--peers", peers, "--mb", 1).stdout
        assert json.loads(out.splitlines()[0])["wire_tx_bytes"] > 2**20 and "teardown ok" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nat_net_self_check():
    netns_or_skip(nat=True)
    out = run("nat_net").stdout
    assert "NAT testbed ok" in out or out.startswith("skipped:")


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_comm_bytes_run(tmp_path, kjv_data):
    netns_or_skip()
    run("comm_bytes", "--local-steps", 4, "--codecs", "none", "--rounds", 2, "--ddp-reps", 1, "--data", kjv_data,
        "--runs", tmp_path / "runs", "--out", tmp_path / "c", timeout=600)
    s = json.loads((tmp_path / "c.json").read_text())["settings"][0]
    assert s["wire_bytes_per_round"] > s["daemon_bytes_per_round"] > 0


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_low_bandwidth_run(tmp_path, kjv_data):
    netns_or_skip()
    run("low_bandwidth", "--rates", 100, "--seconds", 45, "--local-steps", 4, "--set", "train.eval_every=4",
        "--data", kjv_data, "--runs", tmp_path / "runs", "--out", tmp_path / "l", timeout=600)
    runs = json.loads((tmp_path / "l.json").read_text())["runs"]
    assert {r["system"] for r in runs} == {"photon_p2p", "ddp-gloo"} and all(r["inner_steps"] > 0 for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_overlap_run(tmp_path, kjv_data):
    netns_or_skip()
    run("low_bandwidth", "--report", "overlap", "--rates", 100, "--seconds", 40, "--local-steps", 4, "--systems",
        "overlap", "--data", kjv_data, "--runs", tmp_path / "runs", "--out", tmp_path / "o", timeout=600)
    (r,) = json.loads((tmp_path / "o.json").read_text())["runs"]
    assert r["system"] == "overlap" and r["inner_steps"] > 0


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_nat_run(tmp_path, kjv_data):
    netns_or_skip(nat=True)
    run("nat", "--scenarios", "reachable", "--rounds", 1, "--local-steps", 2, "--batch-size", 2, "--data", kjv_data,
        "--runs", tmp_path / "runs", "--out", tmp_path / "n", timeout=600)
    (s,) = json.loads((tmp_path / "n.json").read_text())["scenarios"]
    assert s["peers"] and all(p["rc"] == 0 and p["rounds"] >= 1 for p in s["peers"])


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_relay_probe_run(tmp_path):
    netns_or_skip(nat=True)
    run("relay_probe", "--messages", 2, "--message-kb", 4, "--logs", tmp_path / "logs", "--out", tmp_path / "r.json",
        timeout=300, env={"PROBE_RELAY_S": "60"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["volunteers"]) == 2 and all("role" in v or "error" in v for v in doc["volunteers"])


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_allreduce_speed_run(tmp_path):
    run("allreduce_speed", "--mb", 1, "--peers", 2, "--codecs", "none", "--modes", "tuned", "bulk-plain",
        "--repeats", 1, "--oversized-target", 0, "--out", tmp_path / "a", timeout=600)
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"gloo", "tuned", "bulk-plain"} and all(r["round_s"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_dht_cost_run(tmp_path):
    run("dht_cost", "--nodes", 4, "--out", tmp_path / "d.json", timeout=300)
    rows = json.loads((tmp_path / "d.json").read_text())
    assert [r["cache_locally"] for r in rows] == [True, False] and all("read, latest=True" in r for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(460)
def test_stop_latency_run(tmp_path):
    run("stop_latency", "--peers", 2, "--trials", 1, "--limit", 60, "--out", tmp_path / "s.json", timeout=400)
    (trial,) = json.loads((tmp_path / "s.json").read_text())["trials"]
    assert len(trial["exits"]) == 2 and not any(e.get("hung") for e in trial["exits"])


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_fed_sim_run(tmp_path, kjv_data):
    root = tmp_path / "data"
    for name in ("union", "shakespeare", "kjv", "brown"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).symlink_to(kjv_data, target_is_directory=True)
    run("fed_sim", "--smoke", "--data", root, "--results", tmp_path / "r", "--runs", tmp_path / "runs", timeout=300)
    assert len((tmp_path / "r" / "runs.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.timeout(960)
def test_convergence_run(tmp_path):
    run("convergence", "--runs", "central", "fed-iid", "--rounds", 2, "--local-steps", 4, "--peers", 2,
        "--eval-batches", 1, "--corpus", tmp_path / "none", "--data-cache", tmp_path / "data", "--out",
        tmp_path / "runs", "--results", tmp_path / "res", timeout=900)
    doc = json.loads((tmp_path / "res" / "convergence.json").read_text())
    assert set(doc["runs"]) == {"central", "fed-iid"} and "ratio_fed-iid_over_central" in doc["summary"]


@pytest.mark.slow
@pytest.mark.timeout(960)
def test_sweep_run(tmp_path):
    small = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "train.max_steps=8", "train.eval_every=4"]
    run("sweep", "--stages", "screen", "--max-runs", 1, "--lock", tmp_path / "lock", "--corpus", tmp_path / "none",
        "--data-cache", tmp_path / "data", "--out", tmp_path / "runs", "--results", tmp_path / "res",
        *[a for o in small for a in ("--set", o)], timeout=900)
    (rec,) = [json.loads(ln) for ln in (tmp_path / "res" / "runs.jsonl").read_text().splitlines()]
    assert rec["config"]["side"] == "central" and rec["final_ppl"] > 1


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_one_model_run(tmp_path):
    run("scenarios", "one-model", "--scenarios", "two", "--code", "new", "--cap", 120, "--corpus", tmp_path / "none",
        "--out", tmp_path / "runs", "--results", tmp_path / "res", timeout=600)
    r = json.loads((tmp_path / "res" / "two-new.json").read_text())
    assert r["peer_rounds"] > 0 and r["version_check"] == "ok"


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_trust_run(tmp_path):
    run("scenarios", "trust", "--scenarios", "honest", "--rounds", 1, "--local-steps", 2, "--cap", 240, "--corpus",
        tmp_path / "none", "--out", tmp_path / "runs", "--results", tmp_path / "res", timeout=600)
    r = json.loads((tmp_path / "res" / "honest.json").read_text())
    assert r["honest_silos"] == [0, 1, 2, 3] and json.loads((tmp_path / "res" / "micro.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_adversary_run(tmp_path):
    run("scenarios", "adversary", "--attack", "speed-abuse", "--peers", 2, "--rounds", 2, "--local-steps", 2, "--cap",
        300, "--corpus", tmp_path / "none", "--out", tmp_path / "run", "--results", tmp_path / "res", timeout=600)
    r = json.loads((tmp_path / "res" / "speed-abuse.json").read_text())
    assert r["hostile"]["ran"] and r["honest_silos"] == 2
