"""bench/sweep.py: resumable, lock-serialized, coarse-to-fine planning; driven by a fast fake run function."""

from __future__ import annotations

import json

import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def sweep():
    return load_bench("sweep")


def fake_ppl(cfg) -> float:
    """A deterministic landscape: smaller H, outer lr 1.3 and inner lr 6e-3 help; central likes lr 6e-3."""
    p = cfg["params"]
    if cfg["side"] == "central":
        return 100.0 + abs(p["lr"] - 6e-3) * 1e4 - 10 * cfg["budget"]
    ppl = 150.0 + p["H"] + (20 if cfg["side"] == "fed-noniid" else 0) - 10 * cfg["budget"]
    ppl -= 5 if p["outer_lr"] == 1.3 else 0
    ppl -= 3 if p["lr"] == 6e-3 else 0
    return ppl


def make_fake(calls: list, crash_after: int | None = None):
    def run(cfg, run_dir):
        if crash_after is not None and len(calls) >= crash_after:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a run
        calls.append(cfg)
        ppl = fake_ppl(cfg)
        return {"final_ppl": ppl, "curve": [[1000, ppl * 2], [2000, ppl]], "wall_s": 10.0 + len(calls),
                "wall_curve": [[5.0, ppl * 2], [10.0 + len(calls), ppl]]}
    return run


def test_sweep_resumes_where_it_stopped_and_never_repeats_a_run(sweep, tmp_path):
    results, lock = tmp_path / "runs.jsonl", str(tmp_path / "lock")
    screen = sweep.plan(sweep.load_done(results), ["screen", "full", "long"], partial=False)
    assert {c["stage"] for c in screen} == {"screen"}  # later stages wait for the screen's results
    assert len({sweep.key_of(sweep.identity(c)) for c in screen}) == len(screen)

    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # interrupted in the middle of the 6th run
        sweep.sweep(screen, results, tmp_path / "r", make_fake(calls, crash_after=5), lock=lock, log=lambda s: None)
    lines = results.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(ln)["final_ppl"] for ln in lines)  # whole lines only

    # a --max-runs slice, then the rest: each config runs exactly once over all invocations
    ran = sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, max_runs=3, log=lambda s: None)
    assert ran == 3 and len(calls) == 8
    sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, log=lambda s: None)
    keys = [sweep.key_of(sweep.identity(c)) for c in calls]
    assert len(keys) == len(set(keys)) == len(screen)
    assert sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, log=lambda s: None) == 0

    # the screen is complete: the full stage is planned from it (base, combined winners, best two) per side
    done = sweep.load_done(results)
    full = [c for c in sweep.plan(done, ["full"], partial=False)]
    fed_iid = [c for c in full if c["side"] == "fed-iid"]
    assert [c["axis"] for c in fed_iid][:2] == ["combined", "base"]
    assert [c["axis"] for c in full][:2] == ["combined", "combined"]  # the likeliest winners first
    combined = fed_iid[0]["params"]
    assert combined["H"] == 8 and combined["outer_lr"] == 1.3 and combined["lr"] == 6e-3
    nesterov = [c["params"] for c in fed_iid if c["axis"] == "combined+nesterov"]
    assert nesterov == [combined | sweep.NESTEROV]
    central = [c for c in full if c["side"] == "central"]
    assert central[0]["params"]["lr"] == 3e-3 and any(c["params"]["lr"] == 6e-3 for c in central)
    assert all(c["budget"] == 1.0 for c in full)
    sweep.sweep(full, results, tmp_path / "r", make_fake(calls), lock=lock, log=lambda s: None)
    long = sweep.plan(sweep.load_done(results), ["long"], partial=False)
    assert len(long) == 6 and all(c["budget"] == 4.0 for c in long)  # the best two of each side

    table = sweep.table(sweep.load_done(results))
    assert "Budget 0.333x" in table and "Budget 1x" in table and "(base)" in table
    assert table.count("| fed-iid |") == len([c for c in screen + full if c["side"] == "fed-iid"])


def test_lock_budget_stops_before_a_run_that_would_not_fit(sweep, tmp_path):
    results, lock = tmp_path / "runs.jsonl", str(tmp_path / "lock")
    screen = sweep.plan({}, ["screen"], partial=False)
    calls: list = []
    # nothing known yet: the first run starts (no estimate), then the budget of 0 s is spent
    assert sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, lock_budget_s=0.0,
                       log=lambda s: None) == 1
    # every base took 100 s of lock: that is the estimate for the next run of its side, which would not fit 50 s
    for cfg in screen[1:3]:
        sweep.append(results, {"key": sweep.key_of(sweep.identity(cfg)), "config": sweep.identity(cfg),
                               "stage": "screen", "axis": "base", "final_ppl": 120.0, "wall_s": 100.0,
                               "lock_s": 100.0})
    said: list[str] = []
    assert sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, lock_budget_s=50.0,
                       log=said.append) == 0
    assert "the next run needs ~1.7 min" in said[-1] and len(calls) == 1
    assert sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, lock_budget_s=150.0,
                       max_runs=2, log=lambda s: None) == 2


def test_spec_passes_the_recipe_to_the_peers(sweep, tmp_path):
    import argparse

    args = argparse.Namespace(eval_batches=8, central_threads=2, round_deadline=120.0)
    data = {n: tmp_path / n for n in ("union", "shakespeare", "kjv", "brown")}
    cfg = sweep.make("fed-noniid", "screen", {"H": 16, "outer": "fedyogi", "outer_lr": 0.01, "momentum": 0.9},
                     "outer")
    spec = sweep.spec_of(cfg, data, args)
    assert spec.silo_data == [data["shakespeare"], data["kjv"], data["brown"], data["shakespeare"]]
    for o in ("federation.local_steps=16", "federation.rounds=8", "federation.outer_optimizer=fedyogi",
              "federation.outer_lr=0.01", "train.max_steps=128", f"data.val_dir={data['union']}"):
        assert o in spec.overrides
    central = sweep.spec_of(sweep.make("central", "long", {"lr": 6e-3}), data, args)
    assert "train.batch_size=64" in central.overrides and "train.max_steps=1536" in central.overrides
    fed = sweep.spec_of(sweep.make("fed-iid", "full", {}), data, args)
    assert "train.batch_size=16" in fed.overrides  # the silo batch, whatever the preset's own
    with pytest.raises(sweep.conv.BenchError, match="does not divide"):
        sweep.spec_of(sweep.make("fed-iid", "screen", {"H": 100}), data, args)


def test_report_only_writes_table_and_plot_from_results(sweep, tmp_path):
    results = tmp_path / "res"
    calls: list = []
    screen = sweep.plan({}, ["screen"], partial=False)[:4]
    sweep.sweep(screen, results / "runs.jsonl", tmp_path / "r", make_fake(calls), lock=str(tmp_path / "l"),
                log=lambda s: None)
    assert sweep.main(["--report-only", "--results", str(results)]) == 0
    md = (results / "sweep.md").read_text()
    assert md.count("| central |") == 1 and md.count("| fed-iid |") == 2 and "4 configuration(s) done" in md
    assert (results / "sweep.png").stat().st_size > 10_000


def test_table_compares_only_equal_tokens_and_only_runs_timed_alone(sweep):
    """A run with 2x the tokens gets no ratio; runs that shared a device (no wall curve) set no equal wall-clock;
    another preset's runs get their own group."""
    def rec(key, side, tokens, ppl, wall_curve, **cfg):
        return {"key": key, "config": {"side": side, "budget": 1.0, "params": {}, **cfg}, "axis": "base",
                "final_ppl": ppl, "curve": [[tokens, ppl]], "wall_s": 50.0, "wall_curve": wall_curve}
    recs = [rec("c", "central", 1000, 100.0, []), rec("f1", "fed-iid", 1020, 120.0, []),
            rec("f2", "fed-iid", 2000, 90.0, []),
            rec("p", "central", 500, 80.0, [[10.0, 80.0]], preset="photon-125m", extra=["model.seq_len=512"])]
    text = sweep.table(recs)
    groups = text.split("**Budget")[1:]
    assert len(groups) == 2
    other, tiny = sorted(groups, key=lambda g: "photon-125m" not in g)
    assert "no run timed alone" in tiny and "nan" not in text
    assert "| 1.200 |" in tiny and "- (other tokens)" in tiny  # 2% more tokens still compares; 2x does not
    assert "equal wall-clock = 50 s" in other and "model.seq_len=512" in other


def test_ppl_at_interpolates_in_log_ppl_and_holds_the_final_model(sweep):
    curve = [(10.0, 400.0), (20.0, 100.0)]
    assert sweep.ppl_at(curve, 15.0) == pytest.approx(200.0)  # geometric mean halfway
    assert sweep.ppl_at(curve, 5.0) is None and sweep.ppl_at(curve, 25.0) is None
    assert sweep.ppl_at(curve, 25.0, end=30.0) == 100.0 and sweep.ppl_at(curve, 31.0, end=30.0) is None


def test_a_run_finished_by_another_sweep_while_waiting_is_not_repeated(sweep, tmp_path, monkeypatch):
    results, lock = tmp_path / "runs.jsonl", str(tmp_path / "lock")
    screen = sweep.plan({}, ["screen"], partial=False)[:2]
    calls: list = []
    sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, log=lambda s: None)
    # a second sweep that planned from an empty file: it finds each record once it holds the lock
    real, stale = sweep.load_done, [True]
    monkeypatch.setattr(sweep, "load_done", lambda path: {} if stale and stale.pop() else real(path))
    said: list[str] = []
    assert sweep.sweep(screen, results, tmp_path / "r", make_fake(calls), lock=lock, log=said.append) == 0
    assert len(calls) == 2 and sum("finished by another sweep" in s for s in said) == 2
    assert len(results.read_text().splitlines()) == 2


def test_set_overrides_are_part_of_a_runs_key_and_come_last(sweep, tmp_path):
    import argparse

    cfg = sweep.plan_screen()[1]
    assert cfg["side"] != "central"
    with_clock = cfg | {"extra": ["federation.round_clock=steps"]}
    assert sweep.key_of(sweep.identity(with_clock)) != sweep.key_of(sweep.identity(cfg))
    data = {name: tmp_path / name for name in ("union", "kjv", "shakespeare", "brown")}
    args = argparse.Namespace(eval_batches=8, round_deadline=120.0, central_threads=2)
    assert sweep.spec_of(with_clock, data, args).overrides[-1] == "federation.round_clock=steps"
    assert "federation.round_clock=steps" not in sweep.spec_of(cfg, data, args).overrides
