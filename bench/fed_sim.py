#!/usr/bin/env python
"""In-process federation on one device: the daemon's round arithmetic for N silos, against centralized training.

Usage:
  python bench/fed_sim.py --plan long --jobs 12 --results bench/results/sweep-sim   # the sweep's long stage (4x)
  python bench/fed_sim.py --plan full --jobs 12 --results bench/results/sweep-sim   # its full stage (calibration)
  python bench/fed_sim.py --preset photon-125m --budget 0.6667 --sides central fed-iid fed-noniid \\
      --set model.seq_len=512 --results bench/results/sim-125m                       # a larger model, one by one
  python bench/fed_sim.py --smoke --results /tmp/sim-smoke                             # tiny, 2 rounds, seconds

Why it exists: bench/sweep.py runs real `photon-peer` daemons on 127.0.0.1, which a 2-core machine runs at
~10 min per 3 M tokens, and the GPU machine lent to sessions has no network stack (no hivemind). This runs the
same recipe there. Each silo is a LocalTrainer (what the daemon drives) with its own GlobalState (the daemon's
θ_global and outer optimizer). Every round each silo takes H steps; Δ = GlobalState.pseudo_gradient(); the
token-weighted mean of the silos' Δ goes to every silo's GlobalState.apply (the outer step, θ_local ← θ_global);
federation.inner_state=reset clears AdamW as the daemon does; silo 0 then scores the global model. Centralized
runs are run_solo, the loop of `photon-peer train`. Left out: the transport (compression, stragglers and partial
groups) and the swarm clock (a silo ahead takes extra steps in a round): every silo takes exactly H steps and is
in every round. The mean is exact by default (federation.robust_aggregation=none); `--set
federation.robust_aggregation=clip` (the daemons' default) reduces the Δs as a group of N members does over the
bulk path (bulk.local_robust_mean: shares, 2 MiB parts, per-sender clipping), so its cost to quality can be measured.

Configs are the sweep's (bench/sweep.py make/spec_of), so records have its format and its table renders them
(`python bench/sweep.py --report-only --results DIR`); a record adds "engine" and "device". Runs finished in
RESULTS/runs.jsonl are skipped (resumable). With --jobs > 1 runs go to that many child processes at once (a GPU
is mostly idle under one tiny run), so their wall-clock columns are not comparable and are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sweep
import toolkit as kit
from toolkit import BenchError

BENCH = kit.REPO / "bench"

SOURCES = ["shakespeare", "kjv", "brown"]
# No transport here: nothing to compress, no address to listen on (the config's network check needs none).
# The plain mean unless a run asks for the daemons' clipping (--set, applied after these).
SIM_OVERRIDES = ["federation.compression=none", "network.host_maddrs=[]", "network.announce_maddrs=[]",
                 "federation.robust_aggregation=none"]
PART_NUMEL = 2 * 2**20 // 4  # AveragerTuning.part_size_bytes (the daemons' default) in fp32 values


def data_dirs(root: Path) -> dict[str, Path]:
    """The prepared data of bench/convergence.py's cache: union (IID, and the held-out set) and one per source."""
    dirs = {name: root / name for name in ["union", *SOURCES]}
    missing = [str(d) for d in dirs.values() if not (d / "manifest.json").exists()]
    if missing:
        raise BenchError(f"no prepared data in {', '.join(missing)} (run bench/sweep.py or "
                         "bench/convergence.py once with --corpus to prepare it)")
    return dirs


def spec_of(cfg: dict[str, Any], data: dict[str, Path]) -> sweep.conv.RunSpec:
    """The sweep's RunSpec of a config, on the config's preset, with the config's extra overrides last."""
    args = argparse.Namespace(central_threads=0, eval_batches=cfg.get("eval_batches", 8), round_deadline=120.0)
    spec = sweep.spec_of(cfg, data, args)
    spec.config = cfg.get("preset", "tiny")
    spec.overrides = [o for o in spec.overrides if not o.startswith("train.threads=")] + SIM_OVERRIDES \
        + list(cfg.get("extra", []))
    return spec


def _load(spec: sweep.conv.RunSpec, data_dir: Path, run_dir: Path, name: str):
    from photon_p2p.config import load_config

    return load_config([spec.config], spec.overrides + [f"data.path={data_dir}", f"run_dir={run_dir}",
                                                        f"name={name}"])


def run_central(spec: sweep.conv.RunSpec, run_dir: Path) -> dict[str, Any]:
    """`photon-peer train`'s loop (run_solo); the curve is its eval records."""
    from photon_p2p.train.solo import run_solo

    cfg = _load(spec, spec.silo_data[0], run_dir, "central")
    t0 = time.time()
    run_solo(cfg, progress=False)
    wall = time.time() - t0
    evals = kit.records(run_dir, "eval")
    curve = [(int(e["tokens"]), float(e["val_ppl"])) for e in evals]
    return {"curve": curve, "final_ppl": curve[-1][1], "wall_s": round(wall, 1),
            "wall_curve": [(round(float(e["time"]) - t0, 1), float(e["val_ppl"])) for e in evals]}


def run_federated(spec: sweep.conv.RunSpec, run_dir: Path, states_out: list | None = None) -> dict[str, Any]:
    """N silos round by round: H local steps each, the exact mean Δ, every silo's outer step. ``states_out``
    receives the silos' GlobalStates (tests compare them with the daemon's)."""
    import torch

    from photon_p2p.global_state import GlobalState
    from photon_p2p.train.trainer import build_trainer

    cfgs = [_load(spec, d, run_dir / f"peer-{i}", f"silo-{i}") for i, d in enumerate(spec.silo_data)]
    fed, steps = cfgs[0].federation, cfgs[0].train.max_steps
    silos = [build_trainer(c, str(c.data.path), peer=f"silo-{i}") for i, c in enumerate(cfgs)]
    states = [GlobalState(t.local_params(), c.federation) for t, c in zip(silos, cfgs)]
    if states_out is not None:
        states_out.extend(states)
    curve, wall_curve, t0 = [], [], time.time()
    clipped: dict[int, int] = {}  # silo: rounds in which the robust reduction scaled its Δ down somewhere
    for r in range(fed.rounds):
        before = silos[0].step
        deltas, weights = [], []
        for trainer, state in zip(silos, states):
            tokens0 = trainer.tokens
            for _ in range(fed.local_steps):
                trainer.train_step()
            deltas.append(state.pseudo_gradient())
            weights.append(float(trainer.tokens - tokens0))
        mean = average(deltas, weights, fed, clipped)
        for trainer, state in zip(silos, states):
            state.apply([m.clone() for m in mean])
            if fed.inner_state == "reset":
                trainer.reset_optimizer_state()
        after = silos[0].step
        if (after // spec.eval_every > before // spec.eval_every) or after >= steps:
            ppl = silos[0].evaluate()["val_ppl"]  # θ_local = θ_global right after apply: the global model
            if not math.isfinite(ppl):
                raise BenchError(f"round {r}: the global model's val ppl is {ppl}")
            curve.append((sum(t.tokens for t in silos), ppl))
            print(f"round {r + 1}/{fed.rounds}: step {after}, tokens {curve[-1][0]}, val ppl {ppl:.2f}, "
                  f"{time.time() - t0:.0f}s", flush=True)
            wall_curve.append((round(time.time() - t0, 1), ppl))
    fps = {s.fingerprint() for s in states}
    if len(fps) != 1:
        raise BenchError(f"silos hold {len(fps)} different models after the last round")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = {"curve": curve, "final_ppl": curve[-1][1], "wall_s": round(time.time() - t0, 1),
           "wall_curve": wall_curve, "rounds": fed.rounds, "fingerprint": states[0].fingerprint()[:8]}
    if fed.robust_aggregation != "none":
        out["clipped_rounds"] = {f"silo-{i}": clipped.get(i, 0) for i in range(len(silos))}
    return out


def average(deltas: list[list], weights: list[float], fed, clipped: dict[int, int]) -> list:
    """The token-weighted mean of the silos' Δ: exact, or as the daemons' robust reduction computes it."""
    import torch

    from photon_p2p.federation.bulk import local_robust_mean
    from photon_p2p.federation.robust import RobustSettings, reduce_part

    if fed.robust_aggregation == "none":
        total = sum(weights)
        return [sum(d[k] * (w / total) for d, w in zip(deltas, weights)) for k in range(len(deltas[0]))]
    settings = RobustSettings(fed.robust_aggregation, fed.clip_multiplier, fed.clip_iterations)
    flat, factors = local_robust_mean([torch.cat([t.reshape(-1) for t in d]) for d in deltas], weights,
                                      lambda parts, w, order: reduce_part(parts, w, order, settings), PART_NUMEL)
    for silo in factors:
        clipped[silo] = clipped.get(silo, 0) + 1
    out, at = [], 0
    for t in deltas[0]:
        out.append(flat[at:at + t.numel()].view_as(t))
        at += t.numel()
    return out


def run_one(cfg: dict[str, Any], data_root: Path, run_dir: Path) -> dict[str, Any]:
    import shutil

    import torch

    spec = spec_of(cfg, data_dirs(data_root))
    shutil.rmtree(run_dir, ignore_errors=True)
    out = (run_central if cfg["side"] == "central" else run_federated)(spec, run_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out | {"engine": "sim", "device": device}


# ---- planning ---------------------------------------------------------------------------------------------
def key_of(cfg: dict[str, Any]) -> str:
    """The sweep's key, plus the preset and extra overrides when a config has them."""
    extra = {k: cfg[k] for k in ("preset", "extra", "eval_batches") if k in cfg}
    return sweep.key_of(sweep.identity(cfg) | extra | {"engine": "sim"})


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.smoke:
        cfg = [sweep.make("central", "screen", {}), sweep.make("fed-noniid", "screen", {"H": 8})]
        for c in cfg:
            c["budget"] = 16 / sweep.BASE_STEPS  # 16 steps per silo: 2 rounds of H = 8
            c["extra"] = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
                          "train.eval_batches=2"]
        return cfg
    if args.plan:
        # Every configuration of the sweep's full stage (not only its best two): the extra runs cost little here.
        done = sweep.load_done(Path(args.sweep_results) / "runs.jsonl")
        full = sweep.plan(done, ["full"], partial=True)
        return [sweep.make(c["side"], args.plan, c["params"], c["axis"]) for c in full]
    out = []
    for lr in args.lrs or [None]:  # each side's best recipe of the sweep's full stage so far, on --preset
        for side in args.sides:
            params = best_params(Path(args.sweep_results) / "runs.jsonl", side)
            params |= ({"lr": lr} if lr else {}) | ({"warmup": args.warmup} if args.warmup is not None else {})
            c = sweep.make(side, "full", params, "best")
            c |= {"budget": args.budget, "stage": args.preset, "preset": args.preset, "extra": args.set,
                  "eval_batches": args.eval_batches}
            out.append(c)
    return out


def best_params(results: Path, side: str) -> dict[str, Any]:
    full = [r for r in sweep.load_done(results).values() if r["config"]["budget"] == 1.0
            and r["config"]["side"] == side and r.get("final_ppl")]
    if not full:
        raise BenchError(f"{results} has no full-stage {side} run to take the best recipe from")
    return min(full, key=lambda r: r["final_ppl"])["config"]["params"]


def record(cfg: dict[str, Any], out: dict[str, Any], concurrent: bool) -> dict[str, Any]:
    """The sweep's record format, plus the engine, the device and whether the run shared it."""
    if concurrent:
        out = out | {"wall_curve": []}  # timed beside other runs: not comparable
    extra = {k: cfg[k] for k in ("preset", "extra", "eval_batches") if k in cfg}
    return {"key": key_of(cfg), "config": sweep.identity(cfg) | extra, "stage": cfg["stage"], "axis": cfg["axis"],
            "finished_at": kit.utc("%Y-%m-%dT%H:%M:%SZ"), "lock_s": out["wall_s"],
            "concurrent": concurrent, **out}


def plot_all(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Every run's curve (val ppl against total training tokens), one line each."""
    fig, ax = kit.pyplot().subplots(figsize=(8, 4.8))
    for r in sorted(records, key=lambda r: (r["config"]["side"], r["final_ppl"])):
        if r.get("curve"):
            xs, ys = zip(*r["curve"])
            extra = " ".join(e.split(".")[-1] for e in r["config"].get("extra", []) if "batch_size" in e)
            ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=f"{r['config']['side']} {r['axis']} "
                    f"lr={r['config']['params']['lr']:g} {extra} ({r['key'][:6]}): {r['final_ppl']:.1f}")
    ax.set(title=title, xlabel="total training tokens (M)", ylabel="val ppl", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    kit.save(fig, path)


def report(results_dir: Path, title: str) -> str:
    """sweep.md (the sweep's table) and curves.png (every run) from RESULTS/runs.jsonl."""
    records = sweep.load_all(results_dir / "runs.jsonl")
    text = sweep.table(records)
    (results_dir / "sweep.md").write_text(text + "\n")
    if records:
        plot_all(records, results_dir / "curves.png", title)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = kit.parser(__doc__, set="set", report_only=True)
    ap.add_argument("--plan", choices=["full", "long"], help="the sweep's stage to run (every full-stage config)")
    ap.add_argument("--smoke", action="store_true", help="two 16-step runs of a very small model (central, "
                    "non-IID H=8): seconds on a CPU")
    ap.add_argument("--preset", default="tiny", help="with --sides: the preset to run the best recipe on")
    ap.add_argument("--sides", nargs="+", choices=["central", "fed-iid", "fed-noniid"], default=[])
    ap.add_argument("--budget", type=float, default=1.0, help="with --sides: steps = 384 x budget per silo")
    ap.add_argument("--lrs", nargs="+", type=float, default=[], help="with --sides: one run per inner lr")
    ap.add_argument("--warmup", type=int, default=None, help="with --sides: inner warmup steps of every run")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--shared-device", action="store_true", help="other jobs share this device: record no "
                    "wall-clock curve (--jobs > 1 implies it)")
    ap.add_argument("--data", default=str(kit.REPO / "runs" / "bench-data"))
    ap.add_argument("--sweep-results", default=str(BENCH / "results" / "sweep"))
    ap.add_argument("--results", help="where runs.jsonl and sweep.md go (required)")
    ap.add_argument("--runs", default=None, help="run dirs (default: a temporary dir)")
    ap.add_argument("--deadline-s", type=float, default=math.inf, help="start no run after this many seconds")
    ap.add_argument("--title", default="bench/fed_sim.py: val ppl against tokens")
    ap.add_argument("--only", nargs="+", metavar="KEY", help="run only these planned keys (see --list)")
    ap.add_argument("--list", action="store_true", help="print the runs it would start, and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run this config JSON, write its output to --record
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        out = run_one(json.loads(args.one), Path(args.data), Path(args.runs))
        Path(args.record).write_text(json.dumps(out))
        return 0
    if not args.results:
        ap.error("--results DIR is required")
    if args.report_only:
        print(report(Path(args.results), args.title))
        return 0
    if not (args.plan or args.smoke or args.sides):
        ap.error("nothing to run: give --plan, --sides or --smoke")
    results = Path(args.results) / "runs.jsonl"
    done = sweep.load_done(results)
    todo = [c for c in plan(args) if key_of(c) not in done]
    if args.only:
        unknown = set(args.only) - {key_of(c) for c in plan(args)}
        if unknown:
            raise BenchError(f"--only: {', '.join(sorted(unknown))} not in the plan (see --list)")
        todo = [c for c in todo if key_of(c) in args.only]
    if args.list:
        for c in todo:
            print(f"{key_of(c)} {c['stage']:11} {c['side']:10} {c['axis']:17} budget {c['budget']:.4g} "
                  f"{json.dumps(c['params'])} {' '.join(c.get('extra', []))}")
        return 0
    if todo:  # a missing dataset or a bad override fails here, once, as one line, not in every child
        data = data_dirs(Path(args.data))
        for c in todo:
            _load(spec_of(c, data), data["union"], Path(tempfile.gettempdir()), "check")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="fed-sim-"))
    runs.mkdir(parents=True, exist_ok=True)
    failed, skipped = run_all(todo, args, runs, results)
    print(report(Path(args.results), args.title))
    if skipped:
        print(f"fed_sim: --deadline-s reached; {skipped} run(s) not started (run again to resume)", file=sys.stderr)
    return 1 if failed or skipped else 0


def run_all(todo: list[dict[str, Any]], args: argparse.Namespace, runs: Path, results: Path) -> tuple[int, int]:
    """Each config in a child process, ``args.jobs`` at once; a finished one is appended to ``results`` at once.
    Returns (failed, not started). Children still running when this returns early (Ctrl-C) are killed."""
    t_start, failed = time.monotonic(), 0
    pending: list[tuple[subprocess.Popen, dict[str, Any], Path]] = []
    shared = args.shared_device or (args.jobs > 1 and len(todo) > 1)  # timed beside other runs
    try:
        while todo or pending:
            while todo and len(pending) < args.jobs and time.monotonic() - t_start < args.deadline_s:
                cfg = todo.pop(0)
                rec_path = runs / f"{key_of(cfg)}.json"
                cmd = [sys.executable, __file__, "--one", json.dumps(cfg), "--record", str(rec_path),
                       "--data", args.data, "--runs", str(runs / key_of(cfg))]
                with (runs / f"{key_of(cfg)}.log").open("w") as log:  # the child keeps its own descriptor
                    pending.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), cfg, rec_path))
                print(f"fed_sim: started {key_of(cfg)} {cfg['side']} {cfg['axis']} {json.dumps(cfg['params'])}",
                      flush=True)
            if todo and not pending:
                break  # past --deadline-s
            time.sleep(0.5)
            for item in [p for p in pending if p[0].poll() is not None]:
                proc, cfg, rec_path = item
                pending.remove(item)
                if proc.returncode != 0 or not rec_path.exists():
                    failed += 1
                    tail = (runs / f"{key_of(cfg)}.log").read_text().strip().splitlines()[-3:]
                    print(f"fed_sim: {key_of(cfg)} failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
                    continue
                rec = record(cfg, json.loads(rec_path.read_text()), shared)
                sweep.append(results, rec)
                print(f"fed_sim: {rec['key']} {cfg['side']} {cfg['axis']} val ppl {rec['final_ppl']:.2f} "
                      f"in {rec['wall_s']:.0f}s", flush=True)
    finally:
        for proc, _, _ in pending:
            proc.kill()
            proc.wait()
    return failed, len(todo)


if __name__ == "__main__":
    from photon_p2p.config import ConfigError

    kit.run(main, "fed_sim", "interrupted (finished runs are kept; run again to resume)", (ConfigError,))
