#!/usr/bin/env python
"""Trust: does robust aggregation keep the honest silos' model when one or two silos misbehave, and what does it
cost an honest swarm? Side by side in one run, 4 silos on the tiny preset (127.0.0.1, train.threads=1).

Usage:
  flock /tmp/photon-bench.lock python bench/trust.py                      # every scenario, then the table
  flock /tmp/photon-bench.lock python bench/trust.py --scenarios honest-none scaled
  python bench/trust.py --report-only                                     # re-print the table
  flock /tmp/photon-bench.lock python bench/trust.py --micro             # in-process costs only
  (internal) python bench/trust.py --bad-peer scale:1e4 -- run --config tiny ...   # an adversarial silo

Scenarios (federation.rounds=R, local_steps=H, from --rounds/--local-steps; one shared validation set as in
bench/one_model.py; silo i trains on corpus source i mod 3):
  honest-none   4 honest silos, federation.robust_aggregation=off (the plain mean: the baseline)
  honest       4 honest silos, robust_aggregation=clip (the default)
  lr50         silo 3 with train.lr=50 and train.grad_clip=0 (the daemon's non-finite guard already keeps its
               Δ out; robust aggregation would drop a non-finite chunk too)
  scaled       silo 3 sends its Δ × 1e4
  noise        silo 3 sends Gaussian noise with the norm of its honest Δ (per tensor)
  collude      silos 2 and 3 both send their Δ × 1e4 (two of four: the lower median is still honest)
  scaled-none   silo 3 sends Δ × 1e4 with robust_aggregation=off (what the defence buys)
The adversarial silos run this script's --bad-peer wrapper: it monkeypatches PseudoGradientAverager.average to
change the Δ before it is sent, then runs photon_p2p.cli (the attack lives here, not in the product).

Figures (bench/results/trust/<scenario>.json, table.md): final val ppl of the honest silos (they hold one model;
the mean over them), its ratio to honest-none; averaging_s median of the honest silos and its ratio to honest-none;
which silos the honest peers' round records report as clipped/dropped, and the smallest factor.
--micro: ms per reduce_part call (4 senders × 2 MiB parts, fp32) for none / clip / centered_clip, and seconds
per exact all-reduce round (4 members with real p2p daemons in one process, 8 and 100 MB, codec none) per mode.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import one_model
import toolkit as kit
from toolkit import REPO, fmt

SCENARIOS: dict[str, dict[str, Any]] = {
    "honest-none": {"robust": "none"},
    "honest": {"robust": "clip"},
    "lr50": {"robust": "clip", "bad": {3: ["train.lr=50", "train.grad_clip=0"]}},
    "scaled": {"robust": "clip", "attack": {3: "scale:1e4"}},
    "noise": {"robust": "clip", "attack": {3: "noise"}},
    "collude": {"robust": "clip", "attack": {2: "scale:1e4", 3: "scale:1e4"}},
    "scaled-none": {"robust": "none", "attack": {3: "scale:1e4"}},
}
ORDER = list(SCENARIOS)


# ---- the adversarial silo (runs inside the silo's own process) -------------------------------------------
def bad_peer(attack: str, argv: list[str]) -> int:
    """Run `photon-peer ARGV`, changing every Δ before it is sent: ``scale:F`` multiplies it by F, ``noise``
    replaces each tensor by Gaussian noise of the same norm."""
    import torch

    from photon_p2p.federation import averaging

    original = averaging.PseudoGradientAverager.average

    def tampered(self, deltas, *args, **kwargs):  # noqa: ANN001, ANN202
        with torch.no_grad():
            for d in deltas:
                if attack.startswith("scale:"):
                    d.mul_(float(attack.split(":", 1)[1]))
                elif attack == "noise":
                    norm = float(d.norm())
                    noise = torch.randn_like(d)
                    d.copy_(noise * (norm / max(float(noise.norm()), 1e-12)))
        return original(self, deltas, *args, **kwargs)

    averaging.PseudoGradientAverager.average = tampered
    print(f"trust: adversarial silo: {attack} on every Δ before it is sent", flush=True)
    return kit.photon_peer(argv)


# ---- running ---------------------------------------------------------------------------------------------
class TrustSwarm(one_model.Swarm):
    """one_model's swarm of 4 silos with robust_aggregation set and the adversarial silos wrapped."""

    def __init__(self, name: str, out: Path, val_dir: Path, rounds: int, local_steps: int) -> None:
        spec = SCENARIOS[name]
        one_model.SCENARIOS[f"trust-{name}"] = {
            "peers": 4, "rounds": rounds, "bad": spec.get("bad", {}),
            "overrides": [f"federation.robust_aggregation={spec['robust']}", f"federation.local_steps={local_steps}",
                          "train.eval_every=0", "federation.round_clock=steps"]}
        super().__init__(f"trust-{name}", "new", REPO, out, val_dir, 0.0)
        self.wrapped = {i: (__file__, "--bad-peer", attack) for i, attack in spec.get("attack", {}).items()}


def summarize(name: str, sw: TrustSwarm) -> dict[str, Any]:
    spec = SCENARIOS[name]
    bad = set(spec.get("bad", {})) | set(spec.get("attack", {}))
    recs = {i: kit.records(sw.out / f"peer-{i}", "round") for i in sorted(sw.procs)}
    honest = [i for i in recs if i not in bad]
    analysis = one_model.analyze(recs, honest, [i for i in recs if sw.procs[i].returncode in (0, -15, -9)])
    ppl = [analysis["final_val_ppl"].get(str(i)) for i in honest]
    ppl = [p for p in ppl if p is not None]
    ids = {}
    for i in recs:
        log = (sw.out / f"peer-{i}" / "peer.log")
        text = log.read_text(errors="replace") if log.is_file() else ""
        for ln in text.splitlines():
            if "peer " in ln and "run '" in ln:
                ids[i] = ln.split("peer ")[-1].strip()
                break
    by_id = {v: k for k, v in ids.items()}
    clipped: dict[str, dict[str, Any]] = {}
    for i in honest:
        for r in recs[i]:
            for peer, f in (r.get("clipped") or {}).items():
                key = f"silo {by_id[peer]}" if peer in by_id else peer
                c = clipped.setdefault(key, {"rounds": set(), "factor": 1.0, "reporters": set()})
                c["rounds"].add(int(r["round"]))
                c["factor"] = min(c["factor"], float(f))
                c["reporters"].add(i)
    clipped_out = {k: {"rounds": sorted(v["rounds"]), "factor": v["factor"], "reporters": sorted(v["reporters"])}
                   for k, v in sorted(clipped.items())}
    allreduce = [float(r["phases"]["allreduce"]) for i in honest for r in recs[i]
                 if not r.get("solo") and "allreduce" in (r.get("phases") or {})]
    return {"scenario": name, "spec": spec,
            "allreduce_s": {"median": round(statistics.median(allreduce), 4) if allreduce else None,
                            "n": len(allreduce)}, "command": kit.command(), **sw.provenance,
            "wall_s": round(sw.wall_s, 1), "capped": sw.capped, "honest_silos": honest, "bad_silos": sorted(bad),
            "exit_codes": {str(i): p.returncode for i, p in sw.procs.items()},
            "honest_val_ppl": statistics.mean(ppl) if ppl else None, "clipped_reported": clipped_out,
            "rollbacks": {str(i): len(kit.records(sw.out / f"peer-{i}", "rollback")) for i in recs},
            **{k: analysis[k] for k in ("participation", "solo_reasons", "max_distinct", "final_distinct",
                                        "end_models", "averaging_s", "final_val_ppl", "round_records")}}


# ---- micro benchmark of the reducer ----------------------------------------------------------------------
def micro(repeats: int = 20) -> dict[str, Any]:
    import torch

    from photon_p2p.federation.robust import RobustSettings, reduce_part

    torch.set_num_threads(1)  # the averager process reduces on one thread (hivemind_ext/averager.py, TUNED)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2**19, generator=g)  # 2 MiB of fp32: one part at the default part_size_bytes
    parts = [base + 0.3 * torch.randn(2**19, generator=g) for _ in range(4)]
    out = {}
    for mode in ("none", "clip", "centered_clip"):
        s = RobustSettings(mode, 2.0, 3)
        reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], s)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], s)
            ts.append(time.perf_counter() - t0)
        out[mode] = round(statistics.median(ts) * 1e3, 3)
    return {"ms_per_part_4_senders_2MiB": out}


# ---- the exact all-reduce with and without robust reduction, in one process ------------------------------
def allreduce_cost(sizes: tuple[int, ...] = (2_000_000, 25_000_000), repeats: int = 3) -> dict[str, Any]:
    """Seconds per ExactAllReduceRunner round, 4 members on 127.0.0.1 (real p2p daemons, one process, codec none,
    2 MiB parts), per mode, modes interleaved; members declare their norms as the averager does."""
    import asyncio

    import torch
    from hivemind.p2p import P2P

    from photon_p2p.federation.hivemind_ext.allreduce import ExactAllReduceRunner
    from photon_p2p.federation.compression import make_compression
    from photon_p2p.federation.robust import RobustSettings

    async def one_round(p2ps, tensors, mode: str, tag: bytes) -> float:
        peers = [p.peer_id for p in p2ps]
        claims = [float(t.norm()) for t in tensors]
        runners = []
        for p2p, t in zip(p2ps, tensors):
            r = ExactAllReduceRunner(p2p=p2p, servicer_type=ExactAllReduceRunner, prefix=None, group_id=tag,
                                     tensors=[t.clone()], weight=1.0, ordered_peer_ids=peers,
                                     peer_fractions=(1.0,) * len(peers), compression=make_compression("none"),
                                     part_size_bytes=2 * 2**20, robust=RobustSettings(mode, 2.0, 3), claims=claims)
            await r.add_p2p_handlers(p2p)
            runners.append(r)

        async def run(r):
            async for _ in r:
                pass

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*map(run, runners)), 300)
        elapsed = time.perf_counter() - t0
        for p2p, r in zip(p2ps, runners):  # the next round's runners register the same handler names
            await r.remove_p2p_handlers(p2p)
        return elapsed

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for size in sizes:
            p2ps = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
            maddrs = await p2ps[0].get_visible_maddrs()
            p2ps += [await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(3)]
            try:
                g = torch.Generator().manual_seed(0)
                base = torch.randn(size, generator=g)
                tensors = [base + 0.3 * torch.randn(size, generator=g) for _ in range(4)]
                times: dict[str, list[float]] = {m: [] for m in ("none", "clip", "centered_clip")}
                for rep in range(repeats + 1):
                    for k, mode in enumerate(times):
                        t = await one_round(p2ps, tensors, mode, f"{size}-{rep}-{k}".encode())
                        if rep:  # the first repetition warms up the daemons' connections
                            times[mode].append(t)
                out[f"{size * 4 / 1e6:.0f} MB"] = {m: round(statistics.median(ts), 3) for m, ts in times.items()}
            finally:
                for p in p2ps:
                    await p.shutdown()
        return out

    torch.set_num_threads(1)
    return {"s_per_round_4_members": asyncio.run(main())}


# ---- report ----------------------------------------------------------------------------------------------
def markdown(results: dict[str, dict], micro_result: dict | None) -> str:
    base = results.get("honest-none", {})
    b_ppl, b_avg = base.get("honest_val_ppl"), (base.get("allreduce_s") or {}).get("median")
    lines = ["| scenario | code | robust | bad silos | honest silos' final val ppl | ratio to honest-none | "
             "honest silos finished | all-reduce s median (honest, phases.allreduce) | ratio | participation | "
             "models at end | clipped/dropped as reported "
             "by honest reducers (rounds, smallest factor) | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ORDER:
        r = results.get(name)
        if not r:
            continue
        ppl, avg = r["honest_val_ppl"], (r.get("allreduce_s") or {}).get("median")
        clip = "; ".join(f"{k}: {len(v['rounds'])} rounds, ×{v['factor']:.2g}"
                         for k, v in r["clipped_reported"].items()) or "none"
        lines.append(f"| {name} | {r.get('commit', '?')} | {r['spec']['robust']} | {r['bad_silos'] or '-'} | "
                     f"{fmt(ppl)} | "
                     f"{fmt(ppl / b_ppl if ppl and b_ppl else None, '.3f')} | "
                     f"{sum(r['exit_codes'][str(i)] == 0 for i in r['honest_silos'])}/{len(r['honest_silos'])} | "
                     f"{fmt(avg, '.3f')} | "
                     f"{fmt(avg / b_avg if avg and b_avg else None, '.2f')} | {fmt(r['participation'], '.3f')} | "
                     f"{r['end_models']} | {clip} | {r['wall_s']:.0f} |")
    if micro_result:
        m = micro_result["ms_per_part_4_senders_2MiB"]
        lines.append("\nReducer cost in-process (one 2 MiB fp32 part, 4 senders, 1 thread, median ms): "
                     + ", ".join(f"{k} {v}" for k, v in m.items()))
        for size, by_mode in micro_result.get("allreduce", {}).get("s_per_round_4_members", {}).items():
            lines.append(f"Exact all-reduce, 4 members in one process, {size} of fp32 (median s per round): "
                         + ", ".join(f"{k} {v} ({v / by_mode['none']:.2f}x)" for k, v in by_mode.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wrapped := kit.wrapped_silo(argv, "--bad-peer", "trust.py --bad-peer ATTACK -- <photon-peer args>"):
        return bad_peer(*wrapped)
    ap = kit.parser(__doc__, force=True, report_only=True, cap=300.0, corpus=str(kit.CORPUS),
                    out=str(REPO / "runs" / "trust"), results=str(REPO / "bench" / "results" / "trust"))
    ap.add_argument("--scenarios", nargs="+", choices=ORDER, default=ORDER)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=16)
    ap.add_argument("--micro", action="store_true",
                    help="only the in-process costs: reduce_part per part, and exact all-reduce rounds per mode")
    args = ap.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    micro_path = results / "micro.json"
    if args.micro or not args.report_only:
        figures = micro()
        if args.micro:
            figures["allreduce"] = allreduce_cost()
        elif micro_path.is_file() and "allreduce" in json.loads(micro_path.read_text()):
            figures["allreduce"] = json.loads(micro_path.read_text())["allreduce"]
        kit.write_json(micro_path, figures)
    if not args.report_only and not args.micro:
        val_dir = one_model.prepare_val(Path(args.corpus), out / "val")
        for name in args.scenarios:
            if not args.force and (results / f"{name}.json").is_file():
                continue
            print(f"trust: {name}", flush=True)
            sw = TrustSwarm(name, out / name, val_dir, args.rounds, args.local_steps)
            sw.run(args.cap)
            result = summarize(name, sw)
            kit.write_json(results / f"{name}.json", result)
            print(f"trust: {name} done in {result['wall_s']:.0f}s: honest val ppl {result['honest_val_ppl']}, "
                  f"clipped {result['clipped_reported']}", flush=True)
    loaded = {n: json.loads((results / f"{n}.json").read_text()) for n in ORDER if (results / f"{n}.json").is_file()}
    micro_result = json.loads(micro_path.read_text()) if micro_path.is_file() else None
    table = markdown(loaded, micro_result)
    (results / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    kit.run(main, "trust")
