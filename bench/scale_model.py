#!/usr/bin/env python
"""Scale on paper: wall-clock per round vs model size, link bandwidth and peers, from measured per-round costs.

The model (one peer's view of one round, butterfly all-reduce as hivemind runs it):
  bytes on the wire per peer   V = 2 (n-1)/n * P * b          (b = 4 fp32, 2 fp16, ~1 blockwise 8-bit)
  averaging time               T_avg = floor + max(V / bandwidth, 4P / cpu_rate)
  local compute per round      T_cmp = H * tokens_per_step * flops_per_token / (peak * MFU)
  per-step DDP (ring, fp32)    T_ddp = tokens_per_step * flops_per_token / (peak * MFU) + 2 (n-1)/n * 4P / bandwidth
``floor`` (matchmaking + RPC rounds) and ``cpu_rate`` (copy + codec throughput) are fitted on the loopback
averaging benchmark, where bandwidth is not the limit; the fitted model is then checked against the measured
points that were not used to fit it (other peer counts, tc-shaped namespace links, counted bytes). The GPU side
(peak, MFU) is an assumption stated on the command line: no GPU was measured on the development machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import toolkit as kit
from photon_p2p.config import load_config
from photon_p2p.model import count_params, flops_per_token

BYTES_PER_PARAM = {"none": 4.0, "fp16": 2.0, "blockwise8": 1.0 + 4.0 / 4096}  # blockwise8: + one fp32 absmax / 4096
SIZES = ["photon-125m", "photon-1.3b", "photon-3b", "photon-7b"]
BANDWIDTHS_GBIT = [0.1, 1.0, 10.0]


@dataclass
class Costs:
    """Per-round constants of the averager, fitted on measured loopback rounds of 2 peers (one core each)."""

    floor_s: float  # copy-in + matchmaking + hand-off + write-back: what a round costs besides moving data
    cpu_bytes_per_s: dict[str, float]  # fp32-equivalent bytes a peer pushes through the all-reduce per CPU second


def wire_bytes(params: int, peers: int, codec: str) -> float:
    """Bytes one peer sends in one butterfly all-reduce (reduce-scatter + all-gather of its share)."""
    return 2.0 * (peers - 1) / peers * params * BYTES_PER_PARAM[codec]


def averaging_seconds(c: Costs, params: int, peers: int, codec: str, bandwidth_bps: float,
                      cores_per_peer: float = 1.0) -> float:
    """One round's averaging time once every peer is ready (no arrival skew)."""
    if peers < 2:
        return 0.0
    # On loopback the time goes into CPU work per fp32 value (protobuf, sockets, codec, reduction), not bytes on
    # the wire: 8-bit was no faster than fp32 there. On a link, the slower of the two sets the pace, because
    # hivemind streams parts through the codec while it sends.
    cpu = wire_bytes(params, peers, "none") / (c.cpu_bytes_per_s[codec] * cores_per_peer)
    return c.floor_s + max(wire_bytes(params, peers, codec) * 8 / bandwidth_bps, cpu)


def ring_seconds(params: int, peers: int, bandwidth_bps: float, bytes_per_value: float = 4.0) -> float:
    """Per-step DDP gradient all-reduce (ring), bandwidth-bound, without overlap with the backward pass."""
    return 2.0 * (peers - 1) / peers * bytes_per_value * params * 8 / bandwidth_bps if peers > 1 else 0.0


def calibrate(path: Path, mode: str = "bulk") -> tuple[Costs, list[dict]]:
    """Fit Costs on the 2-peer rounds of bench/allreduce_speed.py in ``mode`` (bulk: uncompressed rounds over gloo,
    photon_p2p's default; tuned: everything through hivemind), codecs the mode does not cover from the tuned
    rounds; return the rows too (for checks)."""
    if not path.exists():
        raise SystemExit(f"scale_model: no calibration at {path}; run python bench/allreduce_speed.py first")
    data = json.loads(path.read_text())
    fitted = [r for r in data["rows"] if r["op"] == mode and r["case"] == r["codec"]]
    covered = {(r["peers"], r["codec"]) for r in fitted}
    rows = fitted + [r for r in data["rows"] if r["op"] == "tuned" and r["case"] == r["codec"]
                     and (r["peers"], r["codec"]) not in covered]
    params = int(data["args"]["mb"] * 1e6 / 4)
    base = {r["codec"]: r for r in rows if r["peers"] == 2}
    if "none" not in base:
        raise SystemExit(f"scale_model: {path} has no 2-peer uncompressed tuned round to calibrate on")
    ph = base["none"]["phases_s"]
    floor = ph["copy_in"] + ph["matchmaking"] + ph["handoff"] + ph["write_back"]
    rates = {codec: wire_bytes(params, 2, "none") / r["phases_s"]["allreduce"] for codec, r in base.items()}
    return Costs(floor, rates), rows


def loopback_checks(c: Costs, rows: list[dict], mb: float, cores: int) -> list[dict]:
    """Predict the 4-peer loopback rounds (not used to fit) — 4 peers share this machine's cores."""
    params, out = int(mb * 1e6 / 4), []
    for r in rows:
        if r["peers"] == 2:
            continue
        pred = averaging_seconds(c, params, r["peers"], r["codec"], float("inf"), min(1.0, cores / r["peers"]))
        out.append({"check": f"loopback {r['peers']} peers, {r['codec']}, {mb:g} MB", "measured_s": r["round_s"],
                    "predicted_s": pred, "measured_over_predicted": r["round_s"] / pred})
    return out


def link_checks(c: Costs, path: Path) -> list[dict]:
    """Predict the tc-shaped namespace runs of bench/low_bandwidth.py: DDP step time and Photon averaging."""
    if not path.exists():
        return []
    data, out = json.loads(path.read_text()), []
    params, steps = int(data["params"]), int(data["local_steps"])
    runs = {(r["system"], r["rate_mbit"]): r for r in data["runs"]}
    for rate in sorted({r["rate_mbit"] for r in data["runs"]}, reverse=True):
        photon, ddp = runs.get(("photon_p2p", rate)), runs.get(("ddp-gloo", rate))
        if not photon or not ddp:
            continue
        bw = rate * 1e6
        # Compute per inner step, read off the Photon run itself: its step time less the amortized averaging.
        step = photon["seconds_per_step"] - photon["mean_averaging_s"] / steps
        pred_avg = averaging_seconds(c, params, data["peers"], "none", bw)
        pred_ddp = step + ring_seconds(params, data["peers"], bw)
        out.append({"check": f"{rate:g} Mbit/s tbf, {data['peers']} peers: Photon averaging per round",
                    "measured_s": photon["mean_averaging_s"], "predicted_s": pred_avg,
                    "measured_over_predicted": photon["mean_averaging_s"] / pred_avg})
        out.append({"check": f"{rate:g} Mbit/s tbf, {data['peers']} peers: DDP seconds per step",
                    "measured_s": ddp["seconds_per_step"], "predicted_s": pred_ddp,
                    "measured_over_predicted": ddp["seconds_per_step"] / pred_ddp})
    return out


def scale_table(c: Costs, args: argparse.Namespace) -> list[dict]:
    """Rows for every (size, bandwidth, peers): one Photon round vs H steps of per-step DDP, per silo."""
    rows, peak = [], args.peak_tflops * 1e12 * args.gpus_per_silo
    for name in SIZES:
        cfg = load_config([name]).model
        params, ftok = count_params(cfg), flops_per_token(cfg)
        step = args.batch * cfg.seq_len * ftok / (peak * args.mfu)
        for gbit in BANDWIDTHS_GBIT:
            for peers in args.peers:
                t_avg = averaging_seconds(c, params, peers, args.codec, gbit * 1e9, args.averager_cores)
                t_round = args.local_steps * step + t_avg
                t_ddp = args.local_steps * (step + ring_seconds(params, peers, gbit * 1e9, args.ddp_bytes))
                rows.append({"model": name, "params": params, "gbit": gbit, "peers": peers, "codec": args.codec,
                             "step_s": step, "compute_s": args.local_steps * step, "averaging_s": t_avg,
                             "round_s": t_round, "comm_fraction": t_avg / t_round, "ddp_same_tokens_s": t_ddp,
                             "ddp_over_photon": t_ddp / t_round})
    return rows


def plot(rows: list[dict], fast: list[dict], peers: int, title: str, out: Path) -> None:
    """Left: share of a round spent averaging; right: DDP/Photon time. Dashed: averager on ``fast`` cores."""
    fig, (a, b) = kit.pyplot().subplots(1, 2, figsize=(11, 4.2))
    for i, gbit in enumerate(BANDWIDTHS_GBIT):
        for table, style, tag in ((rows, "-", ""), (fast, "--", ", 16-core averager")):
            sel = [r for r in table if r["gbit"] == gbit and r["peers"] == peers]
            xs = range(len(sel))
            a.plot(xs, [100 * r["comm_fraction"] for r in sel], style, marker="o", color=f"C{i}",
                   label=f"{gbit:g} Gbit/s{tag}")
            b.plot(xs, [r["ddp_over_photon"] for r in sel], style, marker="o", color=f"C{i}",
                   label=f"{gbit:g} Gbit/s{tag}")
    names = [n.removeprefix("photon-") for n in SIZES]
    a.set(ylabel="% of a round spent averaging", title=title, ylim=(0, 100))
    b.set(yscale="log", ylabel="per-step DDP time / Photon time", title="same tokens, per silo")
    for ax in (a, b):
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("model")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    kit.save(fig, out, dpi=120)


def markdown(c: Costs, checks: list[dict], rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Fitted: floor {c.floor_s:.3f} s per round; all-reduce CPU rate per core (fp32-equivalent MB/s): "
             + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in c.cpu_bytes_per_s.items()), "",
             *kit.md_table(["check (not used to fit)", "measured (s)", "predicted (s)", "measured / predicted"])]
    lines += [f"| {k['check']} | {k['measured_s']:.3f} | {k['predicted_s']:.3f} | {k['measured_over_predicted']:.2f} |"
              for k in checks]
    lines += ["", f"Per silo: {args.gpus_per_silo} GPU(s) at {args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g}, "
              f"batch {args.batch} x 2048, H = {args.local_steps}, codec {args.codec}, averager on "
              f"{args.averager_cores:g} core(s), DDP all-reduces {args.ddp_bytes:g} bytes per value.", "",
              *kit.md_table(["model", "link", "peers", "compute/round (s)", "averaging (s)", "% averaging",
                             "DDP/Photon time"])]
    lines += [f"| {r['model']} | {r['gbit']:g} Gbit/s | {r['peers']} | {r['compute_s']:.1f} | {r['averaging_s']:.1f} | "
              f"{100 * r['comm_fraction']:.1f} | {r['ddp_over_photon']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = kit.parser(__doc__, out="bench/results/scale_model")
    ap.add_argument("--calibration", default="bench/results/allreduce_speed.json")
    ap.add_argument("--links", default="bench/results/low_bandwidth.json", help="tc-shaped runs to check against")
    ap.add_argument("--cores", type=int, default=2, help="cores of the machine the loopback calibration ran on")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM bf16 dense: 989)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--gpus-per-silo", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step per silo (Photon 125M: 32)")
    ap.add_argument("--local-steps", type=int, default=128)
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--codec", default="none", choices=sorted(BYTES_PER_PARAM))
    ap.add_argument("--averager-cores", type=float, default=1.0, help="cores a silo's averager gets")
    ap.add_argument("--ddp-bytes", type=float, default=4.0, help="bytes per gradient value DDP sends (bf16: 2)")
    ap.add_argument("--mode", default="bulk", choices=["bulk", "bulk-plain", "tuned"],
                    help="calibrate uncompressed rounds on the gloo bulk path (default) or on hivemind's")
    args = ap.parse_args()
    costs, rows = calibrate(Path(args.calibration), args.mode)
    mb = json.loads(Path(args.calibration).read_text())["args"]["mb"]
    if args.codec not in costs.cpu_bytes_per_s:
        raise SystemExit(f"scale_model: the calibration has no 2-peer round with codec {args.codec}")
    checks = loopback_checks(costs, rows, mb, args.cores) + link_checks(costs, Path(args.links))
    table = scale_table(costs, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "costs": vars(costs), "checks": checks,
                                                   "rows": table}, indent=1))
    fast = scale_table(costs, argparse.Namespace(**{**vars(args), "averager_cores": 16.0}))
    plot(table, fast, args.peers[-1], f"photon_p2p, {args.peers[-1]} peers, H={args.local_steps}, {args.codec}",
         out.with_suffix(".png"))
    text = markdown(costs, checks, table, args)
    out.with_suffix(".table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
