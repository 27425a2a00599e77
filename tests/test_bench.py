"""The benchmark scripts a user runs from bench/: the scale model rebuilds from the committed measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


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
