"""The end of peers/local_swarm.py: one PNG of every silo's curves and a summary that says if all hold one model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from photon_p2p.metrics import format_swarm_summary, one_model, silo_summary

REPO = Path(__file__).resolve().parent.parent


def write_silo(run_dir: Path, fingerprints: list[str], solo_rounds: tuple[int, ...] = (), ppl: float = 80.0) -> Path:
    run_dir.mkdir(parents=True)
    records = []
    for i, fp in enumerate(fingerprints, start=1):
        records.append({"kind": "step", "step": 10 * i, "tokens": 1000 * i, "loss": 6.0 - i / 2})
        solo = i in solo_rounds
        records.append({"kind": "round", "round": i, "step": 10 * i, "tokens": 1000 * i, "solo": solo,
                        "fingerprint": fp, "participation": (i - sum(r <= i for r in solo_rounds)) / i})
    records.append({"kind": "eval", "step": 10 * len(fingerprints), "tokens": 1000 * len(fingerprints),
                    "val_loss": 4.4, "val_ppl": ppl})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_summary_of_silos_on_one_model(tmp_path):
    dirs = [write_silo(tmp_path / "peer-0", ["aa", "bb", "cc" * 32]),
            write_silo(tmp_path / "peer-1", ["aa", "bb", "cc" * 32], solo_rounds=(2,), ppl=90.5)]
    silos = [silo_summary(d) for d in dirs]
    assert silos[1] == {"silo": "peer-1", "rounds": 3, "averaged": 2, "participation": 2 / 3, "val_ppl": 90.5,
                        "round": 3, "fingerprint": "cc" * 32}
    ok, text = one_model(silos)
    assert ok and text == "one model: all 2 silos hold cccccccc at round 3"
    table = format_swarm_summary(silos)
    assert "peer-1" in table and "2/3" in table and "90.50" in table and "0.67" in table


def test_summary_says_when_silos_differ(tmp_path):
    a = silo_summary(write_silo(tmp_path / "a", ["x1", "x2"]))
    b = silo_summary(write_silo(tmp_path / "b", ["x1", "y2"]))
    c = silo_summary(write_silo(tmp_path / "c", ["x1"]))
    assert one_model([a, b]) == (False, "2 different models at round 2: x2 (a), y2 (b)")
    assert one_model([a, c])[0] is False and "different rounds (1, 2)" in one_model([a, c])[1]
    missing = silo_summary(tmp_path / "never-started")
    assert missing["rounds"] == 0 and one_model([a, missing])[0] is False
    assert "never-started" in format_swarm_summary([a, missing])


def test_local_swarm_report_writes_the_png(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("local_swarm", REPO / "peers" / "local_swarm.py")
    local_swarm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_swarm)
    dirs = [write_silo(tmp_path / f"peer-{i}", ["f0", "f1"]) for i in range(3)]
    assert local_swarm.report(dirs + [tmp_path / "peer-3"], tmp_path) is False  # peer-3 never started
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "peer-2" in out and "2/2" in out and str(tmp_path / "metrics.png") in out
    assert local_swarm.report(dirs, tmp_path) is True
    assert "one model: all 3 silos hold f1 at round 2" in capsys.readouterr().out


@pytest.mark.slow
def test_local_swarm_end_to_end_summary(tmp_path):
    """Two real daemons through peers/local_swarm.py: the PNG, the summary and one model at the end."""
    sets = []
    for key, value in {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 64,
                       "train.batch_size": 8, "train.warmup_steps": 5, "train.eval_every": 10, "train.eval_batches": 2,
                       "train.log_every": 5, "federation.local_steps": 5, "federation.round_clock": "steps",
                       "federation.matchmaking_time": 2.0, "federation.round_deadline": 25.0,
                       "federation.allreduce_timeout": 10.0, "federation.state_sync_timeout": 10.0,
                       "network.bootstrap_timeout": 15.0}.items():
        sets += ["--set", f"{key}={value}"]
    r = subprocess.run([sys.executable, str(REPO / "peers" / "local_swarm.py"), "--peers", "2", "--rounds", "2",
                        "--out", str(tmp_path), "--run-id", "report-test", *sets],
                       capture_output=True, text=True, timeout=280, env=cli_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    assert "local_swarm: summary" in r.stdout and "peer-1" in r.stdout
    assert "one model: all 2 silos hold" in r.stdout, r.stdout[-3000:]
