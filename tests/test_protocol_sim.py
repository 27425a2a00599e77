"""bench/protocol_sim.py: its calibration arithmetic and the swarm it simulates with the daemon's own rules."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import protocol_sim as ps  # noqa: E402


def test_fits_recover_the_line_and_the_power_law_they_were_drawn_from():
    assert ps.fit_line([8, 16, 32], [1.0 + 0.5 * n for n in (8, 16, 32)]) == pytest.approx((1.0, 0.5))
    assert ps.fit_line([16], [3.0]) == (3.0, 0.0)  # one point: a constant
    a, b = ps.fit_power([8, 16, 32], [0.3 * n ** 2 for n in (8, 16, 32)])
    assert (a, b) == (pytest.approx(0.3), pytest.approx(2.0))


def test_within_is_relative_with_an_absolute_floor():
    assert ps.within(1.2, 1.0) and not ps.within(1.3, 1.0)
    assert ps.within(0.3, 0.1, floor=0.25) and not ps.within(0.3, 0.1)


def test_a_calm_swarm_holds_one_model_in_one_full_group_every_round():
    out = ps.simulate(ps.Setup(peers=8, rounds=6))
    assert out["rounds_total"] == 6 and out["one_model_rounds"] == 6 and out["participation"] == 1.0
    assert out["round_overhead_s"]["median"] == pytest.approx(ps.Setup().form_s, abs=0.1)


def test_a_crashed_member_delays_its_group_by_about_one_budget_and_the_swarm_keeps_one_model():
    calm = ps.simulate(ps.Setup(peers=8, rounds=10))
    churned = ps.simulate(ps.Setup(peers=8, rounds=10, churn=0.1, seed=3))
    assert churned["events"] > 0
    assert churned["round_overhead_s"]["max"] > calm["round_overhead_s"]["max"]
    budget = ps.Setup().matchmaking_time
    assert churned["round_overhead_s"]["max"] <= 2 * budget + ps.Setup().form_s + 1.0
    assert churned["one_model_rounds"] >= churned["rounds_total"] - churned["events"]


def test_calibration_fits_the_assembly_cost_that_the_measured_runs_add():
    # Runs "measured" from the simulator itself with a known assembly cost (0.01 × N²: peers sharing one machine's
    # CPU): the fit must find it again, and the calibrated model must then reproduce every run.
    truth = {"form_s": 0.0, "form_coef": 0.01, "form_exp": 2.0}
    runs = []
    for n in (8, 16):
        out = ps.simulate(replace(ps.Setup(peers=n, rounds=4), **truth))
        runs.append({"peers": n, "participation": out["participation"], "round_overhead_s": out["round_overhead_s"],
                     "config": {"rounds": 4, "local_steps": 16, "step_s": 0.25, "numel": 65536}})
    cal = ps.calibrate(runs, seeds=1)
    assert cal["form_coef"] == pytest.approx(0.01, rel=0.3) and cal["form_exp"] == pytest.approx(2.0, abs=0.2)
    assert all(r["participation_ok"] and r["overhead_ok"] for r in cal["runs"])

