#!/usr/bin/env python
"""One round's averaging time for an fp32 pseudo-gradient: photon_p2p's averager vs torch.distributed gloo, one run.

For each group size, WORLD peer processes start on 127.0.0.1 (one DHT, one gloo process group). Every repeat runs,
back to back and each behind a barrier so that all peers start together: gloo ``all_reduce`` of the tensor, then one
``PseudoGradientAverager.average`` round per mode (``hivemind-defaults``: the averager as it was before tuning,
``tuned``: photon_p2p's settings, see photon_p2p/federation/hivemind_ext/averager.py). Interleaving keeps the comparison
fair on a shared, noisy machine. The group is the WORLD peers (target = min = WORLD, so it starts once all joined);
the extra case "none, target 8" keeps federation.target_group_size at 8 > WORLD (min 2) as in the shipped configs,
with a heartbeat per peer as daemons publish. A round's time is the slowest peer's (the round is done when every
peer has the mean); we report the median over repeats after one warm-up, each round's phases (copy in,
matchmaking, all-reduce, write-back, codec thread-seconds) and the CPU seconds each process used (main, averager,
DHT, p2pd). Writes OUT.json, OUT.png and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import toolkit as kit

# hivemind-defaults / tuned: every byte through hivemind's butterfly, plain mean (as before robust aggregation);
# bulk: photon_p2p's defaults: uncompressed rounds over gloo between the (directly reachable) members
# (federation.transport: auto) with robust aggregation (clip: all-to-all, reduce, all-gather); bulk-plain: the
# same with robust_aggregation none (one gloo ring all-reduce)
MODES = ("hivemind-defaults", "tuned", "bulk", "bulk-plain")
PHASES = ("copy_in", "matchmaking", "allreduce", "handoff", "write_back")


# ---- worker (one peer) -----------------------------------------------------------------------------------------
def barrier(store, key: str, world: int) -> None:
    """All peers leave together: the last to arrive opens the gate."""
    if store.add(key, 1) == world:
        store.set(key + "/open", "1")
    store.wait([key + "/open"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_by_role(dht_pid: int, averager_pids: set[int]) -> dict[str, float]:
    """CPU seconds so far of this peer's processes: main, its averagers, its DHT and that DHT's p2pd."""
    if not Path("/proc/self/stat").exists():
        return {}
    roles = {"main": cpu_seconds(os.getpid()), "averager": 0.0, "dht": 0.0, "p2pd": 0.0}
    try:
        for pid in averager_pids:
            roles["averager"] += cpu_seconds(pid)
        roles["dht"] = cpu_seconds(dht_pid)
        roles["p2pd"] = sum(cpu_seconds(c) for c in children(dht_pid))
    except OSError:
        pass  # a process ended between listing and reading
    return roles


def announce(dht, run_id: str, codec: str) -> None:
    """Publish one heartbeat record for ``run_id``, as a daemon does: the averager counts live peers from these."""
    from photon_p2p.federation.records import HeartbeatPublisher

    snapshot = {"round": 0, "local_step": 0, "tokens": 0, "loss": None, "val_ppl": None, "tokens_per_s": 0.0,
                "compression": codec, "group_size": 0, "averaging_s": 0.0, "bytes_sent": 0, "bytes_received": 0,
                "client_mode": False, "version": "bench", "started_at": time.time(), "maddrs": []}
    if not HeartbeatPublisher(dht, run_id, lambda: snapshot, interval=600.0, ttl=1800.0).publish():
        raise SystemExit(f"allreduce_speed: could not publish a heartbeat for {run_id}")


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from photon_p2p.config import FederationConfig, NetworkConfig
    from photon_p2p.federation.hivemind_ext.averager import HIVEMIND_DEFAULTS, TUNED
    from photon_p2p.federation.averaging import PseudoGradientAverager
    from photon_p2p.federation.network import start_dht, visible_maddrs

    rank, world = args.rank, args.world
    store = dist.TCPStore("127.0.0.1", args.port, world, rank == 0, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    initial = [] if rank == 0 else [store.get("maddr").decode()]
    net = NetworkConfig(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap_timeout=60)
    dht = start_dht(net, initial_peers=initial)
    if rank == 0:
        store.set("maddr", visible_maddrs(dht)[0])
    x = torch.randn(int(args.mb * 1e6 / 4), generator=torch.Generator().manual_seed(rank))
    tuned = dataclasses.replace(TUNED, part_size_bytes=args.part_kib * 1024) if args.part_kib else TUNED
    tunings = {"hivemind-defaults": HIVEMIND_DEFAULTS, "tuned": tuned, "bulk": tuned, "bulk-plain": tuned}
    records = []
    for index, (case, codec, target) in enumerate(cases(args)):
        averagers = {}
        modes = modes_for(codec, args)
        for mode in modes:  # a run id per (case, mode): their groups never mix
            if target:
                announce(dht, f"bench{index}-{mode}", codec)
            barrier(store, f"{case}/{mode}/announced", world)
            fed = FederationConfig(run_id=f"bench{index}-{mode}", target_group_size=target or world,
                                   min_group_size=2 if target else world,
                                   matchmaking_time=args.matchmaking_time, allreduce_timeout=120.0,
                                   round_deadline=240.0, compression=codec,
                                   transport="auto" if mode.startswith("bulk") else "hivemind",
                                   robust_aggregation="clip" if mode == "bulk" else "none")
            averagers[mode] = PseudoGradientAverager(dht, [x], fed, net, lambda: ({}, []), tuning=tunings[mode])
        pids = {a._averager.pid for a in averagers.values()}
        for rep in range(args.repeats + 1):
            for op in ("gloo", *modes):
                if op == "gloo" and index:
                    continue  # gloo does not depend on the case: once per repeat
                barrier(store, f"{case}/{rep}/{op}", world)
                cpu0, work = cpu_by_role(dht.pid, pids), [x.clone()]
                t0 = time.perf_counter()
                if op == "gloo":
                    dist.all_reduce(work[0])
                    rec = {"seconds": time.perf_counter() - t0, "solo": False, "phases": {}, "sent": 0}
                else:
                    res = averagers[op].average(work, rep, weight=1.0)
                    rec = {"seconds": res.seconds, "solo": res.solo, "phases": res.phases, "sent": res.bytes_sent,
                           "reason": res.reason}
                cpu1 = cpu_by_role(dht.pid, pids)
                rec.update(case=case, codec=codec, op=op, rep=rep, rank=rank, cpu={k: cpu1[k] - cpu0[k] for k in cpu1})
                records.append(rec)
        for a in averagers.values():
            a.shutdown()
    barrier(store, "end", world)  # rank 0 hosts the store: it leaves last
    Path(args.worker_out).write_text(json.dumps(records))
    dist.destroy_process_group()
    dht.shutdown()


def modes_for(codec: str, args: argparse.Namespace) -> list[str]:
    """The bulk path moves uncompressed rounds only; a compressed case is measured in the hivemind modes."""
    return [m for m in args.modes if not m.startswith("bulk") or codec == "none"]


def cases(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, codec, target_group_size or 0 for "the number of peers") for every measured case."""
    out = [(codec, codec, 0) for codec in args.codecs]
    if args.oversized_target:
        out.append((f"none, target {args.oversized_target}", "none", args.oversized_target))
    return out


# ---- orchestration ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Start WORLD peers, wait for them, return every peer's records."""
    port, procs = free_port(), []
    common = ["--mb", str(args.mb), "--repeats", str(args.repeats), "--matchmaking-time", str(args.matchmaking_time),
              "--part-kib", str(args.part_kib), "--oversized-target", str(args.oversized_target),
              "--codecs", *args.codecs, "--modes", *args.modes]
    try:
        for rank in range(world):
            cmd = [sys.executable, __file__, "--worker", "--rank", str(rank), "--world", str(world), "--port",
                   str(port), "--worker-out", str(tmp / f"w{world}-{rank}.json"), *common]
            procs.append(kit.popen_logged(cmd, tmp / f"w{world}-{rank}.log"))
        # one peer failed: the others would wait at a barrier forever
        kit.wait_all(procs, args.timeout, lambda: any(p.poll() not in (None, 0) for p in procs))
        for rank, p in enumerate(procs):
            if p.poll() != 0:
                tail = (tmp / f"w{world}-{rank}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                why = "timed out" if p.poll() is None else f"exit code {p.returncode}"
                raise SystemExit(f"allreduce_speed: peer {rank} of {world} {why}: {tail[0][:300]}")
    finally:
        kit.stop_all(procs, grace=0.0)
    return [r for rank in range(world) for r in json.loads((tmp / f"w{world}-{rank}.json").read_text())]


def summarize(world: int, records: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (case, op): median over repeats of the slowest peer's time, median phases, mean CPU per peer."""
    rows = []
    for case, codec, target in cases(args):
        for op in ("gloo", *modes_for(codec, args)):
            mine = [r for r in records if r["op"] == op and r["rep"] > 0 and (op == "gloo" or r["case"] == case)]
            reps = sorted({r["rep"] for r in mine})
            rounds = [max(r["seconds"] for r in mine if r["rep"] == k) for k in reps]
            phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in mine)
                      for p in (*PHASES, "codec") if op != "gloo"}
            cpu = {k: statistics.mean(r["cpu"].get(k, 0.0) for r in mine) for k in mine[0]["cpu"]} if mine else {}
            rows.append({"peers": world, "case": case, "codec": codec, "target_group_size": target or world,
                         "op": op, "round_s": statistics.median(rounds), "rounds_s": rounds,
                         "solo_rounds": sum(r["solo"] for r in mine) / world,
                         "phases_s": phases, "cpu_s_per_peer": cpu,
                         "bytes_sent_per_peer": statistics.mean(r["sent"] for r in mine)})
    for row in rows:
        gloo = next(r["round_s"] for r in rows if r["op"] == "gloo" and r["case"] == row["case"])
        row["ratio_vs_gloo"] = row["round_s"] / gloo
    return rows


def write_markdown(rows: list[dict], args: argparse.Namespace, path: Path, meta: dict) -> None:
    lines = ["## Averaging speed: photon_p2p vs torch.distributed gloo", "",
             f"`{meta['command']}` (wrapped in `flock /tmp/photon-bench.lock`), machine: {meta['cpus']} CPUs, "
             f"load average at start {meta['loadavg']}. Plot: `{Path(args.out).with_suffix('.png')}`.", "",
             f"One {args.mb:g} MB fp32 tensor averaged on 127.0.0.1; a round is the slowest peer's time, median of "
             f"{args.repeats} rounds after a warm-up. before = the averager as it was (`HIVEMIND_DEFAULTS`), after = "
             "`TUNED` through hivemind, bulk = `TUNED` with federation.transport auto (uncompressed rounds over gloo "
             "between the members, photon_p2p's default), interleaved round by round with gloo in the same "
             "processes.", "",
             "| peers | case | gloo (s) | before (s) | after (s) | bulk (s) | bulk-plain (s) | before/gloo | "
             "after/gloo | bulk/gloo | bulk-plain/gloo | MB sent/peer |", "| --- " * 12 + "|"]
    by = {(r["peers"], r["case"], r["op"]): r for r in rows}
    for world in args.peers:
        for case, _, _ in cases(args):
            g, b, a, k, p = (by.get((world, case, op)) for op in ("gloo", *MODES))
            if not (g and b and a):
                continue
            ks, kx = (f"{k['round_s']:.3f}", f"{k['ratio_vs_gloo']:.1f}x") if k else ("-", "-")
            ps, px = (f"{p['round_s']:.3f}", f"{p['ratio_vs_gloo']:.1f}x") if p else ("-", "-")
            lines.append(f"| {world} | {case} | {g['round_s']:.3f} | {b['round_s']:.3f} | {a['round_s']:.3f} | "
                         f"{ks} | {ps} | {b['ratio_vs_gloo']:.1f}x | {a['ratio_vs_gloo']:.1f}x | {kx} | {px} "
                         f"| {(k or a)['bytes_sent_per_peer'] / 1e6:.1f} |")
    lines += ["", "Phases (median per peer, s) and CPU seconds per peer per round:", "",
              "| peers | case | mode | " + " | ".join(PHASES) + " | codec (thread-s) | CPU main / averager / "
              "DHT / p2pd |", "| --- " * (len(PHASES) + 5) + "|"]
    for r in rows:
        if r["op"] == "gloo":
            continue
        cpu = r["cpu_s_per_peer"]
        lines.append(f"| {r['peers']} | {r['case']} | {r['op']} | "
                     + " | ".join(f"{r['phases_s'][p]:.3f}" for p in PHASES)
                     + f" | {r['phases_s']['codec']:.3f} | "
                     + " / ".join(f"{cpu.get(k, 0):.2f}" for k in ("main", "averager", "dht", "p2pd")) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    fig, axes = kit.pyplot().subplots(1, len(args.peers), figsize=(7 * len(args.peers), 4.5), squeeze=False)
    colors = dict(zip(PHASES, ("#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3", "#a6d854")))
    for ax, world in zip(axes[0], args.peers):
        labels, x = [], 0
        for index, (case, codec, _) in enumerate(cases(args)):
            for op in ("gloo", *modes_for(codec, args)):
                if op == "gloo" and index:
                    continue
                row = next(r for r in rows if r["peers"] == world and r["case"] == case and r["op"] == op)
                if op == "gloo":
                    ax.bar(x, row["round_s"], color="black")
                    labels.append("gloo")
                else:
                    bottom = 0.0
                    for p in PHASES:
                        ax.bar(x, row["phases_s"][p], bottom=bottom, color=colors[p],
                               label=p if (x, world) == (1, args.peers[0]) else None)
                        bottom += row["phases_s"][p]
                    ax.plot([x - 0.4, x + 0.4], [row["round_s"]] * 2, color="red", lw=2)
                    name = {"hivemind-defaults": "before", "tuned": "after"}.get(op, op)
                    labels.append(f"{case.replace(', ', chr(10))}\n{name}")
                x += 1
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{world} peers, {args.mb:g} MB fp32 on loopback")
        ax.set_ylabel("seconds per round (red: slowest peer, median)")
    axes[0][0].legend(fontsize=8)
    kit.save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = kit.parser(__doc__)
    ap.add_argument("--mb", type=float, default=100.0, help="tensor size in MB (fp32)")
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes to measure")
    ap.add_argument("--codecs", nargs="+", default=["none", "fp16", "blockwise8"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds per (codec, mode), after one warm-up")
    ap.add_argument("--matchmaking-time", type=float, default=2.0, help="federation.matchmaking_time")
    ap.add_argument("--oversized-target", type=int, default=8,
                    help="also run codec none with target_group_size N > peers (min 2; every peer publishes a "
                         "heartbeat, as daemons do); 0: skip")
    ap.add_argument("--part-kib", type=int, default=0, help="part size of the tuned mode (0: photon_p2p's)")
    ap.add_argument("--replot", metavar="JSON", help="only rewrite OUT.md and OUT.png from a results JSON")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per group size before giving up")
    ap.add_argument("--out", default="bench/results/allreduce_speed", help="writes OUT.json, OUT.png, OUT.md")
    for hidden in ("--rank", "--world", "--port"):
        ap.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from photon_p2p.federation.compression import CODECS

    if args.mb <= 0 or args.repeats < 1 or any(p < 2 for p in args.peers):
        ap.exit(2, "allreduce_speed: need --mb > 0, --repeats >= 1 and every --peers >= 2\n")
    if unknown := [c for c in args.codecs if c not in CODECS]:
        ap.exit(2, f"allreduce_speed: unknown codec(s) {unknown}; choose from {', '.join(CODECS)}\n")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return run_worker(args)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        raise SystemExit("allreduce_speed: this torch build has no gloo backend")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        args = argparse.Namespace(**{**saved["args"], "replot": None})
        write_markdown(saved["rows"], args, out.with_suffix(".md"), saved["meta"])
        return plot(saved["rows"], args, out.with_suffix(".png"))
    meta = {"loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()), "cpus": os.cpu_count(),
            "command": kit.command()}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.peers:
            started = time.monotonic()
            rows += summarize(world, run_world(world, args, Path(tmp)), args)
            for r in rows[-len(cases(args)) * (1 + len(args.modes)):]:
                print(json.dumps({k: r[k] for k in ("peers", "case", "op", "round_s", "ratio_vs_gloo")}), flush=True)
            print(f"# {world} peers took {time.monotonic() - started:.0f}s", flush=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1))
    write_markdown(rows, args, out.with_suffix(".md"), meta)
    if set(MODES) <= set(args.modes):
        plot(rows, args, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
