#!/usr/bin/env python
"""Convergence evidence: federated Photon vs centralized (IID and non-IID silos), and Photon vs DiLoCo recipe.

Usage:
  flock /tmp/photon-bench.lock python bench/convergence.py            # all four runs, then the report
  python bench/convergence.py --runs central fed-iid --rounds 2 --local-steps 8 --out runs/conv-smoke  # smoke
  python bench/convergence.py --report-only                           # re-read the run dirs, rewrite results

Runs (every one trains the same ~1.9M-parameter tiny model on the same total token budget and is scored on
the SAME held-out set: the val split of the union of shakespeare + kjv + brown, via data.val_dir, with the
same 8 x 16 validation windows through train.eval_batch_size):
  central        one `photon-peer train` run: batch 4 x 16 = 64, ROUNDS x H steps, lr --central-lr (3e-3)
  fed-iid        4 `photon-peer run` daemons on 127.0.0.1, Photon recipe (configs/tiny.yaml: batch 16,
                 lr 3e-3, H local steps, fedavg outer lr 1.0); every silo trains on the union
  fed-noniid     the same, one source per silo (shakespeare, kjv, brown, shakespeare)
  diloco-noniid  configs/diloco-tiny.yaml (batch 32, lr 1.5e-3, Nesterov outer lr 0.7 momentum 0.9), non-IID,
                 ROUNDS/2 rounds of H steps so that it sees the same tokens as the Photon runs
Federated runs need all 4 peers in every round (min_group_size 4) and wait up to --round-deadline seconds for
them, so CPU contention delays rounds instead of making them solo; solo/partial rounds are counted anyway.
Writes RESULTS/convergence.{json,png,md}. Data comes from ../shared/corpus when present (prepared once into
--data-cache), else from the embedded default corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import toolkit as kit
from toolkit import REPO, BenchError  # noqa: F401  (BenchError: sweep.py and fed_sim.py raise conv.BenchError)

SOURCES = ["shakespeare", "kjv", "brown"]
ALL_RUNS = ["central", "fed-iid", "fed-noniid", "diloco-noniid"]
LABELS = {"central": "centralized (batch 64)", "fed-iid": "Photon 4 silos, IID",
          "fed-noniid": "Photon 4 silos, non-IID", "diloco-noniid": "DiLoCo recipe 4 silos, non-IID"}


@dataclass
class RunSpec:
    """One run: which preset, which data per silo (one entry = centralized) and its extra overrides."""

    name: str
    config: str
    silo_data: list[Path]
    eval_every: int  # inner steps between validations (one round of H steps by default)
    overrides: list[str] = field(default_factory=list)

    @property
    def federated(self) -> bool:
        return self.name != "central"


# ---- data -------------------------------------------------------------------------------------------------
def prepare_data(cache: Path, corpus: Path) -> dict[str, Path]:
    """Prepared dirs for each source and for their union (whose val split is the shared held-out set).
    prepare-data holds out the last 1% of each input file, so a source's own val documents are exactly the
    union's val documents from that source: no silo ever trains on the shared validation text."""
    from photon_p2p.data.loader import read_manifest
    from photon_p2p.data.prepare import prepare

    files = [corpus / f"{s}.txt" for s in SOURCES]
    if all(f.is_file() for f in files):
        wanted = {s: [f] for s, f in zip(SOURCES, files)} | {"union": files}
        out: dict[str, Path] = {}
        for name, inputs in wanted.items():
            d = cache / name
            try:
                srcs = [Path(p).name for p in read_manifest(d).get("sources", [])]
            except Exception:  # missing or stale: (re)prepare
                srcs = []
            if srcs != [f.name for f in inputs]:
                print(f"convergence: preparing {name} into {d}", flush=True)
                prepare([str(f) for f in inputs], d, progress=False)
            out[name] = d
        return out
    print(f"convergence: {corpus} not found; using the embedded default corpus (smaller)", flush=True)
    from photon_p2p.data.embedded import ensure_default_dataset

    out = {s: ensure_default_dataset(cache / "embedded", [s], progress=False) for s in SOURCES}
    out["union"] = ensure_default_dataset(cache / "embedded", SOURCES, progress=False)
    return out


# ---- run definitions --------------------------------------------------------------------------------------
def run_specs(args: argparse.Namespace, data: dict[str, Path]) -> list[RunSpec]:
    """The four runs with the token budget of ROUNDS x H x PEERS x 16 sequences of 128 tokens each."""
    h, r, n = args.local_steps, args.rounds, args.peers
    common = [f"data.val_dir={data['union']}", "train.eval_batch_size=16", f"train.eval_batches={args.eval_batches}",
              f"train.log_every={h}", "train.checkpoint_every=1000000"]
    fed = [f"federation.local_steps={h}", f"federation.target_group_size={n}", f"federation.min_group_size={n}",
           f"federation.round_deadline={args.round_deadline}",
           f"federation.allreduce_timeout={args.round_deadline / 2}", "train.threads=1"]
    noniid = [data[SOURCES[i % len(SOURCES)]] for i in range(n)]
    every = h * args.eval_every_rounds
    d_rounds = r * 16 // 32  # DiLoCo's batch is twice Photon's: half the rounds for the same tokens
    specs = {
        "central": RunSpec("central", "tiny", [data["union"]], every, common + [
            f"train.batch_size={16 * n}", f"train.lr={args.central_lr}", f"train.max_steps={r * h}",
            f"train.eval_every={every}", f"train.threads={args.central_threads}"]),
        "fed-iid": RunSpec("fed-iid", "tiny", [data["union"]] * n, every,
                           common + fed + [f"federation.rounds={r}", f"train.max_steps={r * h}"]),
        "fed-noniid": RunSpec("fed-noniid", "tiny", noniid, every,
                              common + fed + [f"federation.rounds={r}", f"train.max_steps={r * h}"]),
        "diloco-noniid": RunSpec("diloco-noniid", "diloco-tiny", noniid, every,
                                 common + fed + [f"federation.rounds={d_rounds}", f"train.max_steps={d_rounds * h}"]),
    }
    return [specs[name] for name in args.runs]


# ---- running ----------------------------------------------------------------------------------------------
def run_central(spec: RunSpec, run_dir: Path, timeout: float) -> float:
    cmd = [sys.executable, "-m", "photon_p2p.cli", "train", "--config", spec.config, "--no-progress",
           "--set", f"run_dir={run_dir}", "--set", "name=central", "--set", f"data.path={spec.silo_data[0]}"]
    cmd += [a for o in spec.overrides for a in ("--set", o)]
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    proc = kit.popen_logged(cmd, run_dir / "train.log", cwd=REPO)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"central run exceeded {timeout:.0f}s (see {run_dir}/train.log)") from None
    finally:
        kit.stop_all([proc])
    if proc.returncode != 0:
        raise BenchError(f"central run failed with exit code {proc.returncode} (see {run_dir}/train.log)")
    return time.monotonic() - t0


def run_federated(spec: RunSpec, out: Path, timeout: float) -> float:
    """Start N daemons (silo-0 first, the others join through its address), wait for all to finish."""
    procs: list[subprocess.Popen] = []
    dirs = [out / f"peer-{i}" for i in range(len(spec.silo_data))]
    t0, maddrs, seen = time.monotonic(), [], [0]
    try:
        for i, d in enumerate(dirs):
            # Every peer holds the same global model after a full round: only silo-0 evaluates each round (the
            # others only after their last round), so validation costs one peer's time instead of four.
            cmd = kit.peer_cmd(d, [f"name=silo-{i}", *spec.overrides,
                                   f"train.eval_every={spec.eval_every if i == 0 else 0}"], config=spec.config,
                               initial=maddrs[:1], run_id=f"conv-{spec.name}", args=["--data", str(spec.silo_data[i])])
            d.mkdir(parents=True)
            procs.append(kit.popen_logged(cmd, d / "peer.log", cwd=REPO))
            if i == 0:
                try:
                    maddrs = kit.wait_for_address(procs[0], d, timeout=120)
                except kit.PeerStartError as e:
                    raise BenchError(f"{spec.name}: {e}") from None

        def progress() -> None:
            seen[0] = kit.follow(dirs[0] / "peer.log", seen[0], f"{spec.name} silo-0")

        if not kit.wait_all(procs, timeout - (time.monotonic() - t0), progress, poll=2.0):
            raise BenchError(f"{spec.name} exceeded {timeout:.0f}s (see {out}/peer-*/peer.log)")
    finally:
        kit.stop_all(procs)
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise BenchError(f"{spec.name}: silo(s) {bad} exited with {[procs[i].returncode for i in bad]} "
                         f"(see {out}/peer-N/peer.log)")
    return time.monotonic() - t0


# ---- results ----------------------------------------------------------------------------------------------
def summarize(name: str, run_dir: Path) -> dict:
    """Curve of (total tokens, val ppl) plus round health for federated runs."""
    if name == "central":
        evals = kit.records(run_dir, "eval")
        curve = [(int(e["tokens"]), float(e["val_ppl"])) for e in evals]
        return {"curve": curve, "final_ppl": curve[-1][1] if curve else None}
    peers = sorted(run_dir.glob("peer-*"))
    rounds = [kit.records(p, "round") for p in peers]
    # Total tokens after round r: every silo's own count at that round (a silo that skipped a round by
    # syncing keeps its last count), so the x-axis is what the federation as a whole has trained on.
    def total_tokens(r: int) -> int:
        return sum(max([int(x["tokens"]) for x in recs if x["round"] <= r] or [0]) for recs in rounds)

    curve = [(total_tokens(int(x["round"])), float(x["val_ppl"])) for x in rounds[0] if "val_ppl" in x]
    flat = [x for recs in rounds for x in recs]
    finals = [float(recs[-1]["val_ppl"]) for recs in rounds if recs and "val_ppl" in recs[-1]]
    return {"curve": curve, "final_ppl": curve[-1][1] if curve else None,
            "final_ppl_per_silo": finals,
            "peer_rounds": len(flat), "solo_rounds": sum(bool(x["solo"]) for x in flat),
            "partial_rounds": sum(1 for x in flat if not x["solo"] and (x.get("partial") or 0) > 0),
            "short_group_rounds": sum(1 for x in flat if not x["solo"] and x["group_size"] < len(peers)),
            "mean_averaging_s": round(sum(float(x["averaging_s"]) for x in flat) / max(1, len(flat)), 3)}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches ``target``, interpolated linearly in log-ppl between evals."""
    prev = None
    for tok, ppl in curve:
        if ppl <= target:
            if prev is None:
                return float(tok)
            (t0, p0) = prev
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(ppl))
            return t0 + frac * (tok - t0)
        prev = (tok, ppl)
    return None


def compare(runs: dict[str, dict], margin: float) -> dict:
    out: dict = {}
    c = runs.get("central", {}).get("final_ppl")
    for name in ("fed-iid", "fed-noniid"):
        f = runs.get(name, {}).get("final_ppl")
        if c and f:
            out[f"ratio_{name}_over_central"] = round(f / c, 4)
    p, d = runs.get("fed-noniid"), runs.get("diloco-noniid")
    if p and d and p["final_ppl"] and d["final_ppl"]:
        target = max(p["final_ppl"], d["final_ppl"]) * margin
        tp, td = tokens_to_reach(p["curve"], target), tokens_to_reach(d["curve"], target)
        out["photon_vs_diloco"] = {"target_ppl": round(target, 3), "target_rule": f"worse final x {margin}",
                                   "tokens_photon": tp, "tokens_diloco": td,
                                   "ratio_diloco_over_photon": round(td / tp, 4) if tp and td else None}
    return out


def plot(runs: dict[str, dict], summary: dict, path: Path) -> None:
    fig, axes = kit.pyplot().subplots(1, 2, figsize=(12, 4.5))
    panels = [("Convergence: federated vs centralized", ["central", "fed-iid", "fed-noniid"]),
              ("Photon vs DiLoCo recipe (non-IID)", ["fed-noniid", "diloco-noniid"])]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if runs.get(name, {}).get("curve"):
                xs, ys = zip(*runs[name]["curve"])
                ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=LABELS[name])
        ax.set(title=title, xlabel="total training tokens (millions, all silos)", ylabel="validation perplexity",
               yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    pd = summary.get("photon_vs_diloco")
    if pd:
        axes[1].axhline(pd["target_ppl"], color="grey", ls="--", lw=1, label=f"target {pd['target_ppl']:.1f}")
    for ax in axes:
        ax.legend()
    fig.suptitle("tiny model (1.9M params), shared held-out val set (union of shakespeare, kjv, brown), CPU-2")
    kit.save(fig, path, dpi=120)


BEGIN, END = "<!-- convergence.py tables: begin -->", "<!-- convergence.py tables: end -->"


def write_markdown(result: dict, path: Path) -> None:
    runs, s = result["runs"], result["summary"]
    lines = kit.md_table(["run", "final val ppl", "tokens", "wall (s)", "peer-rounds", "solo", "partial",
                          "short group", "final ppl per silo"])
    for name, r in runs.items():
        fin = f"{r['final_ppl']:.2f}" if r.get("final_ppl") else "-"
        tok = f"{r['curve'][-1][0] / 1e6:.2f} M" if r.get("curve") else "-"
        lines.append(f"| {LABELS[name]} | {fin} | {tok} | {r.get('wall_s', 0):.0f} | {r.get('peer_rounds', '-')} | "
                     f"{r.get('solo_rounds', '-')} | {r.get('partial_rounds', '-')} | "
                     f"{r.get('short_group_rounds', '-')} | "
                     f"{' / '.join(f'{p:.1f}' for p in r.get('final_ppl_per_silo', [])) or '-'} |")
    for k, v in s.items():
        if k.startswith("ratio_"):
            lines.append(f"\n{k}: **{v}**")
    pd = s.get("photon_vs_diloco")
    if pd:
        fmt = lambda t: f"{t / 1e6:.2f} M" if t else "not reached"  # noqa: E731
        lines.append(f"\nPhoton vs DiLoCo: target ppl {pd['target_ppl']} ({pd['target_rule']}); tokens to reach: "
                     f"Photon {fmt(pd['tokens_photon'])}, DiLoCo {fmt(pd['tokens_diloco'])}, "
                     f"ratio DiLoCo/Photon **{pd['ratio_diloco_over_photon']}**")
    # The tables live between markers, so a rerun refreshes them and keeps the hand-written text around them.
    block = f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + block + "\n"
    path.write_text(text)


# ---- main -------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = kit.parser(__doc__, corpus=str(kit.CORPUS), out=str(REPO / "runs" / "bench-convergence"),
                    results=str(REPO / "bench" / "results"), report_only=True)
    ap.add_argument("--runs", nargs="+", choices=ALL_RUNS, default=ALL_RUNS)
    ap.add_argument("--rounds", type=int, default=12, help="Photon rounds (DiLoCo gets half: twice the batch)")
    ap.add_argument("--local-steps", type=int, default=32, help="H: inner steps per round")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--central-lr", type=float, default=3e-3, help="lr of the centralized batch-64 run")
    ap.add_argument("--central-threads", type=int, default=2, help="torch threads of the centralized run")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches of 16 x 128 tokens")
    ap.add_argument("--eval-every-rounds", type=int, default=1)
    ap.add_argument("--round-deadline", type=float, default=120.0)
    ap.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before a run is abandoned")
    ap.add_argument("--target-margin", type=float, default=1.05, help="target ppl = worse final x this")
    ap.add_argument("--data-cache", default=str(REPO / "runs" / "bench-data"))
    args = ap.parse_args()
    if args.peers < 2 or args.rounds < 2 or args.rounds % 2:
        raise BenchError("--peers must be >= 2 and --rounds an even number >= 2 (DiLoCo runs half the rounds)")
    return args


def main() -> int:
    args = parse_args()
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    # Wall times of runs not repeated this time (--report-only, or --runs with a subset) come from the last report.
    old = json.loads((results / "convergence.json").read_text()) if (results / "convergence.json").exists() else {}
    walls = {k: v.get("wall_s") for k, v in old.get("runs", {}).items()}
    if not args.report_only:
        data = prepare_data(Path(args.data_cache), Path(args.corpus))
        for spec in run_specs(args, data):
            run_dir = out / spec.name
            shutil.rmtree(run_dir, ignore_errors=True)  # daemons resume from checkpoints: start clean
            print(f"convergence: {spec.name} ({len(spec.silo_data)} silo(s), config {spec.config})", flush=True)
            runner = run_federated if spec.federated else run_central
            walls[spec.name] = round(runner(spec, run_dir, args.run_timeout), 1)
            print(f"convergence: {spec.name} done in {walls[spec.name]:.0f}s", flush=True)
    runs = {}
    for name in ALL_RUNS:
        if (out / name).exists():
            runs[name] = summarize(name, out / name) | {"wall_s": walls.get(name)}
    if not runs:
        raise BenchError(f"no run directories under {out}")
    summary = compare(runs, args.target_margin)
    command = kit.command()
    if args.report_only:  # the report describes the runs, not this re-read
        command = old.get("command", command)
    result = {"machine": "CPU-2", "command": command,
              "setup": {k: getattr(args, k) for k in ("rounds", "local_steps", "peers", "central_lr",
                                                       "central_threads", "eval_batches", "round_deadline")},
              "runs": runs, "summary": summary}
    kit.write_json(results / "convergence.json", result, indent=2)
    plot(runs, summary, results / "convergence.png")
    write_markdown(result, results / "convergence.md")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    kit.run(main, "convergence")
