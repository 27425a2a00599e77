"""Issue 26, equal tokens: federated runs are scored at exactly the centralized run's token count on their eval
curve (bench/sweep.py ppl_at_tokens), and the sweep's configs plan exactly the centralized run's tokens."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from conftest import REPO, load_bench


@pytest.fixture(scope="module")
def sweep():
    return load_bench("sweep")


# ---- interpolation ----------------------------------------------------------------------------------------
def test_ppl_at_tokens_is_linear_in_log_ppl_between_evaluations(sweep):
    curve = [(100, 800.0), (200, 200.0), (300, 100.0)]
    assert sweep.ppl_at_tokens(curve, 200) == 200.0  # on an evaluation: that evaluation
    assert sweep.ppl_at_tokens(curve, 150) == pytest.approx(400.0)  # halfway: the geometric mean
    assert sweep.ppl_at_tokens(curve, 275) == pytest.approx(math.exp(math.log(200) + 0.75 * math.log(0.5)))
    assert sweep.ppl_at_tokens([(100, 50.0)], 100) == 50.0


def test_ppl_at_tokens_extrapolates_one_eval_interval_at_most_and_says_so(sweep):
    curve = [(100, 400.0), (200, 200.0)]
    # the last segment's slope goes on: one interval past the end halves the ppl once more
    assert sweep.ppl_at_tokens(curve, 300) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="more than one eval interval"):
        sweep.ppl_at_tokens(curve, 301)
    with pytest.raises(ValueError, match="before the first evaluation"):
        sweep.ppl_at_tokens(curve, 99)
    with pytest.raises(ValueError, match="past the only evaluation"):
        sweep.ppl_at_tokens([(100, 50.0)], 101)
    with pytest.raises(ValueError, match="no evaluations"):
        sweep.ppl_at_tokens([], 1)


def rec(key, side, curve, budget=1.0):
    return {"key": key, "config": {"side": side, "budget": budget, "params": {}}, "axis": "base",
            "final_ppl": curve[-1][1], "curve": curve, "wall_s": 1.0}


def test_equal_tokens_scores_each_federated_run_at_the_best_central_runs_tokens(sweep):
    recs = [rec("c", "central", [[500, 200.0], [1000, 100.0]]), rec("c2", "central", [[1000, 150.0]]),
            rec("over", "fed-iid", [[520, 400.0], [1040, 200.0]]),  # ran 4% past the budget (the swarm clock)
            rec("under", "fed-noniid", [[480, 300.0], [960, 240.0]]),  # stopped 4% short
            rec("twice", "fed-iid", [[1000, 160.0], [2000, 90.0]])]  # planned for 2x the tokens
    rows = {r["key"]: r for r in sweep.equal_tokens(recs, "runs.jsonl")}
    assert set(rows) == {"over", "under", "twice"}
    over = rows["over"]
    assert over["central_key"] == "c" and over["tokens"] == 1040 and over["central_tokens"] == 1000
    assert over["ratio_end"] == 2.0 and over["ratio_equal_tokens"] > 2.0  # the extra tokens had flattered it
    assert over["ppl_equal_tokens"] == pytest.approx(sweep.ppl_at_tokens(recs[2]["curve"], 1000), abs=1e-3)
    assert over["how"] == "interpolated between the evaluations at 520 and 1040 tokens"
    assert rows["under"]["how"] == "extrapolated 40 tokens past the last evaluation (960 tokens)"
    assert rows["under"]["ratio_equal_tokens"] < rows["under"]["ratio_end"]
    assert "ratio_equal_tokens" not in rows["twice"] and "other tokens (2.00x)" in rows["twice"]["skipped"]


def test_equal_tokens_cli_records_the_command_and_commit(sweep, tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in [rec("c", "central", [[500, 200.0], [1000, 100.0]]),
                                                            rec("f", "fed-iid", [[520, 400.0], [1040, 200.0]])]))
    argv = ["--equal-tokens", str(runs), "--results", str(tmp_path)]
    assert sweep.main(argv) == 0
    doc = json.loads((tmp_path / "equal_tokens.json").read_text())
    assert doc["command"] == "python bench/sweep.py " + " ".join(argv) and doc["commit"]
    assert [r["key"] for r in doc["runs"]] == ["f"]


def test_the_committed_equal_tokens_file_is_what_its_curves_give(sweep):
    """Every row of bench/results/sweep/equal_tokens.json recomputes from its raw file's two curves."""
    doc = json.loads((REPO / "bench" / "results" / "sweep" / "equal_tokens.json").read_text())
    assert doc["command"].startswith("python bench/sweep.py --equal-tokens")
    records = {}
    for row in doc["runs"]:
        if row["file"] not in records:
            records[row["file"]] = sweep.load_all(REPO / row["file"])
        # a key run twice (two sweeps raced once) has two records: the row is one of them
        fed = next(r for r in records[row["file"]] if r["key"] == row["key"] and r["curve"][-1][0] == row["tokens"])
        central = next(r for r in records[row["file"]] if r["key"] == row["central_key"])
        assert row["central_tokens"] == central["curve"][-1][0]
        if "skipped" not in row:
            ppl = sweep.ppl_at_tokens(fed["curve"], row["central_tokens"])
            assert row["ppl_equal_tokens"] == pytest.approx(ppl, abs=1e-3)
            assert row["ratio_equal_tokens"] == pytest.approx(ppl / central["final_ppl"], abs=1e-4)


# ---- budget arithmetic ------------------------------------------------------------------------------------
def planned_tokens(spec, seq_len: int = 128) -> int:
    """The tokens a run's overrides set it to train (the last override of a key wins, as in load_config):
    max_steps x batch for the centralized run, silos x rounds x H x batch for a federation."""
    o = dict(x.split("=", 1) for x in spec.overrides)
    seq_len = int(o.get("model.seq_len", seq_len))
    if not spec.federated:
        return int(o["train.max_steps"]) * int(o["train.batch_size"]) * seq_len
    return len(spec.silo_data) * int(o["federation.rounds"]) * int(o["federation.local_steps"]) \
        * int(o["train.batch_size"]) * seq_len


@pytest.fixture
def data(tmp_path):
    return {n: tmp_path / n for n in ("union", "shakespeare", "kjv", "brown")}


def test_every_planned_federation_trains_the_centralized_runs_tokens_exactly(sweep, data):
    args = argparse.Namespace(eval_batches=8, central_threads=2, round_deadline=120.0)
    for stage in sweep.BUDGETS:
        central = planned_tokens(sweep.spec_of(sweep.make("central", stage, {}), data, args))
        assert central == sweep.steps_of(sweep.BUDGETS[stage]) * sweep.PEERS * sweep.SILO_BATCH * 128
        for h in (8, 16, 32, 64):
            if sweep.steps_of(sweep.BUDGETS[stage]) % h:
                continue  # spec_of refuses an H that does not divide the budget (tests/test_sweep.py)
            for side in ("fed-iid", "fed-noniid"):
                spec = sweep.spec_of(sweep.make(side, stage, {"H": h}), data, args)
                assert planned_tokens(spec) == central, (stage, h, side)
    assert planned_tokens(sweep.spec_of(sweep.make("central", "full", {}), data, args)) == 3_145_728  # 3.15 M


def test_the_photon_125m_runs_plan_equal_tokens_unless_a_batch_override_says_otherwise(data):
    """bench/fed_sim.py's photon-125m runs (bench/results/sim-125m): seq 512, 256 steps per silo; the run with
    train.batch_size=32 was planned for twice the tokens (equal_tokens.json skips it)."""
    fed_sim = load_bench("fed_sim")
    sweep = fed_sim.sweep
    extra = ["model.seq_len=512", "train.grad_accum=1"]

    def spec(side, more=()):
        c = sweep.make(side, "full", {"H": 8} if side != "central" else {})
        c |= {"budget": 0.6667, "preset": "photon-125m", "extra": extra + list(more)}
        return fed_sim.spec_of(c, data)
    central = planned_tokens(spec("central"))
    assert central == 8_388_608
    assert planned_tokens(spec("fed-iid")) == central
    assert planned_tokens(spec("fed-iid", ["train.batch_size=32"])) == 2 * central
