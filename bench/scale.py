#!/usr/bin/env python
"""A swarm of N real peers on 127.0.0.1, scored for one model: participation, one-model rounds, overhead.

Usage:
  flock /tmp/photon-bench.lock python bench/scale.py --peers 16 --rounds 20 --out runs/scale16
  flock /tmp/photon-bench.lock python bench/scale.py --peers 8 --rounds 30 --churn --out runs/scale8c
  flock /tmp/photon-bench.lock python bench/scale.py --trainer real --peers 4 --rounds 14 --churn \\
      --churn-every 8 --set federation.local_steps=16 --out runs/churn        # the real tiny trainer
  python bench/scale.py --summarize runs/scale16                            # re-score a finished run

Every peer is the real daemon with the real federation (hivemind DHT, p2pd, averager process, matchmaking,
all-reduce). With ``--trainer sim`` (default) its local phase is simulated (photon_p2p/train/simulated.py):
an inner step sleeps ``--step-s`` (× 2 for peer 1, the half-speed silo; ± ``--jitter`` per step) and moves
``--numel`` fp32 weights, so 16 or 32 peers fit in 2 cores. ``--trainer real`` runs `photon-peer run` with the
tiny preset (one embedded corpus source per silo), as peers/local_swarm.py does.

``--churn``: every ``--churn-every`` rounds (first at half that), kill -9 one peer's process group, SIGSTOP
another's for 30 s, and start a new peer; ``--stop-leader`` stops the lowest peer id but peer 0's (the round's
designated leader, unless peer 0's id is lower still). It writes DIR/summary.json (see ``summarize``) and prints it;
its ``cost`` is the protocol's cost per peer and round (CPU, memory, DHT traffic, matchmaking), for fitting how each
grows with the number of peers (see ``cost``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "peers"))
import local_swarm  # noqa: E402  (peers/local_swarm.py: start/stop helpers of the README's swarm)

STOP_S = 30.0  # how long a churn event SIGSTOPs a peer
# The simulated peers' federation.round_deadline (run_sim_peer; --set overrides it): 60 s, 3 s a peer past 20. The
# swarm's first peer waits out round 0 for its joiners, which boot on this machine's 2 cores one after another (16 in
# 30-40 s, 32 in 75-90 s; N machines would boot in parallel): at 60 s, 32 peers' joiners came just as the first
# peer's round 0 ended, and round 0 averaged without it.
def boot_deadline(peers: int) -> float:
    return max(60.0, 3.0 * peers)
# PSS reads /proc/PID/smaps_rollup: ~4 ms per process holding torch (RSS: 0.01 ms), 5 processes per peer; read
# every second at 32 peers it would cost the swarm it measures ~0.6 CPU s/s. Peers' memory plateaus after boot.
PSS_EVERY_S = 10.0


# ---- one simulated peer (a child process) ----------------------------------------------------------------------
def run_sim_peer(args: argparse.Namespace) -> int:
    import torch

    from photon_p2p.cli import _graceful_stop, _log_to_stderr
    from photon_p2p.config import load_config
    from photon_p2p.daemon import PeerDaemon
    from photon_p2p.train.simulated import SimTrainer

    # boot_deadline: with the tiny preset's 30 s the first peer's round 0 could end just as its joiners appear
    # (ARCHITECTURE.md, G4).
    overrides = [f"name={args.name}", f"run_dir={args.dir}", f"federation.run_id={args.run_id}",
                 f"federation.rounds={args.rounds}", "network.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
                 f"federation.round_deadline={boot_deadline(args.peers)}",
                 f"federation.local_steps={args.local_steps}", "train.eval_every=0",
                 *(["network.initial_peers=[" + ",".join(args.initial) + "]"] if args.initial else []),
                 *args.overrides]
    cfg = load_config(["tiny"], overrides)

    # One intra-op thread: the simulated step's randn on 2 threads left libgomp's worker spinning at its barrier
    # after each step, 27 ms of CPU per second per idle peer (gdb: gomp_barrier_wait_end), 0.9 of the 2 cores at
    # 32 peers, charged to the protocol. A real silo's threads do real work on cores of its own.
    torch.set_num_threads(1)

    def trainer(cfg, run_dir, progress):
        return SimTrainer(cfg.name, numel=args.numel, step_s=args.step_s, slow=args.slow, jitter=args.jitter)

    _log_to_stderr(args.log_level)  # each round's roster, leader and no-shows in peer.log
    stop = _graceful_stop(cfg.federation.stop_timeout)
    PeerDaemon(cfg, stop=stop, progress=False, make_trainer=trainer).run()
    return 0


# ---- the swarm -------------------------------------------------------------------------------------------------
class Swarm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.procs: dict[int, subprocess.Popen] = {}
        self.dirs: dict[int, Path] = {}
        self.events: list[dict[str, Any]] = []
        self.samples: dict[int, dict[str, float]] = defaultdict(lambda: {"cpu_s": 0.0, "rss_mb": 0.0, "pss_mb": 0.0})
        self.t0 = time.monotonic()
        self.pss_at = -PSS_EVERY_S  # when sample() last read PSS (time.monotonic() - t0)

    def start(self, i: int, initial: list[str]) -> None:
        a = self.args
        if a.trainer == "real":
            ns = argparse.Namespace(out=str(self.out), config="tiny", run_id=a.run_id, rounds=a.rounds, threads=1,
                                    overrides=a.overrides)
            self.procs[i], self.dirs[i] = local_swarm.start_peer(i, ns, initial)
            return
        run_dir = self.out / f"peer-{i}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "peer.json").unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", "--name", f"silo-{i}", "--dir",
               str(run_dir), "--run-id", a.run_id, "--rounds", str(a.rounds), "--local-steps", str(a.local_steps),
               "--numel", str(a.numel), "--step-s", str(a.step_s), "--jitter", str(a.jitter), "--peers", str(a.peers),
               "--slow", str(2.0 if i == 1 else 1.0), "--log-level", a.log_level, *[x for o in a.overrides for x in ("--set", o)]]
        if initial:
            cmd += ["--initial", *initial]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        log = (run_dir / "peer.log").open("w")
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.dirs[i] = run_dir

    def peer_id(self, i: int) -> str:
        return str(json.loads((self.dirs[i] / "peer.json").read_text()).get("peer_id", ""))

    def address(self, i: int) -> list[str]:
        return local_swarm.wait_for_address(self.procs[i], self.dirs[i], timeout=180.0)[:1]

    def live(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def newest_round(self) -> int:
        best = -1
        for d in self.dirs.values():
            for rec in read_records(d, "round")[-1:]:
                best = max(best, int(rec.get("averaged_round", rec["round"] - 1)))
        return best

    def event(self, kind: str, peer: int) -> None:
        rnd = self.newest_round()
        self.events.append({"kind": kind, "peer": peer, "round": rnd, "t": round(time.monotonic() - self.t0, 1)})
        print(f"[{time.monotonic() - self.t0:6.1f}s] round {rnd}: {kind} silo-{peer}", flush=True)

    def sample(self) -> None:
        """CPU seconds and peak RSS and PSS of each peer's process tree (daemon, DHT process, averager, p2pd).

        RSS counts the pages that the forked DHT and averager processes share with the daemon (torch, the
        interpreter) once per process: ~1.15 GB per simulated peer. PSS splits each shared page among the
        processes that map it, so the sum over peers is the machine's memory (read every PSS_EVERY_S)."""
        import psutil

        now = time.monotonic() - self.t0
        with_pss = now - self.pss_at >= PSS_EVERY_S
        if with_pss:
            self.pss_at = now
        for i, p in self.procs.items():
            if p.poll() is not None:
                continue
            try:
                root = psutil.Process(p.pid)
                tree = [root, *root.children(recursive=True)]
                cpu = sum(sum(q.cpu_times()[:2]) for q in tree)
                rss = sum(q.memory_info().rss for q in tree) / 2**20
                pss = sum(q.memory_full_info().pss for q in tree) / 2**20 if with_pss else 0.0
            except psutil.Error:
                continue
            s = self.samples[i]
            s["cpu_s"], s["rss_mb"], s["pss_mb"] = max(s["cpu_s"], cpu), max(s["rss_mb"], rss), max(s["pss_mb"], pss)

    def run(self) -> dict[str, Any]:
        a = self.args
        self.start(0, [])
        initial = self.address(0)
        for i in range(1, a.peers):
            self.start(i, initial)
        next_churn = max(1, a.churn_every // 2) if a.churn else None
        stopped: tuple[int, float] | None = None
        rng = random.Random(a.seed)
        deadline = self.t0 + a.cap
        try:
            while self.live() and time.monotonic() < deadline:
                self.sample()
                if stopped and time.monotonic() >= stopped[1]:
                    os.killpg(self.procs[stopped[0]].pid, signal.SIGCONT)
                    self.event("continued", stopped[0])
                    stopped = None
                if next_churn is not None and self.newest_round() >= next_churn and next_churn < a.rounds - 2:
                    victims = [i for i in self.live() if i != 0]  # peer 0 is every joiner's bootstrap address
                    rng.shuffle(victims)
                    if a.stop_leader and len(victims) >= 2:  # the worst case: stop the lowest peer id (the leader)
                        lowest = min(victims, key=self.peer_id)
                        victims.sort(key=lambda i: i == lowest)  # last: the one stopped
                    if len(victims) >= 2:
                        os.killpg(self.procs[victims[0]].pid, signal.SIGKILL)
                        self.event("killed", victims[0])
                        os.killpg(self.procs[victims[-1]].pid, signal.SIGSTOP)
                        self.event("stopped", victims[-1])
                        stopped = (victims[-1], time.monotonic() + STOP_S)
                        new = max(self.procs) + 1
                        self.start(new, initial)
                        self.event("joined", new)
                    next_churn += a.churn_every
                time.sleep(1.0)
        finally:
            if stopped:
                os.killpg(self.procs[stopped[0]].pid, signal.SIGCONT)
            local_swarm.stop_all(list(self.procs.values()))
        killed = {e["peer"] for e in self.events if e["kind"] == "killed"}
        summary = summarize(self.out, alive_at_end=[i for i in self.procs if i not in killed])
        summary.update(events=self.events, wall_s=round(time.monotonic() - self.t0, 1),
                       config={k: v for k, v in vars(a).items() if k not in ("peer", "initial", "name", "dir")})
        for i, s in self.samples.items():
            figures = summary["per_peer"].setdefault(f"peer-{i}", {})
            figures.update(cpu_s=round(s["cpu_s"], 1), rss_mb=round(s["rss_mb"], 1),
                           pss_mb=round(s["pss_mb"], 1) if s["pss_mb"] else None)
            figures["cpu_s_per_round"] = cpu_per_round(figures)
        for figures in summary["per_peer"].values():  # a peer that was never sampled (it died at once)
            figures.setdefault("pss_mb", None)
            figures.setdefault("cpu_s_per_round", None)
        summary["cost"] = cost(summary["per_peer"])
        return summary


# ---- scoring ---------------------------------------------------------------------------------------------------
def read_records(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


def summarize(out: Path, alive_at_end: list[int] | None = None) -> dict[str, Any]:
    """Scores from every peer's metrics.jsonl. For each averaged round r, the live peers of r are those that
    recorded it (a killed peer records nothing; a stopped one records it late, as missed; a joiner whose first
    round had closed before it came records it as joined_late, and is not live in it):
    - participation: live peer-rounds spent in a group holding every live peer of that round / all of them (a
      round with one live peer, alone in the swarm, counts as full: nobody else was there to average with)
    - one_model_rounds: rounds after which every peer that averaged it holds one fingerprint (G1)
    - distinct_models_at_end: fingerprints among the peers alive at the end (their last round or sync record)
    - round_overhead_s: per round, the last landing minus the last end of a local phase (median, max)
    - per peer: rounds recorded, outcomes, DHT reads per round (what the daemon issued), DHT requests and kB
      (1000 bytes) per round its DHT node served other nodes, median matchmaking time of its rounds (None: no
      record carries it, e.g. an older run's)
    - cost: medians over the peers (see ``cost``; the sampled CPU and memory are added by Swarm.run)."""
    dirs = {int(d.name.split("-")[1]): d for d in sorted(Path(out).glob("peer-*")) if d.is_dir()}
    by_round: dict[int, dict[int, dict]] = defaultdict(dict)
    started: dict[int, dict[int, float]] = defaultdict(dict)
    last_fp: dict[int, str] = {}
    per_peer: dict[str, dict[str, Any]] = {}
    for i, d in dirs.items():
        recs = read_records(d)
        rounds = [r for r in recs if r["kind"] == "round"]
        for r in rounds:
            if r.get("outcome") != "joined_late":  # it came after its first round had closed: not live in it
                by_round[int(r.get("averaged_round", r["round"] - 1))][i] = r
        for r in recs:
            if r["kind"] == "averaging":
                started[int(r["round"])][i] = float(r["time"])
            if r["kind"] in ("round", "sync") and r.get("fingerprint"):
                last_fp[i] = r["fingerprint"]
        outcomes: dict[str, int] = defaultdict(int)
        for r in rounds:
            outcomes[r.get("outcome") or ("missed" if r["solo"] else "averaged")] += 1
        reads = [r["dht_reads"] for r in rounds if "dht_reads" in r]
        served = [r["dht_served"] for r in rounds if "dht_served" in r]
        served_kb = [r["dht_served_bytes"] / 1e3 for r in rounds if "dht_served_bytes" in r]
        kinds = [r["dht_served_kinds"] for r in rounds if isinstance(r.get("dht_served_kinds"), dict)]
        by_kind = {k: round(statistics.mean(x.get(k, [0, 0])[1] for x in kinds) / 1e3, 2)
                   for k in sorted({k for x in kinds for k in x})}  # kB per round served, by request kind
        matchmaking = [float(r["phases"]["matchmaking"]) for r in rounds
                       if isinstance(r.get("phases"), dict) and "matchmaking" in r["phases"]]
        # a grouped round's time in Swarm.average outside the averager: its roster read and checks (and, before
        # 2952fe9, the connection probe after it)
        outside = [float(r["wait_s"]) - float(r["averaging_s"]) for r in rounds
                   if not r["solo"] and "wait_s" in r and "averaging_s" in r]
        per_peer[d.name] = {"rounds": len(rounds), "outcomes": dict(outcomes),
                            "last_round": rounds[-1]["round"] if rounds else None,
                            "dht_reads_per_round": round(statistics.mean(reads), 2) if reads else None,
                            "dht_served_per_round": round(statistics.mean(served), 2) if served else None,
                            "dht_served_kb_per_round": round(statistics.mean(served_kb), 2) if served_kb else None,
                            "dht_served_kb_per_round_by_kind": by_kind or None,
                            "matchmaking_s_median": round(statistics.median(matchmaking), 3) if matchmaking else None,
                            "outside_averager_s_median": round(statistics.median(outside), 3) if outside else None}
    full = total = one = 0
    overhead, split_rounds = [], []
    for rnd, recs in sorted(by_round.items()):
        n = len(recs)
        total += n
        # a peer alone in the swarm (the first, before anyone joined) is a group holding every live peer of its round
        # (a group larger than the round's records held a peer that was killed before it could record the round)
        full += sum(1 for r in recs.values()
                    if (not r["solo"] and int(r["group_size"]) >= n) or (n == 1 and r.get("outcome") == "solo"))
        # G1 is about the peers that averaged the round (alone in the swarm too): one that missed it records the
        # state it caught up to (a later round's), or the round's old weights, and is scored by the rounds it
        # averages next.
        grouped = [r for r in recs.values() if not r["solo"] or r.get("outcome") == "solo"] or list(recs.values())
        fps = {r["fingerprint"] for r in grouped}
        if len(fps) == 1:
            one += 1
        else:
            split_rounds.append(rnd)
        if started.get(rnd) and len(started[rnd]) >= 2:
            overhead.append(max(float(r["time"]) for r in recs.values()) - max(started[rnd].values()))
    alive = alive_at_end if alive_at_end is not None else list(dirs)
    end = {last_fp[i] for i in alive if i in last_fp}
    return {"peers": len(dirs), "rounds_total": len(by_round), "peer_rounds": total,
            "participation": round(full / total, 4) if total else 0.0, "one_model_rounds": one,
            "split_rounds": split_rounds, "distinct_models_at_end": len(end),
            "last_rounds": sorted({per_peer[f"peer-{i}"]["last_round"] for i in alive if f"peer-{i}" in per_peer},
                                  key=lambda x: -1 if x is None else x),
            "round_overhead_s": {"median": round(statistics.median(overhead), 2) if overhead else None,
                                 "max": round(max(overhead), 2) if overhead else None},
            "cost": cost(per_peer), "per_peer": per_peer}


COST_FIGURES = ("cpu_s_per_round", "pss_mb", "rss_mb", "dht_reads_per_round", "dht_served_per_round",
                "dht_served_kb_per_round", "matchmaking_s_median", "outside_averager_s_median")


def cpu_per_round(figures: dict[str, Any]) -> float | None:
    """A peer's CPU seconds (its whole process tree, sampled) per round it recorded; None where either is unknown."""
    cpu, rounds = figures.get("cpu_s"), figures.get("rounds")
    return round(cpu / rounds, 3) if cpu is not None and rounds else None


def cost(per_peer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The protocol's cost per peer, for fitting how it grows with N: the median over peers of each COST_FIGURES
    entry (None where no peer has it: an older run's records, or the CPU and memory before Swarm.run adds them),
    and ``busiest_dht_node``, the peer whose DHT node served the most kB per round (the DHT's hot spot)."""
    out: dict[str, Any] = {}
    for key in COST_FIGURES:
        values = [f[key] for f in per_peer.values() if f.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    served = {p: f for p, f in per_peer.items() if f.get("dht_served_kb_per_round") is not None}
    busiest = max(served, key=lambda p: served[p]["dht_served_kb_per_round"], default=None)
    out["busiest_dht_node"] = None if busiest is None else {
        "peer": busiest, "dht_served_per_round": served[busiest].get("dht_served_per_round"),
        "dht_served_kb_per_round": served[busiest]["dht_served_kb_per_round"],
        "by_kind": served[busiest].get("dht_served_kb_per_round_by_kind")}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--trainer", choices=("sim", "real"), default="sim")
    ap.add_argument("--churn", action="store_true")
    ap.add_argument("--churn-every", type=int, default=10)
    ap.add_argument("--stop-leader", action="store_true",
                    help="churn stops the lowest peer id but peer 0's (the designated leader when not peer 0)")
    ap.add_argument("--local-steps", type=int, default=32)
    ap.add_argument("--step-s", type=float, default=0.25, help="simulated seconds per inner step")
    ap.add_argument("--jitter", type=float, default=0.2, help="± share of --step-s drawn per step")
    ap.add_argument("--numel", type=int, default=1 << 20, help="simulated fp32 weights per peer")
    ap.add_argument("--run-id", default="scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cap", type=float, default=1800.0, help="wall-clock cap (s)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--log-level", choices=("warning", "info", "debug"), default="info",
                    help="simulated peers' log level (peer.log)")
    ap.add_argument("--summarize", metavar="DIR", help="only re-score a finished run's DIR")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # internal: one simulated peer
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--slow", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--initial", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.peer and not args.summarize and args.peers < 2:
        ap.error("--peers must be at least 2")
    return args


def _commit() -> str:
    """The code's commit (a trailing + when the working tree differs from it), for the raw result file."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+" if dirty else "")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer:
        return run_sim_peer(args)
    if args.summarize:
        # a run's own summary names the peers it killed: they are not among those alive at the end
        run = Path(args.summarize)
        before = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        killed = {e["peer"] for e in before.get("events", []) if e.get("kind") == "killed"}
        alive = [int(d.name.split("-")[1]) for d in run.glob("peer-*") if d.is_dir()]
        summary = summarize(run, alive_at_end=[i for i in alive if i not in killed])
        for peer, figures in before.get("per_peer", {}).items():  # keep what only the run sampled (CPU, RSS, PSS)
            summary["per_peer"][peer] = {**figures, **summary["per_peer"].get(peer, {})}
        for figures in summary["per_peer"].values():  # an older run sampled no PSS
            figures.setdefault("pss_mb", None)
            figures["cpu_s_per_round"] = cpu_per_round(figures)
        summary["cost"] = cost(summary["per_peer"])
        print(json.dumps({**before, **summary}, indent=1))
        return 0
    out = Path(args.out)
    if out.exists() and any(out.glob("peer-*")):
        print(f"scale.py: {out} holds an earlier run; give a new --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (timeout, a CI runner) unwinds like Ctrl-C, so every peer's process group is reaped
    signal.signal(signal.SIGTERM, _interrupt)
    commit = _commit()  # the code the peers run: read before they start
    summary = Swarm(args).run()
    summary.update(command=" ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
                   commit=commit)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    short = {k: v for k, v in summary.items() if k not in ("per_peer", "config")}
    print(json.dumps(short, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
