#!/usr/bin/env python
"""Averaging time of one pseudo-gradient: photon_p2p's averager vs torch.distributed gloo all_reduce, same run.

Usage: python bench/allreduce_speed.py [--mb 100] [--peers 2 4] [--codecs none fp16 blockwise8] [--repeats 3]
Every peer is a fresh interpreter on 127.0.0.1; prints one JSON line per (peers, codec) with both times and
the ratio ours / gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOO = r"""
import os, sys, time, torch, torch.distributed as dist
rank, world, port, n, reps = map(int, sys.argv[1:6])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
x = torch.randn(n)
dist.all_reduce(x)  # warm-up: connections
times = []
for _ in range(reps):
    dist.barrier(); t0 = time.perf_counter(); dist.all_reduce(x); times.append(time.perf_counter() - t0)
if rank == 0: print(min(times))
dist.destroy_process_group()
"""

OURS = r"""
import json, sys, time, torch
from photon_p2p.config import FederationConfig, NetworkConfig
from photon_p2p.federation.network import start_dht, visible_maddrs
from photon_p2p.federation.averaging import PseudoGradientAverager
rank, world, n, reps, codec, addr_file = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
initial = [] if rank == 0 else [open(addr_file).read().strip()]
net = NetworkConfig(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap_timeout=30)
fed = FederationConfig(run_id="bench", target_group_size=world, min_group_size=world, matchmaking_time=2.0,
                       allreduce_timeout=60.0, round_deadline=120.0, compression=codec)
dht = start_dht(net, initial_peers=initial)
if rank == 0:
    open(addr_file + ".tmp", "w").write(visible_maddrs(dht)[0]); import os; os.replace(addr_file + ".tmp", addr_file)
x = [torch.randn(n)]
avg = PseudoGradientAverager(dht, x, fed, net, lambda: ({}, []))
times = []
for r in range(reps + 1):
    res = avg.average([t.clone() for t in x], r, weight=1.0)
    if r and not res.solo:  # round 0 is the warm-up
        # matchmaking waits matchmaking_time by design; the all-reduce itself is the rest
        times.append(res.seconds)
print(json.dumps({"times": times, "sent": res.bytes_sent}))
avg.shutdown(); dht.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(world: int, n: int, reps: int) -> float:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", GLOO, str(r), str(world), str(port), str(n), str(reps)],
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return float(outs[0].strip())


def run_ours(world: int, n: int, reps: int, codec: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        addr = str(Path(tmp) / "addr")
        procs = []
        for r in range(world):
            procs.append(subprocess.Popen([sys.executable, "-c", OURS, str(r), str(world), str(n), str(reps), codec,
                                           addr], stdout=subprocess.PIPE, text=True, start_new_session=True))
            if r == 0:
                while not os.path.exists(addr):
                    time.sleep(0.1)
        outs = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
    times = [t for o in outs for t in o["times"]]
    # The whole round as the daemon sees it: matchmaking (a full group starts at once) plus the all-reduce.
    return min(times), outs[0]["sent"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--codecs", nargs="+", default=["none", "fp16", "blockwise8"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = int(args.mb * 1e6 / 4)
    for world in args.peers:
        gloo = run_gloo(world, n, args.repeats)
        for codec in args.codecs:
            ours, sent = run_ours(world, n, args.repeats, codec)
            print(json.dumps({"mb": args.mb, "peers": world, "codec": codec, "gloo_s": round(gloo, 3),
                              "ours_round_s": round(ours, 3), "ratio": round(ours / gloo, 2),
                              "bytes_sent_per_peer": sent}), flush=True)


if __name__ == "__main__":
    main()
