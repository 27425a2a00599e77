#!/usr/bin/env python
"""Training on shaped links, by wall-clock: photon_p2p daemons (averaging overlapped or not) vs per-step DDP (gloo).

Every peer / rank runs in its own network namespace (bench/netns.py); each namespace's egress is shaped with tbf
at RATE Mbit/s (2 peers: one veth pair; more: veths to a bridge). For each rate, in one run, each of --systems:

  * photon_p2p: `python -m photon_p2p.cli run` daemons with the Photon tiny recipe (configs/tiny.yaml: batch 16,
    lr 3e-3, H = --local-steps inner steps per round, fedavg outer step), one torch thread each; no-overlap and
    overlap: the same with federation.overlap false / true;
  * ddp-gloo: the same model (photon_p2p.model.Transformer), the same LocalTrainer (AdamW, schedule, clipping), the
    same per-peer batch and data stream (silo-i's sampler), wrapped in torch DistributedDataParallel over gloo, so
    the gradients are all-reduced every step; MASTER_ADDR is rank 0's namespace address.

Every system trains for --seconds of wall-clock (from launching the processes, start-up included) and evaluates the
same validation windows every H steps (photon: every round, on the averaged global model; DDP: rank 0), once per
--seeds value (train.seed: model init and data order). Two reports of these runs (--report):

  time     (the default; systems photon_p2p ddp-gloo): the time to a target validation perplexity: --target-ppl,
           or (0) per rate the higher of the two systems' best perplexities, a value both reach.
  overlap  (systems no-overlap overlap ddp-gloo; until 2026-12-08 bench/overlap.py, with the same flags): compute
           utilization (inner-step seconds / wall-clock seconds of the round loop, from the daemons' "phase"
           records; for DDP: photon's solo seconds per step / DDP's seconds per step), the trainer's idle seconds
           per round, inner steps done, the best validation perplexity, the time to a target perplexity (the worst
           of the systems' best values, so all reach it) and, for quality, overlap vs no overlap at equal tokens
           (the perplexity of each at the largest token count both evaluated).
Writes OUT.json, OUT.md and OUT.png (val ppl vs wall-clock seconds); --replot rewrites OUT.md and OUT.png from
OUT.json (in the report its "bench" names) without running anything. Needs root and iproute2 (ip, tc); prints
"skipped: ..." and exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import report
import toolkit as kit
from netns import NetnsError, Testbed, bench_main, start_photon_peer, stop_procs, wait_peer_address
from toolkit import mean

# photon_p2p daemons with these overrides, or (ddp-gloo) DDP ranks
SYSTEMS = {"photon_p2p": (), "no-overlap": ("federation.overlap=false",), "overlap": ("federation.overlap=true",),
           "ddp-gloo": None}
REPORTS = {  # each report's defaults
    "time": {"rates": [100.0, 20.0], "seconds": 180.0, "systems": ["photon_p2p", "ddp-gloo"],
             "out": "bench/results/low_bandwidth", "runs": "runs/bench-lowbw"},
    "overlap": {"rates": [100.0, 20.0, 5.0], "seconds": 150.0, "systems": ["no-overlap", "overlap", "ddp-gloo"],
                "out": "bench/results/overlap", "runs": "runs/bench-overlap"}}


# ---- the DDP rank (runs inside a namespace) ------------------------------------------------------------------
def ddp_worker(args: argparse.Namespace) -> int:
    """One DDP rank: LocalTrainer with its forward wrapped in DistributedDataParallel; rank 0 evaluates."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from photon_p2p.config import load_config
    from photon_p2p.train.trainer import build_trainer

    rank, world = args.rank, args.peers
    cfg = load_config(["tiny"], [f"name=silo-{rank}", f"data.path={args.data}", "train.threads=1", *args.overrides])
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank, world_size=world)
    trainer = build_trainer(cfg, args.data, peer=cfg.name)  # same model init (seed) and data stream as silo-i
    # The only buffers are the constant RoPE tables: syncing them before every forward would only add traffic.
    import inspect

    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(trainer.model, **no_sync)
    trainer.forward = ddp  # train_step calls self.forward: DDP's hooks all-reduce the gradients in backward
    log = open(args.log, "w") if rank == 0 else None
    every = args.local_steps
    while True:
        trainer.train_step()
        if log:  # flushed every step: the run ends with a kill, and the step count must survive it
            log.write(json.dumps({"kind": "step", "time": time.time(), "step": trainer.step}) + "\n")
            log.flush()
        if log and trainer.step % every == 0:
            trainer.forward = trainer.model  # no collectives while only rank 0 evaluates
            ev = trainer.evaluate()
            trainer.forward = ddp
            log.write(json.dumps({"kind": "eval", "time": time.time(), "step": trainer.step,
                                  "tokens": trainer.tokens * world, "loss": trainer.last_loss,
                                  "tx_bytes": _tx_bytes(args.ifname), **ev}) + "\n")
            log.flush()


def _tx_bytes(ifname: str) -> int:
    for line in open("/proc/self/net/dev"):
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            return int(rest.split()[8])
    return -1


# ---- the benchmark -------------------------------------------------------------------------------------------
def run_photon(tb: Testbed, rate: float, args: argparse.Namespace, system: str = "photon_p2p",
               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Photon daemons in the testbed for args.seconds; peer 0's eval records (global model) vs wall-clock."""
    run_id = f"lowbw-{rate:g}-{os.getpid()}-{system}-{int(time.time())}"
    dirs = [Path(args.runs) / f"{system}-{rate:g}mbit" / f"peer-{i}" for i in range(args.peers)]
    overrides = [f"data.path={args.data}", "train.threads=1", "federation.rounds=0",
                 f"federation.local_steps={args.local_steps}", f"federation.target_group_size={args.peers}",
                 *args.overrides, *extra]
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    tx0 = [c["tx_bytes"] for c in tb.all_counters()]
    try:
        procs.append(start_photon_peer(tb, 0, dirs[0], overrides, run_id=run_id))
        maddrs = wait_peer_address(procs[0], dirs[0])
        for i in range(1, args.peers):
            procs.append(start_photon_peer(tb, i, dirs[i], overrides, initial=maddrs[:1], run_id=run_id))
        wait_until(t0 + args.seconds, procs)
        tx1 = [c["tx_bytes"] for c in tb.all_counters()]
    finally:
        stop_procs(procs)
    records = kit.records(dirs[0])
    rounds = [r for r in records if r["kind"] == "round"]
    evals = [{"t": r["time"] - t0, "val_ppl": r["val_ppl"], "step": r["step"], "tokens": r["tokens"]}
             for r in records if r["kind"] == "eval"]
    phases = [r for r in records if r["kind"] == "phase"]
    pauses = [r for r in records if r["kind"] == "pause"]
    # the trainer's pause after each average, by part (daemon "pause" records): mean seconds per round
    pause = {k[:-2]: mean([r[k] for r in pauses]) for k in pauses[0] if k.endswith("_s")} if pauses else {}
    return {"pause_s": pause, "system": system, "rate_mbit": rate, "evals": evals, "rounds": len(rounds),
            # compute utilization: inner-step seconds over wall-clock seconds, from the first local phase's start
            "compute_s": sum(r["compute_s"] for r in rounds), "wait_s": sum(r["wait_s"] for r in rounds),
            "utilization": phases[-1]["compute_total"] / phases[-1]["wall_s"] if phases else math.nan,
            "solo_rounds": sum(bool(r["solo"]) for r in rounds),
            "mean_averaging_s": mean([r["averaging_s"] for r in rounds]),
            "wire_tx_bytes_per_peer": mean([b - a for a, b in zip(tx0, tx1)]),
            "inner_steps": rounds[-1]["step"] if rounds else 0,
            # steady state, from the end of round 1 (start-up and the joiner's wait excluded) to the last round
            "seconds_per_step": ((rounds[-1]["time"] - rounds[0]["time"]) / (rounds[-1]["step"] - rounds[0]["step"])
                                 if len(rounds) > 1 else math.nan)}


def run_ddp(tb: Testbed, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """DDP ranks in the testbed for args.seconds; rank 0's eval records vs wall-clock."""
    base = Path(args.runs) / f"ddp-{rate:g}mbit"
    base.mkdir(parents=True, exist_ok=True)
    log = base / "metrics.jsonl"
    log.unlink(missing_ok=True)
    port = 29500 + os.getpid() % 1000
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    tx0 = [c["tx_bytes"] for c in tb.all_counters()]
    try:
        for r in range(args.peers):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", "--rank", str(r),
                   "--peers", str(args.peers), "--master", tb.addr(0), "--port", str(port), "--data", args.data,
                   "--log", str(log), "--ifname", tb.ifnames[r], "--local-steps", str(args.local_steps)]
            cmd += [a for o in args.overrides for a in ("--set", o)]
            procs.append(tb.popen(r, cmd, log=base / f"rank-{r}.log",
                                  env={**os.environ, "GLOO_SOCKET_IFNAME": tb.ifnames[r]}))
        wait_until(t0 + args.seconds, procs)
        tx1 = [c["tx_bytes"] for c in tb.all_counters()]
    finally:
        stop_procs(procs)
    if any(p.returncode not in (0, -15, -9) for p in procs):
        tail = (base / "rank-0.log").read_text(errors="replace")[-400:]
        raise NetnsError(f"a DDP rank failed (see {base}/rank-*.log): {tail!r}")
    everything = kit.read_jsonl(log)
    records = [r for r in everything if r["kind"] == "eval"]
    evals = [{"t": r["time"] - t0, "val_ppl": r["val_ppl"], "step": r["step"], "tokens": r["tokens"] // args.peers}
             for r in records]
    steps = everything[-1]["step"] if everything else 0
    step_times = [r["time"] for r in everything if r["kind"] == "step"]
    # steady state: from step 2 on (step 1 includes DDP's first bucket set-up)
    s_per_step = (step_times[-1] - step_times[1]) / (len(step_times) - 2) if len(step_times) > 2 else math.nan
    per_step = [(b["tx_bytes"] - a["tx_bytes"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])]
    return {"system": "ddp-gloo", "rate_mbit": rate, "evals": evals, "inner_steps": steps,
            "wire_tx_bytes_per_peer": mean([b - a for a, b in zip(tx0, tx1)]),
            "rank0_tx_bytes_per_step": mean(per_step), "seconds_per_step": s_per_step}


def wait_until(deadline: float, procs: list[subprocess.Popen]) -> None:
    """Sleep until the wall-clock deadline, or until a process exits early (an error: reported by the caller)."""
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise NetnsError(f"a process exited early with code {[p.poll() for p in procs]}; see the run logs")
        time.sleep(0.5)


def time_to(evals: list[dict], target: float) -> float | None:
    """Wall-clock seconds of the first evaluation at or below ``target`` perplexity."""
    return next((e["t"] for e in evals if e["val_ppl"] <= target), None)


def summarize(runs: list[dict], target_arg: float) -> dict[str, Any]:
    """Per rate: the target (given, or the higher of the two systems' best ppl: both reach it) and times to it."""
    targets: dict[str, float] = {}
    for rate in sorted({r["rate_mbit"] for r in runs}, reverse=True):
        pair = [r for r in runs if r["rate_mbit"] == rate]
        best = [min((e["val_ppl"] for e in r["evals"]), default=math.inf) for r in pair]
        target = target_arg or max(best)
        if not math.isfinite(target):
            raise NetnsError("a run logged no evaluation; raise --seconds (or lower --local-steps)")
        targets[f"{rate:g}"] = target
        for r, b in zip(pair, best):
            r["best_ppl"], r["target_ppl"] = b, target
            r["time_to_target_s"] = time_to(r["evals"], target)
        ph = next((r for r in pair if r["system"] == "photon_p2p"), None)
        dd = next((r for r in pair if r["system"] == "ddp-gloo"), None)
        if ph and dd and ph["time_to_target_s"] and dd["time_to_target_s"]:
            ph["ddp_over_photon_time"] = dd["time_to_target_s"] / ph["time_to_target_s"]
    return {"target_ppl": targets, "target_auto": not target_arg}


def plot(runs: list[dict], targets: dict[str, float], out: Path) -> None:
    fig, ax = kit.pyplot().subplots(figsize=(7.5, 4.5))
    styles = ["-", "--", ":", "-."]
    rates = sorted({r["rate_mbit"] for r in runs}, reverse=True)
    for r in runs:
        ls = styles[rates.index(r["rate_mbit"]) % len(styles)]
        color = "tab:blue" if r["system"] == "photon_p2p" else "tab:red"
        ax.plot([e["t"] for e in r["evals"]], [e["val_ppl"] for e in r["evals"]], ls, marker="o", ms=3,
                color=color, label=f"{r['system']} @ {r['rate_mbit']:g} Mbit/s")
    for rate, target in targets.items():
        ls = styles[rates.index(float(rate)) % len(styles)]
        ax.axhline(target, color="gray", lw=0.8, ls=ls, label=f"target ppl {target:.0f} ({rate} Mbit/s)")
    ax.set(xlabel="wall-clock seconds (from process launch)", ylabel="validation perplexity", yscale="log",
           title="Tiny model, 2 peers in netns with tbf-shaped links")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    kit.save(fig, out)


def ppl_at_step(evals: list[dict], step: int) -> float:
    return next((e["val_ppl"] for e in evals if e["step"] == step), math.nan)


def interpretation(res: dict[str, Any]) -> list[str]:
    """Sentences whose numbers come from the result (so a rerun keeps the text true)."""
    lines = ["**Reading.**"]
    for rate in res["rates"]:
        pair = {r["system"]: r for r in res["runs"] if r["rate_mbit"] == rate}
        ph, dd = pair.get("photon_p2p"), pair.get("ddp-gloo")
        if not (ph and dd):
            continue
        sp, sd = ph["seconds_per_step"], dd["seconds_per_step"]
        common = max((e["step"] for e in dd["evals"] if any(p["step"] == e["step"] for p in ph["evals"])), default=0)
        text = (f"At {rate:g} Mbit/s a DDP step takes {sd:.2f} s against {sp:.2f} s per inner step for photon_p2p "
                f"(averaging included), i.e. photon_p2p trains {sd / sp:.1f}x more steps per second")
        if common:
            pd, pp = ppl_at_step(dd["evals"], common), ppl_at_step(ph["evals"], common)
            who = "DDP is ahead" if pd < pp else "photon_p2p is ahead"
            text += f"; per step, {who} (after {common} steps: DDP ppl {pd:.0f}, photon_p2p {pp:.0f})"
        if "ddp_over_photon_time" in ph:
            x = ph["ddp_over_photon_time"]
            faster = f"photon_p2p {x:.2f}x sooner" if x >= 1 else f"DDP {1 / x:.2f}x sooner"
            text += (f". Net: ppl {ph['target_ppl']:.0f} is reached by {faster} "
                     f"(photon_p2p {ph['time_to_target_s']:.0f} s, DDP {dd['time_to_target_s']:.0f} s); photon_p2p sends "
                     f"{dd['wire_tx_bytes_per_peer'] / max(1.0, ph['wire_tx_bytes_per_peer']):.0f}x fewer bytes in the "
                     f"same {res['seconds']:g} s.")
            if len(dd["evals"]) < 3:
                text += (f" (DDP evaluated only {len(dd['evals'])} time(s) in {res['seconds']:g} s at this rate, so its "
                         "time to target is a coarse value: its evaluation interval is H steps.)")
        else:
            text += "."
        lines.append(text)
    lines += [
        "",
        "**Caveats.** A 1.9M-parameter model on 2 shared CPU cores is compute-heavy relative to its 7.6 MB of "
        "gradients, so even 100 Mbit/s is only a moderate bottleneck for DDP; with real model sizes the gap grows "
        "with the payload (a 125M model's gradient is 500 MB: 40 s per step at 100 Mbit/s). tbf shapes bandwidth "
        "only: this kernel has no netem, so no latency was added; WAN round-trip times would slow DDP's per-step "
        "synchronisation further (photon_p2p synchronises once per round). Start-up (hivemind DHT and p2pd vs gloo's rendezvous) is inside "
        "the wall-clock. photon_p2p waits federation.matchmaking_time (3 s in the tiny preset) every round. Both "
        "systems use the tiny preset's cosine schedule (300 steps), the same lr and per-peer batch; DDP's effective "
        "batch is the sum over peers. Evaluation cost is inside both curves (photon: both peers every round; "
        "DDP: rank 0 every H steps while the other ranks wait). One run per setting on a noisy shared machine. "
        "4 peers (`--peers 4`, a bridge) work but were not run: 4 training processes on 2 cores would measure "
        "CPU contention rather than the links.",
    ]
    return lines


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "## Low bandwidth: time to a target perplexity, photon_p2p vs per-step DDP (evidence issue, item 5)",
        "",
        f"{res['peers']} peers, each in its own network namespace; every namespace's egress shaped with `tc tbf` "
        "(no netem on this kernel, so no added delay). Tiny model "
        f"({res['params']:,} parameters, fp32 = {res['params'] * 4 / 1e6:.1f} MB), batch {res['batch_size']} x "
        f"seq {res['seq_len']} per peer, one torch thread per process. photon_p2p: daemons, Photon tiny recipe, "
        f"H = {res['local_steps']}; DDP: torch DistributedDataParallel over gloo (gradients all-reduced every "
        f"step), same trainer, batch and data stream per rank. Each system trains {res['seconds']:g} s of "
        "wall-clock (process launch included); validation every H steps on the same windows.",
        "",
        "Target perplexity per link rate: "
        + ", ".join(f"**{t:.0f}** at {rate} Mbit/s" for rate, t in res["target_ppl"].items())
        + (" (auto: the higher of the two systems' best values at that rate, so both reach it)."
           if res["target_auto"] else "."),
        "",
        *kit.md_table(["link", "system", "inner steps", "best val ppl", "target ppl", "time to target (s)",
                       "wire MB sent per peer", "DDP/photon time"]),
    ]
    for rate in res["rates"]:
        pair = {r["system"]: r for r in res["runs"] if r["rate_mbit"] == rate}
        ph, dd = pair.get("photon_p2p"), pair.get("ddp-gloo")
        ratio = f"{ph['ddp_over_photon_time']:.2f}x" if ph and "ddp_over_photon_time" in ph else ""
        for r in (ph, dd):
            if r is None:
                continue
            tt = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
            lines.append(f"| {rate:g} Mbit/s | {r['system']} | {r['inner_steps']} | {r['best_ppl']:.1f} | "
                         f"{r['target_ppl']:.1f} | {tt} | "
                         f"{r['wire_tx_bytes_per_peer'] / 1e6:.1f} | {ratio if r is ph else ''} |")
    lines += ["", "![val ppl vs wall-clock](low_bandwidth.png)", "", *interpretation(res), "",
              f"Command (machine CPU-2, {res['date']}): `{command}`", "",
              "Raw numbers: `bench/results/low_bandwidth.json`.", ""]
    return "\n".join(lines)


# ---- the overlap report --------------------------------------------------------------------------------------
def ppl_at_tokens(evals: list[dict], tokens: int) -> float:
    """Validation perplexity at ``tokens`` (per peer), linearly interpolated between evaluations."""
    pts = sorted((e["tokens"], e["val_ppl"]) for e in evals)
    for (t0, p0), (t1, p1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            return p0 + (p1 - p0) * (tokens - t0) / max(1, t1 - t0)
    return next((p for t, p in pts if t == tokens), math.nan)


def overlap_summarize(runs: list[dict]) -> None:
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


def overlap_plot(res: dict[str, Any], out: Path) -> None:
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


def overlap_markdown(res: dict[str, Any], command: str, name: str = "overlap") -> str:
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
        *kit.md_table(["link", "system", "utilization", "idle s / round", "inner steps", "best val ppl",
                       "time to target (s)", "ppl at equal tokens"]),
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
    ap = kit.parser(__doc__, data="runs/bench-data-netns", runs=None, set="overrides", replot=True, out=None)
    ap.add_argument("--report", choices=list(REPORTS), default="time", help="which report (and its defaults)")
    ap.add_argument("--rates", type=float, nargs="+", metavar="MBIT",
                    help="tbf egress rate of every namespace, Mbit/s (one run of each system per rate)")
    ap.add_argument("--seconds", type=float, help="wall-clock seconds per system and rate")
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="train.seed values: each system runs once per seed (model init and data order)")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=32, help="photon H; also the evaluation interval")
    ap.add_argument("--target-ppl", type=float, default=0.0, help="0 = per rate, the higher of the two best ppl")
    # internal: one DDP rank
    for flag, kw in (("--ddp-worker", {"action": "store_true"}), ("--rank", {"type": int}), ("--master", {}),
                     ("--port", {"type": int}), ("--log", {}), ("--ifname", {})):
        ap.add_argument(flag, help=argparse.SUPPRESS, **kw)
    args = ap.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    for key, value in REPORTS[args.report].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = args.peers < 2 or args.seconds <= 0 or any(r <= 0 for r in args.rates)
    return bench_main("low_bandwidth", args, write_reports, measure,
                      "need --peers >= 2, --seconds > 0 and rates > 0" if bad else "")


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
                    r = (run_ddp(tb, rate, args) if SYSTEMS[system] is None
                         else run_photon(tb, rate, args, system=system, extra=(*SYSTEMS[system], *seeded)))
                    runs.append(r | {"seed": seed})
                    last = r["evals"][-1]["val_ppl"] if r["evals"] else math.nan
                    print(f"low_bandwidth: {rate:g} Mbit/s {system:>10} seed {seed}: {r['inner_steps']} steps, "
                          f"{len(r['evals'])} evals, last val ppl {last:.1f}, utilization "
                          f"{r.get('utilization', math.nan):.1%}", flush=True)
    res = {"bench": "overlap" if args.report == "overlap" else "low_bandwidth", "date": kit.utc(),
           "peers": args.peers, "rates": args.rates, "seeds": args.seeds, "seconds": args.seconds,
           "local_steps": args.local_steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.model.seq_len,
           "params": count_params(cfg.model), "overrides": args.overrides, "runs": runs, "command": kit.command()}
    if args.report == "overlap":
        overlap_summarize(runs)
        return res
    return res | summarize(runs, args.target_ppl)


def write_reports(out: Path, res: dict[str, Any] | None) -> int:
    """OUT.json, OUT.md and OUT.png in the report the result names (OUT.json's result, when replotting)."""
    path = out.with_suffix(".json")
    if (res or (json.loads(path.read_text()) if path.is_file() else {})).get("bench") == "overlap":
        return report.write_reports(out, res, "overlap", overlap_plot, lambda r, c: overlap_markdown(r, c, out.name),
                                    lambda r: r["command"])
    return report.write_reports(out, res, "low_bandwidth", lambda r, png: plot(r["runs"], r["target_ppl"], png),
                                markdown, lambda _: "python bench/low_bandwidth.py")


if __name__ == "__main__":
    sys.exit(main())
