"""How long `photon-peer run` daemons take to exit after SIGTERM, mid-training, in a real loopback swarm.

Usage:
  flock /tmp/photon-bench.lock python bench/stop_latency.py --peers 4 --trials 3            # Ctrl-C style
  flock /tmp/photon-bench.lock python bench/stop_latency.py --peers 4 --trials 3 --every-process

Each trial starts N tiny daemons (groups of 2: rows then columns), lets them train for a random 20–60 s, then
sends SIGTERM to each daemon's process group (what Ctrl-C or `kill -TERM -PGID` does) or, with
--every-process, to every process of each daemon's session (what systemd's control-group kill does: the DHT
process, the averager process and p2pd are signalled too). It reports each daemon's exit code and seconds to
exit; a daemon still running after --limit seconds is reported as hung (its stack is dumped with py-spy when
installed) and killed. Peers are started with the test suite's helper (tests/swarm.py).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import toolkit as kit
from photon_p2p.data.embedded import ensure_default_dataset

sys.path.insert(0, str(kit.REPO / "tests"))
from swarm import Swarm  # noqa: E402  (tests/swarm.py)


def session_pids(sid: int) -> list[int]:
    """Every live process in session `sid`, read from /proc (no `ps`: minimal images lack procps)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:  # exited while we looked
                pass
    return pids


def last_exception(log: str) -> str:
    """The exception line that ends the first traceback in a log (what an operator would see)."""
    lines = log.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Traceback"))
    for ln in lines[start + 1:]:
        if ln and not ln.startswith(" "):
            return ln[:200]
    return "?"


def trial(root: Path, data: Path, peers: int, every_process: bool, limit: float, rng: random.Random) -> dict:
    sw = Swarm(root, data)
    common = {"federation.rounds": 0, "federation.min_group_size": 2, "federation.target_group_size": 2}
    try:
        first = sw.start("p0", extra=common)
        addr = first.address()
        procs = [first] + [sw.start(f"p{i}", initial=[addr], extra=common) for i in range(1, peers)]
        time.sleep(rng.uniform(20, 60))
        rounds = [len(p.rounds()) for p in procs]
        for p in procs:
            if every_process:
                for pid in session_pids(p.proc.pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
            else:
                sw.kill(p, signal.SIGTERM)
        t0, exits = time.monotonic(), []
        for p in procs:
            try:
                rc = p.proc.wait(max(0.1, limit - (time.monotonic() - t0)))
                exits.append({"peer": p.name, "rc": rc, "exit_s": round(time.monotonic() - t0, 1)})
            except subprocess.TimeoutExpired:
                stack = ""
                if shutil.which("py-spy"):
                    stack = subprocess.run(["py-spy", "dump", "--pid", str(p.proc.pid)], capture_output=True,
                                           text=True).stdout[-3000:]
                exits.append({"peer": p.name, "rc": None, "exit_s": None, "hung": True, "stack": stack})
        return {"rounds_before_stop": rounds, "exits": exits,
                "tracebacks": {p.name: last_exception(p.log()) for p in procs if "Traceback" in p.log()},
                "traceback_text": {p.name: p.log()[max(0, p.log().index("Traceback") - 300):][:2500]
                                   for p in procs if "Traceback" in p.log()}}
    finally:
        sw.close()


def main() -> int:
    ap = kit.parser(__doc__)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--every-process", action="store_true")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds after which a daemon counts as hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="stop-latency-"))
    data = ensure_default_dataset(base / "data", ["kjv"], progress=False)
    results = []
    for t in range(args.trials):
        r = trial(base / f"trial{t}", data, args.peers, args.every_process, args.limit, rng)
        results.append(r)
        times = [e["exit_s"] if e["exit_s"] is not None else "HUNG" for e in r["exits"]]
        print(f"trial {t}: rounds {r['rounds_before_stop']}, exit s {times}, rc {[e['rc'] for e in r['exits']]}"
              f"{', tracebacks in ' + str(r['tracebacks']) if r['tracebacks'] else ''}", flush=True)
    if args.out:
        kit.write_json(args.out, {"args": vars(args), "trials": results})
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
