#!/usr/bin/env python
"""Compute utilization and time to a target perplexity on shaped links: overlap on vs off vs per-step DDP.

Two peers in network namespaces (bench/netns.py, tbf-shaped egress at RATE Mbit/s), side by side in one run per
rate: photon_p2p daemons with federation.overlap off, the same with it on, and DDP (gloo, bench/low_bandwidth.py's
ranks). Reported per run: compute utilization (inner-step seconds / wall-clock seconds of the round loop, from the
daemons' "phase" records; for DDP: photon's solo seconds per step / DDP's seconds per step), the trainer's idle
seconds per round, inner steps done, the best validation perplexity, the time to a target perplexity (the worst
of the three best values, so all reach it) and, for quality, overlap vs no overlap at equal tokens (the
perplexity of each at the largest token count both evaluated). Writes OUT.json, OUT.md, OUT.png. Needs root and
iproute2; prints "skipped: ..." and exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import report
import toolkit as kit
from low_bandwidth import run_ddp, run_photon, time_to
from netns import Testbed, bench_main

SYSTEMS = {"no-overlap": ("federation.overlap=false",), "overlap": ("federation.overlap=true",)}


def ppl_at_tokens(evals: list[dict], tokens: int) -> float:
    """Validation perplexity at ``tokens`` (per peer), linearly interpolated between evaluations."""
    pts = sorted((e["tokens"], e["val_ppl"]) for e in evals)
    for (t0, p0), (t1, p1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            return p0 + (p1 - p0) * (tokens - t0) / max(1, t1 - t0)
    return next((p for t, p in pts if t == tokens), math.nan)


def summarize(runs: list[dict]) -> None:
    for rate, seed in sorted({(r["rate_mbit"], r.get("seed", 0)) for r in runs}, reverse=True):
        group = {r["system"]: r for r in runs if r["rate_mbit"] == rate and r.get("seed", 0) == seed}
        best = {k: min((e["val_ppl"] for e in r["evals"]), default=math.inf) for k, r in group.items()}
        target = max(best.values())
        solo_s_per_step = math.nan
        if "no-overlap" in group and group["no-overlap"]["inner_steps"]:
            ph = group["no-overlap"]
            solo_s_per_step = ph["compute_s"] / max(1, ph["inner_steps"])
        for k, r in group.items():
            r["best_ppl"], r["target_ppl"] = best[k], target
            r["time_to_target_s"] = time_to(r["evals"], target)
            if k == "ddp-gloo":  # DDP overlaps its all-reduce with backward: compare its step with a compute-only one
                r["utilization"] = min(1.0, solo_s_per_step / r["seconds_per_step"])
        on, off = group.get("overlap"), group.get("no-overlap")
        if on and off and on["evals"] and off["evals"]:
            common = min(max(e["tokens"] for e in on["evals"]), max(e["tokens"] for e in off["evals"]))
            on["equal_tokens"] = off["equal_tokens"] = common
            on["ppl_at_equal_tokens"] = ppl_at_tokens(on["evals"], common)
            off["ppl_at_equal_tokens"] = ppl_at_tokens(off["evals"], common)


def plot(res: dict[str, Any], out: Path) -> None:
    rates = res["rates"]
    fig, axes = kit.pyplot().subplots(1, len(rates), figsize=(4.5 * len(rates), 4), squeeze=False)
    colors = {"no-overlap": "tab:blue", "overlap": "tab:green", "ddp-gloo": "tab:red"}
    for ax, rate in zip(axes[0], rates):
        for r in (r for r in res["runs"] if r["rate_mbit"] == rate):
            ax.plot([e["t"] for e in r["evals"]], [e["val_ppl"] for e in r["evals"]], marker="o", ms=3,
                    color=colors.get(r["system"]), label=f"{r['system']} (util {r['utilization']:.0%})")
        ax.set(title=f"{rate:g} Mbit/s", xlabel="wall-clock s", ylabel="val ppl", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    kit.save(fig, out)


def quality_across_seeds(res: dict[str, Any]) -> list[str]:
    """Per rate, overlap vs no overlap at equal tokens for every seed, and their mean ratio (several seeds: one
    seed's 1-2% is within this machine's repeat noise)."""
    seeds = res.get("seeds", [0])
    if len(seeds) < 2:
        return []
    lines = ["", "Quality at equal tokens, overlap / no overlap, per seed (val ppl of the global model, "
             "interpolated at the largest token count both runs of the seed evaluated):", "",
             "| link | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ratio |", "| --- |" + " --- |" * (len(seeds) + 1)]
    for rate in res["rates"]:
        cells, ratios = [], []
        for s in seeds:
            pair = {r["system"]: r for r in res["runs"] if r["rate_mbit"] == rate and r.get("seed", 0) == s}
            on, off = pair.get("overlap", {}), pair.get("no-overlap", {})
            if "ppl_at_equal_tokens" in on and "ppl_at_equal_tokens" in off:
                ratio = on["ppl_at_equal_tokens"] / off["ppl_at_equal_tokens"]
                ratios.append(ratio)
                cells.append(f"{on['ppl_at_equal_tokens']:.1f} / {off['ppl_at_equal_tokens']:.1f} = {ratio:.3f} "
                             f"@ {on['equal_tokens'] / 1e3:.0f}k tok")
            else:
                cells.append("-")
        mean_ratio = f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}" if ratios else "-"
        lines.append(f"| {rate:g} Mbit/s | " + " | ".join(cells) + f" | {mean_ratio} |")
    return lines


def markdown(res: dict[str, Any], command: str, name: str = "overlap") -> str:
    def system(r: dict[str, Any]) -> str:  # the run's system, and its seed when the runs have several
        return r["system"] + (f" (seed {r['seed']})" if len(res.get("seeds", [0])) > 1 else "")

    lines = [
        "## Overlap: compute utilization on shaped links, overlap on vs off vs per-step DDP (issue 10)",
        "",
        f"2 peers in network namespaces, egress shaped with tbf; tiny model ({res['params'] * 4 / 1e6:.1f} MB fp32), "
        f"H = {res['local_steps']}, each system {res['seconds']:g} s of wall-clock per rate, one after the other. "
        "Utilization = inner-step seconds / wall-clock seconds of the round loop (DDP: photon's compute-only "
        "seconds per step / DDP's seconds per step). Idle = seconds per round the trainer waited on the network.",
        "",
        "| link | system | utilization | idle s / round | inner steps | best val ppl | time to target (s) | "
        "ppl at equal tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate in res["rates"]:
        for r in (r for r in res["runs"] if r["rate_mbit"] == rate):
            idle = r["wait_s"] / max(1, r["rounds"]) if "wait_s" in r else math.nan
            tt = f"{r['time_to_target_s']:.0f}" if r.get("time_to_target_s") is not None else "not reached"
            eq = (f"{r['ppl_at_equal_tokens']:.1f} @ {r['equal_tokens'] / 1e3:.0f}k tok"
                  if "ppl_at_equal_tokens" in r else "")
            lines.append(f"| {rate:g} Mbit/s | {system(r)} | {r['utilization']:.1%} | "
                         f"{'-' if math.isnan(idle) else f'{idle:.2f}'} | {r['inner_steps']} | {r['best_ppl']:.1f} | "
                         f"{tt} (target {r['target_ppl']:.0f}) | {eq} |")
    lines += quality_across_seeds(res)
    pauses = [(rate, r) for rate in res["rates"] for r in res["runs"] if r["rate_mbit"] == rate and r.get("pause_s")]
    if pauses:  # where the trainer's time outside inner steps went, per round (daemon "pause" records)
        parts = list(pauses[0][1]["pause_s"])  # the daemon's order: wait, each part, total
        lines += ["", "Trainer pause per round after an average lands, by part (mean seconds; `pause` records):", "",
                  "| link | system | " + " | ".join(parts) + " |", "| --- | --- |" + " --- |" * len(parts)]
        lines += [f"| {rate:g} Mbit/s | {system(r)} | " + " | ".join(f"{r['pause_s'][k]:.3f}" for k in parts) + " |"
                  for rate, r in pauses]
    lines += ["", f"![val ppl vs wall-clock per link](bench/results/{name}.png)", "",
              f"Command (machine CPU-2, {res['date']}): `{command}`", "",
              f"Raw numbers: `bench/results/{name}.json`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = kit.parser(__doc__, data="runs/bench-data-netns", runs="runs/bench-overlap", out="bench/results/overlap",
                    set="overrides", replot=True)
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 20.0, 5.0], metavar="MBIT")
    ap.add_argument("--seconds", type=float, default=150.0, help="wall-clock seconds per system and rate")
    ap.add_argument("--local-steps", type=int, default=32)
    ap.add_argument("--systems", nargs="+", default=["no-overlap", "overlap", "ddp-gloo"],
                    choices=["no-overlap", "overlap", "ddp-gloo"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="train.seed values: each system runs once per seed (model init and data order)")
    args = ap.parse_args()
    args.peers = 2
    invalid = "need --seconds > 0 and rates > 0" if args.seconds <= 0 or any(r <= 0 for r in args.rates) else ""
    return bench_main("overlap", args, write_reports, measure, invalid)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from photon_p2p.config import load_config
    from photon_p2p.model import count_params

    cfg = load_config(["tiny"], args.overrides)
    runs: list[dict] = []
    for rate in args.rates:
        with Testbed(args.peers, rate_mbit=rate) as tb:
            for seed in args.seeds:
                for system in args.systems:
                    seeded = [f"train.seed={seed}"] if len(args.seeds) > 1 or seed else []
                    r = (run_ddp(tb, rate, args) if system == "ddp-gloo"
                         else run_photon(tb, rate, args, system=system, extra=(*SYSTEMS[system], *seeded)))
                    r["seed"] = seed
                    runs.append(r)
                    print(f"overlap: {rate:g} Mbit/s {system:>10} seed {seed}: {r['inner_steps']} steps, "
                          f"utilization {r.get('utilization', math.nan):.1%}", flush=True)
    summarize(runs)
    return {"bench": "overlap", "date": kit.utc(), "rates": args.rates, "seeds": args.seeds, "seconds": args.seconds,
            "local_steps": args.local_steps, "overrides": args.overrides, "params": count_params(cfg.model),
            "runs": runs, "command": kit.command()}


def write_reports(out: Path, res: dict[str, Any] | None) -> int:
    def named(r: dict[str, Any], command: str) -> str:  # the report names this run's own files (--out)
        return markdown(r, command, out.name)
    return report.write_reports(out, res, "overlap", plot, named, lambda r: r["command"])


if __name__ == "__main__":
    sys.exit(main())
