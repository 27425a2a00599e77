#!/usr/bin/env python
"""Volunteers behind NAT vs reachable silos: participation, averaging time and bytes on tbf-shaped links.

Real `photon-peer` daemons (the tiny preset, a small batch) in network namespaces (bench/nat_net.py): a public
segment with a bootstrap node and the reachable silos, and volunteers each behind its own MASQUERADE router (no
port forwarding). Every machine's uplink and each volunteer's downlink is shaped with tbf at --rate-mbit.
Scenarios, each a fresh swarm of --rounds rounds, every peer given only the bootstrap multiaddr:

  reachable        3 reachable silos (the baseline)
  nat_client       2 reachable silos + 1 volunteer with peers/volunteer.yaml (client mode)
  nat_only_client  1 reachable silo that leaves after round 1 + 2 volunteers behind different NATs, client mode:
                   rounds >= 2 have no reachable peer
  nat_only_helper  2 volunteers behind different NATs (client mode) + an averaging helper on a reachable machine
                   (photon-peer run --helper: trains nothing, weight 0): no training peer is reachable in any round

Reported per role: participation (rounds averaged in a group / rounds finished), mean averaging seconds per round
(matchmaking + all-reduce), daemon-counted payload bytes per round, and each machine's link bytes (veth counters,
tx + rx, whole run): the bootstrap node's bytes beyond the baseline's are what relaying cost it.
Needs root, iproute2 and iptables; prints "skipped: ..." and exits 0 otherwise. Writes OUT.json, OUT.md, OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import report
import toolkit as kit
from nat_net import NatTestbed, nat_unsupported_reason, run_swarm
from netns import CounterPoller, bench_main
from toolkit import fmt

# name: (reachable peers, volunteers, overrides of the first reachable peer, min_group_size, volunteer overrides).
# min_group_size = every peer of the round, so a round closes only with all of them (or goes solo at the deadline):
# participation then says whether the NATed peers *can* be in the group, not who was fastest to matchmaking.
# (A p2pd circuit relay cannot carry a round in hivemind 1.1.12, bench/relay_probe.py: nat_only_helper replaced
# nat_only_relay.)
SCENARIOS = {
    "reachable": (3, 0, [], 3, []),
    "nat_client": (2, 1, [], 3, []),
    "nat_only_client": (1, 2, ["federation.rounds=1"], 2, []),  # the only reachable silo leaves after round 1
    "nat_only_helper": (1, 2, ["federation.helper=true"], 3, []),  # the reachable peer trains nothing
}


def run_scenario(name: str, args: argparse.Namespace, data: str) -> dict[str, Any]:
    n_silos, n_vol, first_peer, min_group, vol_overrides = SCENARIOS[name]
    run_id = f"nat-{name.replace('_', '-')}-{os.getpid()}"
    common = [f"data.path={data}", f"federation.run_id={run_id}", f"federation.rounds={args.rounds}",
              f"federation.local_steps={args.local_steps}", f"train.batch_size={args.batch_size}",
              "train.threads=1", "train.eval_every=0", "train.max_steps=100000", "train.checkpoint_every=100000",
              "federation.matchmaking_time=3", f"federation.round_deadline={args.round_deadline}",
              f"federation.target_group_size={n_silos + n_vol}", f"federation.min_group_size={min_group}",
              "federation.state_sync_timeout=60", "network.bootstrap_timeout=30", *args.overrides]
    no_solo = ["federation.allow_solo_start=false"]
    with NatTestbed(public=1 + n_silos, nats=n_vol, rate_mbit=args.rate_mbit) as tb:
        with CounterPoller(tb, interval=0.5) as poller:
            res = run_swarm(tb, Path(args.runs) / name, silos=list(range(1, 1 + n_silos)),
                            volunteers=[tb.volunteer(k) for k in range(n_vol)], bootstrap=0, common=common,
                            first=first_peer, joiner=no_solo,
                            volunteer=no_solo + vol_overrides, timeout=args.scenario_timeout)
        masq = [tb.masqueraded_packets(k) for k in range(n_vol)]
    first, last = poller.samples[0][1], poller.samples[-1][1]
    wire = [last[i]["tx_bytes"] + last[i]["rx_bytes"] - first[i]["tx_bytes"] - first[i]["rx_bytes"]
            for i in range(len(first))]
    peers = []
    for pname, r in res.items():
        if pname.startswith("_"):
            continue
        rounds = [x for x in r["records"] if x["kind"] == "round"]
        late = [x for x in rounds if x["round"] >= 2]  # the rounds with no reachable peer in the nat_only ones
        grouped = [x for x in rounds if not x["solo"]]
        role = "volunteer" if pname.startswith("volunteer") else \
            "helper" if pname == "silo-0" and "federation.helper=true" in first_peer else "silo"
        peers.append({"peer": pname, "role": role,
                      "rc": r["rc"], "rounds": len(rounds), "grouped": len(grouped),
                      "participation": len(grouped) / max(1, len(rounds)),
                      "participation_from_round_2": sum(not x["solo"] for x in late) / max(1, len(late)),
                      "averaging_s": kit.mean([x["averaging_s"] for x in grouped], None),
                      "allreduce_s": kit.mean([x["phases"].get("allreduce", 0.0) for x in grouped], None),
                      "payload_bytes_per_round": kit.mean([x["bytes_sent"] + x["bytes_received"] for x in grouped],
                                                          None),
                      "wire_bytes": wire[r["machine"]], "reasons": sorted({x["reason"] for x in rounds} - {""}),
                      "fingerprints": len({x["fingerprint"] for x in rounds[-1:]})})
    finals = {p: [x for x in r["records"] if x["kind"] == "round"][-1:] for p, r in res.items()
              if not p.startswith("_")}
    at_end = {(x[0]["round"], x[0]["fingerprint"]) for x in finals.values() if x and x[0]["round"] == args.rounds}
    models: dict[int, set] = {}  # every peer's fingerprint after each round: one model per round?
    for p, r in res.items():
        for x in (r["records"] if not p.startswith("_") else []):
            if x["kind"] == "round":
                models.setdefault(x["round"], set()).add(x["fingerprint"])
    return {"scenario": name, "silos": n_silos, "volunteers": n_vol, "peers": peers,
            "bootstrap_wire_bytes": wire[0], "masqueraded_packets": masq,
            "models_at_end": len(at_end), "seconds": round(time.time() - res["_t0"], 1),
            "one_model_rounds": sum(1 for fps in models.values() if len(fps) == 1), "rounds_seen": len(models)}


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 1e6


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [f"`{command}` ({result['rate_mbit']:g} Mbit/s tbf on every uplink and NATed downlink, tiny preset, "
             f"{result['rounds']} rounds of H={result['local_steps']}, batch {result['batch_size']})", "",
             "| scenario | peer | role | participation | from round 2 | averaging s | all-reduce s | payload MB/round "
             "| link MB (run) | why not averaged |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["scenarios"]:
        for p in s["peers"]:
            lines.append(f"| {s['scenario']} | {p['peer']} | {p['role']} | {p['grouped']}/{p['rounds']} | "
                         f"{p['participation_from_round_2']:.2f} | {fmt(p['averaging_s'])} | "
                         f"{fmt(p['allreduce_s'])} | {fmt(_mb(p['payload_bytes_per_round']))} | "
                         f"{p['wire_bytes'] / 1e6:.1f} | {'; '.join(p['reasons']) or '-'} |")
    lines += ["", "| scenario | bootstrap node's link MB | rounds on one model | models at the last round | "
                  "connections MASQUERADEd | seconds |",
              "|---|---|---|---|---|---|"]
    for s in result["scenarios"]:
        one = f"{s['one_model_rounds']}/{s['rounds_seen']}" if "one_model_rounds" in s else "-"
        lines.append(f"| {s['scenario']} | {s['bootstrap_wire_bytes'] / 1e6:.2f} | {one} | {s['models_at_end']} | "
                     f"{s['masqueraded_packets']} | {s['seconds']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> None:
    fig, ax = kit.pyplot().subplots(figsize=(7, 3.6))
    labels, parts, colors = [], [], []
    for s in result["scenarios"]:
        for p in s["peers"]:
            labels.append(f"{s['scenario']}\n{p['peer']}")
            parts.append(p["participation"])
            colors.append("tab:orange" if p["role"] == "volunteer" else "tab:blue")
    ax.bar(range(len(parts)), parts, color=colors)
    ax.set_xticks(range(len(parts)), labels, rotation=70, fontsize=6)
    ax.set_ylabel("participation (rounds in a group)")
    ax.set_ylim(0, 1.05)
    ax.set_title("NATed volunteers (orange) vs reachable silos (blue)")
    kit.save(fig, out)


def main() -> int:
    ap = kit.parser(__doc__, set="overrides", data="runs/bench-data-nat", runs="runs/bench-nat",
                    out="bench/results/nat", replot=True)
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--round-deadline", type=float, default=45.0)
    ap.add_argument("--scenario-timeout", type=float, default=300.0)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = ap.parse_args()
    return bench_main("nat", args, lambda out, result: report.write_reports(
        out, result, "nat", plot, markdown, lambda _: "python bench/nat.py"), measure, why=nat_unsupported_reason)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    result = {"rate_mbit": args.rate_mbit, "rounds": args.rounds, "local_steps": args.local_steps,
              "batch_size": args.batch_size, "scenarios": [], "command": kit.command()}
    for name in args.scenarios:
        print(f"nat: scenario {name}", flush=True)
        result["scenarios"].append(run_scenario(name, args, args.data))
        print(json.dumps(result["scenarios"][-1], default=str)[:2000], flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
