#!/usr/bin/env python
"""Start a local swarm of N photon-peer daemons on 127.0.0.1 (one corpus source per silo) and tear it down.

Usage:  python peers/local_swarm.py [--peers 3] [--config tiny] [--rounds 32] [--out runs/swarm] [--set KEY=VALUE ...]

Peer 0 starts the swarm; the others join through its multiaddr. Each silo trains on one source of the
embedded corpus (shakespeare, kjv, brown, ...): a non-IID split. Ctrl-C (or the end of the rounds) stops every
peer cleanly; each peer's log is RUN_DIR/peer-i/peer.log. At the end it writes RUN_DIR/metrics.png (every silo's
loss and perplexity curves) and prints a summary: rounds each silo averaged in, its last validation perplexity,
and whether all silos hold one model (the same fingerprint at the same round).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# From a checkout without `pip install -e .`, from any directory: the daemons and the report import this tree.
sys.path.insert(0, str(REPO))
SOURCES = ["shakespeare", "kjv", "brown"]


def start_peer(i: int, args: argparse.Namespace, initial: list[str]) -> tuple[subprocess.Popen, Path]:
    run_dir = Path(args.out) / f"peer-{i}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "peer.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "photon_p2p.cli", "run", "--config", args.config, "--run-dir", str(run_dir),
           "--run-id", args.run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-progress",
           "--set", f"name=silo-{i}", "--set", f"data.sources=[{SOURCES[i % len(SOURCES)]}]",
           "--set", f"federation.rounds={args.rounds}", "--set", f"train.threads={args.threads}"]
    for override in args.overrides:
        cmd += ["--set", override]
    if initial:
        cmd += ["--initial-peers", *initial]
    log = (run_dir / "peer.log").open("w")
    # Own session per peer: tearing down kills the whole group (DHT child and p2pd included).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return proc, run_dir


class PeerStartError(RuntimeError):
    """A daemon exited or did not publish its addresses in time."""


def wait_for_address(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> list[str]:
    """The multiaddrs a started daemon wrote to RUN_DIR/peer.json; PeerStartError if it died or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "peer.json").exists():
            return json.loads((run_dir / "peer.json").read_text())["maddrs"]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    log = run_dir / "peer.log"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise PeerStartError(f"the peer in {run_dir} did not start (see {log}):\n{tail}")


def stop_all(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` s, then SIGKILL the groups and reap."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:  # the group went away between poll() and the signal
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:  # reap helpers (hivemind's DHT process, p2pd) even if the peer itself exited
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def follow(run_dirs: list[Path], offsets: list[int]) -> None:
    """Echo each peer's round lines, prefixed by its silo, so the swarm's progress reads as one log."""
    for i, run_dir in enumerate(run_dirs):
        text = (run_dir / "peer.log").read_text(errors="replace")
        new, offsets[i] = text[offsets[i]:], len(text)
        for line in new.splitlines():
            if line.startswith(("round ", "photon-peer:")) or "error" in line.lower():
                print(f"[silo-{i}] {line}", flush=True)


def report(run_dirs: list[Path], out: Path) -> bool:
    """The swarm at the end: one PNG of every silo's curves and a short summary; True if all hold one model."""
    from photon_p2p.metrics import MetricsError, format_swarm_summary, one_model, plot_run, silo_summary

    silos = [silo_summary(d) for d in run_dirs]
    print("local_swarm: summary\n" + format_swarm_summary(silos), flush=True)
    try:
        png = plot_run([d for d in run_dirs if (d / "metrics.jsonl").is_file()], out / "metrics.png")
        print(f"local_swarm: every silo's curves are in {png}")
    except (MetricsError, OSError) as e:  # a swarm stopped before its first logged step has nothing to plot
        print(f"local_swarm: no plot ({e})")
    return one_model(silos)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--run-id", default="local-swarm")
    ap.add_argument("--out", default="runs/swarm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    procs: list[subprocess.Popen] = []
    run_dirs: list[Path] = []
    stopping = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stopping.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    try:
        proc, run_dir = start_peer(0, args, [])
        procs.append(proc)
        run_dirs.append(run_dir)
        try:
            maddrs = wait_for_address(proc, run_dir, timeout=120)
        except PeerStartError as e:
            raise SystemExit(f"local_swarm: {e}") from None
        print(f"local_swarm: bootstrap address {maddrs[0]}", flush=True)
        for i in range(1, args.peers):
            proc, run_dir = start_peer(i, args, maddrs[:1])
            procs.append(proc)
            run_dirs.append(run_dir)
        offsets = [0] * len(run_dirs)
        while not stopping["now"] and any(p.poll() is None for p in procs):
            follow(run_dirs, offsets)
            time.sleep(1.0)
        follow(run_dirs, offsets)
    finally:
        stop_all(procs)
    codes = [p.returncode for p in procs]
    failed = [i for i, c in enumerate(codes) if c not in (0, -signal.SIGTERM)] if not stopping["now"] else []
    for i in failed:
        print(f"local_swarm: silo-{i} exited with {codes[i]} (see {run_dirs[i]}/peer.log)", file=sys.stderr)
    if run_dirs:
        report(run_dirs, Path(args.out))
        print(f"local_swarm: done; sample the swarm's model: photon-peer sample {run_dirs[0]} --prompt 'And the'")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
