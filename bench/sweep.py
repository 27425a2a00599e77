#!/usr/bin/env python
"""Resumable coarse-to-fine sweep: the federated recipe (4 silos, IID and non-IID) against the centralized baseline.

Usage:
  python bench/sweep.py --lock-budget-min 45   # resume; each run takes the lock (--corpus DIR: ../shared/corpus)
  python bench/sweep.py --report-only                                         # rewrite the table from runs.jsonl
  python bench/sweep.py --list                                                # what is planned, done, pending
  python bench/sweep.py --equal-tokens RESULTS/runs.jsonl ...   # score at the centralized tokens: equal_tokens.json

Every run is one of bench/convergence.py's runs (same code path: real `photon-peer run` daemons on 127.0.0.1 or
one `photon-peer train`, the same held-out set and 8 x 16 validation windows), described by a config dict whose
sha256 is its key. A finished run is appended to RESULTS/runs.jsonl (one JSON line, fsynced); re-running skips
every key already there, so an interrupted sweep resumes at the first unfinished run. Each run holds
/tmp/photon-bench.lock (flock(2), the lock `flock /tmp/photon-bench.lock` takes) only while it runs.

Stages (token budgets relative to convergence.py's 3.15 M = 384 steps x 64 sequences x 128 tokens):
  screen  1/3x  one factor at a time around the tiny preset (outer optimizer and its lr/momentum, H, inner lr,
                warmup, inner-state policy; the centralized lr and warmup), IID first, then non-IID
  full    1x    per side (central, fed-iid, fed-noniid): the base, the best 2 of the screen, and (fed) the
                combination of every screened value that beat the base on its axis
  long    4x    the best 2 of each side in the full stage
A stage is planned from the previous one once that is complete (or, with --partial, from what it has so far).

Equal tokens (issue 26): a federated run is set to rounds x H steps per silo, the centralized run's steps, but only
round_clock: steps (and bench/fed_sim.py) trains exactly that. Under the swarm clock (the daemons' default) each
silo sets its own quota of a round from its speed (photon_p2p/federation/clock.py quota; before 8025b89, each
silo stepped until its own lagging view of the swarm's total reached H x silos), nothing makes the silos' steps
sum to silos x H, and the run ends at a round number, not a token count: the daemons trained 0.4-3.1% more than
the centralized run at full budget. Only the daemon could stop a run at a swarm-wide token count, so runs are
scored at exactly the centralized run's tokens on their eval curve instead (ppl_at_tokens, --equal-tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import convergence as conv
import toolkit as kit
from toolkit import LOCK, bench_lock

BENCH = kit.REPO / "bench"

BASE_STEPS, PEERS, SILO_BATCH = 384, 4, 16  # convergence.py's budget: 12 rounds x H 32 per silo, batch 16
# screen: a third of the tokens (128 steps per silo), so that every H in 8..64 divides it (16 to 2 rounds)
BUDGETS = {"screen": 1 / 3, "full": 1.0, "long": 4.0}
BASE_FED = {"H": 32, "lr": 3e-3, "warmup": 20, "inner_state": "keep", "outer": "fedavg", "outer_lr": 1.0,
            "momentum": 0.0, "schedule": "constant"}
BASE_CENTRAL = {"lr": 3e-3, "warmup": 20}
# One factor at a time, in the order they run (most informative first): each entry changes the base.
FED_AXES: list[tuple[str, dict[str, Any]]] = [
    ("H", {"H": 8}), ("H", {"H": 16}),
    ("outer", {"outer": "nesterov", "outer_lr": 0.7, "momentum": 0.7}),  # Photon's Nesterov defaults
    ("outer", {"outer": "fedadam", "outer_lr": 1e-2, "momentum": 0.9}),
    ("inner_lr", {"lr": 6e-3}),
    ("outer", {"outer": "fedavg", "outer_lr": 1.3}),
    ("inner_state", {"inner_state": "reset"}),
    ("outer", {"outer": "fedyogi", "outer_lr": 1e-2, "momentum": 0.9}),
    ("outer", {"outer": "fedmom", "outer_lr": 1.0, "momentum": 0.5}),
    ("outer", {"outer": "nesterov", "outer_lr": 0.7, "momentum": 0.9}),  # DiLoCo's
    ("outer", {"outer": "fedadam", "outer_lr": 3e-3, "momentum": 0.9}),
    ("outer", {"outer": "fedavg", "outer_lr": 1.0, "schedule": "cosine"}),
    ("H", {"H": 64}),
    ("inner_lr", {"lr": 1.5e-3}),
    ("warmup", {"warmup": 5}), ("warmup", {"warmup": 50}),
]
CENTRAL_AXES: list[tuple[str, dict[str, Any]]] = [
    ("lr", {"lr": 6e-3}), ("lr", {"lr": 1.5e-3}), ("lr", {"lr": 1.2e-2}), ("warmup", {"warmup": 5}),
]
NESTEROV = {"outer": "nesterov", "outer_lr": 0.7, "momentum": 0.9}  # DiLoCo's outer step


def steps_of(budget: float) -> int:
    """Inner steps per silo (= centralized steps) of a budget."""
    return round(BASE_STEPS * budget)


def key_of(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def make(side: str, stage: str, params: dict[str, Any], axis: str = "base") -> dict[str, Any]:
    """A run's config: its side (central | fed-iid | fed-noniid), token budget and recipe. ``axis`` is only a
    label (what the screen varied) and stays out of the key, so the same recipe is one run however it was found."""
    base = BASE_CENTRAL if side == "central" else BASE_FED
    return {"side": side, "budget": BUDGETS[stage], "params": base | params, "stage": stage, "axis": axis}


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run: side, budget, recipe, and --set overrides when there are any."""
    out = {"side": cfg["side"], "budget": cfg["budget"], "params": cfg["params"]}
    if cfg.get("extra"):
        out["extra"] = list(cfg["extra"])
    return out


# ---- planning ---------------------------------------------------------------------------------------------
# What the screen runs first after the three bases, as (side, index into its axes): the levers most likely to
# move the gap, on IID first, with the centralized lr interleaved so both sides get tuned early.
FIRST = [("fed-iid", 0), ("fed-iid", 2), ("central", 0), ("fed-iid", 3), ("fed-iid", 4), ("fed-noniid", 0),
         ("fed-iid", 5), ("central", 1), ("fed-iid", 6), ("fed-noniid", 2), ("fed-noniid", 3)]


def plan_screen() -> list[dict[str, Any]]:
    runs = [make("central", "screen", {}), make("fed-iid", "screen", {}), make("fed-noniid", "screen", {})]
    rest = [("central", i) for i in range(len(CENTRAL_AXES))]
    rest += [(side, i) for side in ("fed-iid", "fed-noniid") for i in range(len(FED_AXES))]
    for side, i in FIRST + [x for x in rest if x not in FIRST]:
        axis, p = (CENTRAL_AXES if side == "central" else FED_AXES)[i]
        runs.append(make(side, "screen", p, axis))
    return runs


def _best(results: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    ok = [r for r in results if r.get("final_ppl")]
    return sorted(ok, key=lambda r: r["final_ppl"])[:n]


def plan_next(stage: str, done: dict[str, dict[str, Any]], prev: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``stage`` runs, chosen from the previous stage's results (``prev``: its planned configs)."""
    runs: list[dict[str, Any]] = []
    for side in ("central", "fed-iid", "fed-noniid"):
        res = [done[key_of(identity(c))] | {"cfg": c} for c in prev
               if c["side"] == side and key_of(identity(c)) in done]
        if stage == "full":
            picks, combo = [make(side, stage, {})], {}
            base = next((r for r in res if r["cfg"]["axis"] == "base"), None)
            if base and side != "central":  # fine step: every axis's best value that beat the base, combined
                for axis in dict.fromkeys(a for a, _ in FED_AXES):
                    better = [r for r in _best([r for r in res if r["cfg"]["axis"] == axis], 1)
                              if r["final_ppl"] < base["final_ppl"]]
                    if better:
                        combo |= {k: v for k, v in better[0]["cfg"]["params"].items() if v != BASE_FED[k]}
                if combo:
                    picks.append(make(side, stage, combo, "combined"))
            picks += [make(side, stage, r["cfg"]["params"], r["cfg"]["axis"]) for r in _best(res, 2)]
            if combo:
                # The screen's 4 outer steps (H = 32 at 1/3 budget) cannot credit outer momentum; the combination
                # runs 12-48 of them at full budget, so it is tried once more with DiLoCo's Nesterov outer step.
                picks.append(make(side, stage, combo | NESTEROV, "combined+nesterov"))
        else:  # long: the best two of the full stage
            picks = [make(side, stage, r["cfg"]["params"], r["cfg"]["axis"]) for r in _best(res, 2)]
        for p in picks:
            if key_of(identity(p)) not in {key_of(identity(x)) for x in runs}:
                runs.append(p)
    # Most informative first, across sides, so that a stage cut short still compares the likeliest winners:
    # the combinations, the bases, momentum on the combination and the centralized lr, then the rest.
    first = {"combined": 0, "base": 1, "combined+nesterov": 2, "lr": 2}
    return sorted(runs, key=lambda c: first.get(c["axis"], 3)) if stage == "full" else runs


def plan(done: dict[str, dict[str, Any]], stages: list[str], partial: bool) -> list[dict[str, Any]]:
    """Every planned run of ``stages``, in order; a later stage only once the one before is complete."""
    out, prev = [], plan_screen()
    for stage in ("screen", "full", "long"):
        if stage != "screen":
            complete = all(key_of(identity(c)) in done for c in prev)
            if not (complete or partial):
                break
            prev = plan_next(stage, done, prev)
        if stage in stages:
            out += prev
    return out


# ---- running ----------------------------------------------------------------------------------------------
def load_done(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def load_all(path: Path) -> list[dict[str, Any]]:
    """Every record, repeats of a key included (two sweeps raced once before the re-check under the lock)."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def append(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # one whole line per finished run, on disk before the next run starts
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def spec_of(cfg: dict[str, Any], data: dict[str, Path], args: argparse.Namespace) -> conv.RunSpec:
    """convergence.py's RunSpec for a config: the same shared held-out set and eval windows for every run."""
    p, steps = cfg["params"], steps_of(cfg["budget"])
    eval_every = 32  # inner steps between validations, whatever H (every round would tax small H)
    common = [f"data.val_dir={data['union']}", "train.eval_batch_size=16", f"train.eval_batches={args.eval_batches}",
              "train.checkpoint_every=1000000", f"train.lr={p['lr']}", f"train.warmup_steps={p['warmup']}",
              f"train.max_steps={steps}"]
    if cfg["side"] == "central":
        return conv.RunSpec("central", "tiny", [data["union"]], eval_every, common + [
            f"train.batch_size={SILO_BATCH * PEERS}", f"train.eval_every={eval_every}", "train.log_every=32",
            f"train.threads={args.central_threads}"] + list(cfg.get("extra", [])))
    h = p["H"]
    if steps % h:
        raise conv.BenchError(f"H={h} does not divide the {steps} steps of budget {cfg['budget']}")
    silos = [data["union"]] * PEERS if cfg["side"] == "fed-iid" else \
        [data[conv.SOURCES[i % len(conv.SOURCES)]] for i in range(PEERS)]
    fed = [f"train.batch_size={SILO_BATCH}", f"federation.local_steps={h}", f"federation.rounds={steps // h}", f"federation.target_group_size={PEERS}",
           f"federation.min_group_size={PEERS}", f"federation.round_deadline={args.round_deadline}",
           f"federation.allreduce_timeout={args.round_deadline / 2}", "train.threads=1", f"train.log_every={h}",
           f"federation.inner_state={p['inner_state']}", f"federation.outer_optimizer={p['outer']}",
           f"federation.outer_lr={p['outer_lr']}", f"federation.outer_momentum={p['momentum']}",
           f"federation.outer_lr_schedule={p['schedule']}"]
    return conv.RunSpec(cfg["side"], "tiny", silos, max(h, eval_every), common + fed + list(cfg.get("extra", [])))


def wall_curve(run_dir: Path, side: str, t0: float) -> list[tuple[float, float]]:
    """(seconds since the run started, val ppl) of each evaluation of the global model (silo-0 for federations)."""
    d = run_dir if side == "central" else run_dir / "peer-0"
    kind = "eval" if side == "central" else "round"
    return [(round(float(r["time"]) - t0, 1), float(r["val_ppl"])) for r in kit.records(d, kind) if "val_ppl" in r]


def real_run(cfg: dict[str, Any], run_dir: Path, data: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    spec = spec_of(cfg, data, args)
    shutil.rmtree(run_dir, ignore_errors=True)  # daemons resume from checkpoints: start clean
    timeout = 300 + 1500 * cfg["budget"]
    t0 = time.time()
    wall = (conv.run_central if cfg["side"] == "central" else conv.run_federated)(spec, run_dir, timeout)
    summary = conv.summarize("central" if cfg["side"] == "central" else spec.name, run_dir)
    return summary | {"wall_s": round(wall, 1), "wall_curve": wall_curve(run_dir, cfg["side"], t0)}


RunFn = Callable[[dict[str, Any], Path], dict[str, Any]]


def sweep(runs: list[dict[str, Any]], results: Path, run_root: Path, run_fn: RunFn, *, lock: str = LOCK,
          lock_budget_s: float = math.inf, max_runs: int | None = None, log: Callable[[str], None] = print) -> int:
    """Run every planned config not yet in ``results`` (each under the lock), appending as they finish; stop
    before a run that would not fit the lock budget. Returns how many ran."""
    done, used, ran = load_done(results), 0.0, 0
    walls: dict[tuple[str, float], float] = {}
    for rec in done.values():
        k = (rec["config"]["side"], rec["config"]["budget"])
        walls[k] = max(walls.get(k, 0.0), float(rec.get("lock_s", rec.get("wall_s", 0.0))))
    for cfg in runs:
        key = key_of(identity(cfg))
        if key in done:
            continue
        if max_runs is not None and ran >= max_runs:
            log(f"sweep: stopping after {ran} run(s) (--max-runs)")
            break
        estimate = walls.get((cfg["side"], cfg["budget"]), 0.0)
        if used + estimate > lock_budget_s:
            log(f"sweep: stopping: {used / 60:.1f} min of lock used, the next run needs ~{estimate / 60:.1f} min")
            break
        log(f"sweep: {key} {cfg['stage']} {cfg['side']} {cfg['axis']} {json.dumps(cfg['params'])}")
        with bench_lock(lock) as t_lock:
            if key in load_done(results):  # another sweep finished it while this one waited for the lock
                log(f"sweep: {key} was finished by another sweep meanwhile")
                continue
            t_start = time.monotonic()
            try:
                out = run_fn(cfg, run_root / key)
            except conv.BenchError as e:
                log(f"sweep: {key} failed: {e}")
                out = {"error": str(e)}
            t_end = time.monotonic()
        used += t_end - t_lock
        rec = {"key": key, "config": identity(cfg), "stage": cfg["stage"], "axis": cfg["axis"],
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "lock_s": round(t_end - t_start, 1), **out}
        if "error" not in out:  # a failed run is retried next time
            append(results, rec)
            done[key] = rec
            walls[(cfg["side"], cfg["budget"])] = max(walls.get((cfg["side"], cfg["budget"]), 0.0), rec["lock_s"])
            log(f"sweep: {key} final val ppl {out.get('final_ppl')} in {rec['lock_s']:.0f}s")
        ran += 1
    return ran


# ---- reporting --------------------------------------------------------------------------------------------
def ppl_at(curve: list, x: float, end: float | None = None) -> float | None:
    """Val ppl at ``x`` (tokens or seconds) on a curve of (x, ppl), linear in log-ppl; None outside it, except
    that up to ``end`` (the run's end) the last point holds: the run finished on that model."""
    if curve and end is not None and curve[-1][0] <= x <= end:
        return curve[-1][1]
    prev = None
    for cx, cp in curve:
        if cx >= x:
            if prev is None:
                return cp if cx == x else None
            (px, pp) = prev
            f = (x - px) / (cx - px) if cx != px else 1.0
            return math.exp(math.log(pp) + f * (math.log(cp) - math.log(pp)))
        prev = (cx, cp)
    return None


def _log_linear(a: tuple, b: tuple, x: float) -> float:
    """The ppl at ``x`` on the segment from point ``a`` to point ``b`` of a (tokens, ppl) curve, linear in log-ppl."""
    (ax, ap), (bx, bp) = a, b
    if x in (ax, bx):  # on an evaluation: exactly its value (a run at equal tokens keeps its end ratio)
        return ap if x == ax else bp
    return math.exp(math.log(ap) + (x - ax) / (bx - ax) * (math.log(bp) - math.log(ap)))


def ppl_at_tokens(curve: list, tokens: float) -> float:
    """Val ppl at exactly ``tokens`` on a run's eval curve of (total tokens, val ppl), linear in log-ppl between the
    two evaluations around it. This is how a federated run is scored at the centralized run's token count: the
    daemons' swarm clock ends a run a few steps past its budget (issue 26). Past the last evaluation the last
    segment's slope is followed for at most one eval interval (the last two evaluations' spacing); further out,
    or before the first evaluation, it raises ValueError saying so: that would be a guess, not a measurement."""
    if not curve:
        raise ValueError("no evaluations")
    if tokens < curve[0][0]:
        raise ValueError(f"{tokens:.0f} tokens is before the first evaluation ({curve[0][0]:.0f} tokens)")
    for a, b in zip(curve, curve[1:]):
        if a[0] <= tokens <= b[0]:
            return _log_linear(a, b, tokens)
    last = curve[-1]
    if tokens == last[0]:
        return last[1]
    if len(curve) < 2:
        raise ValueError(f"{tokens:.0f} tokens is past the only evaluation ({last[0]:.0f} tokens)")
    interval = last[0] - curve[-2][0]
    if tokens - last[0] > interval:
        raise ValueError(f"{tokens:.0f} tokens is {tokens - last[0]:.0f} past the last evaluation ({last[0]:.0f}), "
                         f"more than one eval interval ({interval:.0f}): not extrapolated")
    return _log_linear(curve[-2], last, tokens)


def _how(curve: list, tokens: float) -> str:
    """Where ``tokens`` falls on a curve, in words (what ppl_at_tokens did there)."""
    xs = [x for x, _ in curve]
    if tokens in xs:
        return "at an evaluation"
    if tokens < xs[-1]:
        lo, hi = max(x for x in xs if x < tokens), min(x for x in xs if x > tokens)
        return f"interpolated between the evaluations at {lo} and {hi} tokens"
    return f"extrapolated {tokens - xs[-1]:.0f} tokens past the last evaluation ({xs[-1]} tokens)"


def by_budget(every: list[dict[str, Any]]) -> Iterator[tuple[float, str, list[dict[str, Any]], dict | None]]:
    """(budget, preset, its records, its best centralized run or None) for each budget and preset."""
    for budget, preset in sorted({(r["config"]["budget"], r["config"].get("preset", "tiny")) for r in every}):
        recs = [r for r in every if r["config"]["budget"] == budget and r["config"].get("preset", "tiny") == preset]
        best = min((r for r in recs if r["config"]["side"] == "central" and r.get("final_ppl")),
                   key=lambda r: r["final_ppl"], default=None)
        yield budget, preset, recs, best


OTHER_TOKENS = 0.05  # a run further than this from its centralized run's tokens was planned for other tokens


def equal_tokens(every: list[dict[str, Any]], file: str) -> list[dict[str, Any]]:
    """Each federated run of a results file against its budget's best centralized run, at exactly that run's token
    count (ppl_at_tokens), beside the end-of-run ratio it replaces. A run that cannot be scored there says why."""
    out = []
    for _, _, recs, best in by_budget(every):
        if not best or not best.get("curve"):
            continue
        c_tokens, c_ppl = best["curve"][-1][0], best["final_ppl"]
        for r in recs:
            if r["config"]["side"] == "central" or not r.get("curve") or not r.get("final_ppl"):
                continue
            tokens = r["curve"][-1][0]
            row = {"key": r["key"], "file": file, "side": r["config"]["side"], "central_key": best["key"],
                   "tokens": tokens, "central_tokens": c_tokens, "final_ppl": round(r["final_ppl"], 3),
                   "central_ppl": round(c_ppl, 3), "ratio_end": round(r["final_ppl"] / c_ppl, 4)}
            if abs(tokens / c_tokens - 1) > OTHER_TOKENS:
                row["skipped"] = f"planned for other tokens ({tokens / c_tokens:.2f}x): not an equal-token run"
            else:
                try:
                    ppl = ppl_at_tokens(r["curve"], c_tokens)
                    row |= {"ppl_equal_tokens": round(ppl, 3), "ratio_equal_tokens": round(ppl / c_ppl, 4),
                            "how": _how(r["curve"], c_tokens)}
                except ValueError as e:
                    row["skipped"] = str(e)
            out.append(row)
    return out


def write_equal_tokens(files: list[str], out: Path, argv: list[str]) -> dict[str, Any]:
    """RESULTS/equal_tokens.json: equal_tokens() of every results file, with the command and commit."""
    doc = {"command": "python bench/sweep.py " + shlex.join(argv), "commit": kit.commit(), "date": kit.utc("%Y-%m-%d"),
           "what": "each federated run's val ppl at exactly its budget's best centralized run's token count "
                   "(tokens: what the run trained; central_tokens: the centralized run's), linear in log-ppl "
                   "between the two evaluations around it (bench/sweep.py ppl_at_tokens); ratio_end: final ppl over "
                   "the centralized final ppl, as scored before issue 26; ratio_equal_tokens: at equal tokens",
           "runs": [row for f in files for row in equal_tokens(load_all(Path(f)), f)]}
    kit.write_json(out, doc)
    return doc


def table(done: dict[str, dict[str, Any]] | list[dict[str, Any]]) -> str:
    """Every finished run, grouped by budget: its final val ppl and that over the best centralized run's of that
    budget, the same ratio at exactly the centralized run's tokens (ppl_at_tokens: the daemons end a little past
    the budget), and val ppl at equal wall-clock (the budget's fastest run's wall time)."""
    lines, every = [], list(done.values()) if isinstance(done, dict) else done
    for budget, preset, recs, best in by_budget(every):
        best_c = best["final_ppl"] if best else None
        timed = [r["wall_s"] for r in recs if r.get("wall_curve")]  # runs timed beside others have none
        if len({r.get("device", "cpu") for r in recs}) > 1:
            timed = []  # fed_sim runs on two machines: their seconds do not compare
        t_eq = min(timed) if timed else math.nan
        if preset == "tiny":
            tokens = f"{steps_of(budget) * PEERS * SILO_BATCH * 128 / 1e6:.2f} M tokens"
        else:  # another preset's sequence length (fed_sim.py --preset): the tokens column says
            tokens = f"{steps_of(budget)} steps per silo, {preset}"
        wall = f"equal wall-clock = {t_eq:.0f} s (this budget's fastest run timed alone)" if timed else \
            "no run timed alone: no equal wall-clock"
        lines += [f"\n**Budget {budget:.3g}x ({tokens})**; {wall}\n",
                  *kit.md_table(["key", "side", "varied", "recipe", "tokens (M)", "val ppl", "/ best central",
                                 "/ best central @ equal tokens", "ppl @ equal wall", "wall (s)"])]
        for r in sorted(recs, key=lambda r: (r["config"]["side"], r["final_ppl"] or math.inf)):
            p = r["config"]["params"]
            base = BASE_CENTRAL if r["config"]["side"] == "central" else BASE_FED
            diff = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in p.items() if v != base[k]) or "(base)"
            if r["config"].get("extra"):  # fed_sim's runs on another preset / with extra overrides
                diff += f"; {r['config'].get('preset', 'tiny')} " + " ".join(r["config"]["extra"])
            toks = f"{r['curve'][-1][0] / 1e6:.2f}" if r.get("curve") else "-"
            ratio = f"{r['final_ppl'] / best_c:.3f}" if best_c and r.get("final_ppl") else "-"
            at_tokens = "-"
            # Daemons count a few steps more or less than the budget (the swarm clock); 2x the tokens is not it.
            if best and best.get("curve") and r.get("curve"):
                if abs(r["curve"][-1][0] / best["curve"][-1][0] - 1) > OTHER_TOKENS:
                    ratio = "- (other tokens)"  # not an equal-token comparison
                else:
                    with contextlib.suppress(ValueError):  # too far from its curve: no figure
                        at_tokens = f"{ppl_at_tokens(r['curve'], best['curve'][-1][0]) / best_c:.3f}"
            eq = ppl_at(r.get("wall_curve", []), t_eq, end=r["wall_s"])
            lines.append(f"| {r['key']} | {r['config']['side']} | {r['axis']} | {diff} | {toks} | "
                         f"{r['final_ppl']:.2f} | {ratio} | {at_tokens} | {f'{eq:.1f}' if eq else '-'} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(done: dict[str, dict[str, Any]], path: Path) -> None:
    """Per budget: the curves (val ppl against tokens) of the best run of each side."""
    budgets = sorted({r["config"]["budget"] for r in done.values()})
    if not budgets:
        return
    fig, axes = kit.pyplot().subplots(1, len(budgets), figsize=(max(9, 6 * len(budgets)), 4.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for side in ("central", "fed-iid", "fed-noniid"):
            recs = _best([r for r in done.values() if r["config"]["budget"] == budget and r["config"]["side"] == side
                          and r.get("curve")], 1)
            if recs:
                xs, ys = zip(*recs[0]["curve"])
                ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3,
                        label=f"best {side} ({recs[0]['key'][:6]}): {recs[0]['final_ppl']:.1f}")
        ax.set(title=f"budget {budget:.3g}x", xlabel="total training tokens (M)", ylabel="val ppl", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("bench/sweep.py: best run of each side per budget (tiny, shared held-out set, CPU-2)", fontsize=10)
    kit.save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = kit.parser(__doc__, report_only=True, corpus=str(kit.CORPUS), out=str(kit.REPO / "runs" / "bench-sweep"),
                    results=str(BENCH / "results" / "sweep"))
    ap.add_argument("--stages", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    ap.add_argument("--partial", action="store_true", help="plan a stage from an incomplete previous stage")
    ap.add_argument("--lock-budget-min", type=float, default=45.0, help="stop before exceeding this much lock time")
    ap.add_argument("--max-runs", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None, metavar="KEY", help="run only these planned keys")
    ap.add_argument("--list", action="store_true", help="print the plan (done / pending) and exit")
    ap.add_argument("--equal-tokens", nargs="+", default=None, metavar="RUNS_JSONL",
                    help="score these results files' federated runs at exactly their centralized run's tokens into "
                         "RESULTS/equal_tokens.json, and exit")
    ap.add_argument("--lock", default=LOCK, help="the lock each run holds (flock(2)), shared with other benchmarks")
    ap.add_argument("--central-threads", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--round-deadline", type=float, default=120.0)
    ap.add_argument("--data-cache", default=str(conv.REPO / "runs" / "bench-data"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override for every planned run (last; part of the run's key), e.g. "
                         "--set federation.round_clock=steps")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.equal_tokens:
        doc = write_equal_tokens(args.equal_tokens, Path(args.results) / "equal_tokens.json",
                                 sys.argv[1:] if argv is None else list(argv))
        for row in doc["runs"]:
            print(f"{row['key']} {row['side']:10} {row['tokens']:>9} vs {row['central_tokens']:>9} tokens: "
                  f"{row['ratio_end']:.4f} -> {row.get('ratio_equal_tokens', row.get('skipped'))}")
        return 0
    results = Path(args.results) / "runs.jsonl"
    done = load_done(results)
    runs = plan(done, args.stages, args.partial)
    if args.set:
        runs = [c | {"extra": list(args.set)} for c in runs]
    if args.only:
        unknown = set(args.only) - {key_of(identity(c)) for c in runs}
        if unknown:
            raise conv.BenchError(f"--only: {', '.join(sorted(unknown))} not in the plan (see --list)")
        runs = [c for c in runs if key_of(identity(c)) in args.only]
    if args.list:
        for c in runs:
            k = key_of(identity(c))
            print(f"{'done' if k in done else 'todo'} {k} {c['stage']:6} {c['side']:10} {c['axis']:11} "
                  f"{json.dumps(c['params'])}")
        return 0
    if not args.report_only:
        data = conv.prepare_data(Path(args.data_cache), Path(args.corpus))
        sweep(runs, results, Path(args.out), lambda cfg, d: real_run(cfg, d, data, args), lock=args.lock,
              lock_budget_s=args.lock_budget_min * 60, max_runs=args.max_runs)
        done = load_done(results)
    pending = sum(key_of(identity(c)) not in done for c in plan(done, args.stages, args.partial))
    text = table(load_all(results)) + (f"\n\n{len(done)} configuration(s) done; {pending} planned run(s) of the "
                                       "current stages pending.\n")
    (Path(args.results) / "sweep.md").write_text(text)
    plot(done, Path(args.results) / "sweep.png")
    print(text)
    return 0


if __name__ == "__main__":
    kit.run(main, "sweep", "interrupted (finished runs are kept; run again to resume)")
