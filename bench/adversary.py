#!/usr/bin/env python
"""Red team: honest silos (the real daemon, tiny preset, 127.0.0.1) and one hostile peer that runs a named attack
with the project's own code. Did an honest silo crash, ever hold a model the attacker introduced, or end worse?

Usage:
  flock /tmp/photon-bench.lock python bench/adversary.py --attack forged-state        # 3 honest + 1 hostile
  flock /tmp/photon-bench.lock python bench/adversary.py --attack none --tag 2        # attacker-free baseline
  python bench/adversary.py --table                                                   # every stored result
  (internal) python bench/adversary.py --hostile NAME -- <photon-peer args>           # the hostile silo

Attacks (issue 24; the hostile silo otherwise trains and averages like any other):
  forged-state      serves a forged state (zeros) under its round + 50, advertises it with its own heartbeat and
                    the highest download priority
  crash-sync        serves malformed states (a string round, a tensor of another shape, a wrong parameter
                    count, a negative step) under round + 50
  fake-fingerprint  declares another model's fingerprint in every group and sends 2θ as its Δ (in a healing
                    round, which averages θ − Δ, that is −θ)
  negative-weight   declares -4x its token weight on the gloo path (the hivemind path clamps a weight at 1e-6
                    before it is sent) and sends zeros
  gloo-weights      on the gloo path, sums a weight vector with -its weight in every other member's slot, as the
                    old protocol did (the others now gather one weight each: the collective no longer matches)
  dht-wipe          every 2 s stores plain values with far-future expirations over the averager's keys
                    (all_averagers, the next rounds' group keys), for every peer it has seen
  ghost-record      stamps its heartbeat a million seconds in the future, at round + 1000
  speed-abuse       declares 1e30 inner steps per second in its clock record
Each run writes OUT/summary.json and bench/results/adversary/<attack>[-TAG].json: honest_val_ppl (the honest
silos' mean final validation perplexity), baseline_val_ppl (the mean of the stored attacker-free runs, with
their spread), adopted_attacker_fingerprint (whether an honest silo ever recorded a fingerprint the hostile
silo introduced), honest_crashes (an honest silo that exited non-zero or logged a traceback), participation
(the honest silos' grouped share of rounds) and end_models (distinct models among the honest silos at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import one_model
import toolkit as kit
from toolkit import REPO, BenchError, fmt

RESULTS = REPO / "bench" / "results" / "adversary"
NOTE_ENV = "PHOTON_ADVERSARY_NOTE"  # the hostile silo appends the fingerprints it introduces to this file


# ---- the attacks (each runs inside the hostile silo's process, before photon_p2p.cli) ---------------------------
def _note(fp: str) -> None:
    with open(os.environ[NOTE_ENV], "a") as f:
        f.write(fp + "\n")


def _lure(ahead: int, fingerprint: Callable[[], str] | None = None) -> None:
    """Advertise a round ``ahead`` of our own in the heartbeat (and a model), and the top download priority."""
    from photon_p2p import daemon
    from photon_p2p.federation import averaging

    beat, share = daemon.PeerDaemon.heartbeat, averaging.PseudoGradientAverager.share_state

    def heartbeat(self):  # noqa: ANN001, ANN202
        rec = beat(self)
        rec["round"] = int(rec["round"]) + ahead
        if fingerprint is not None:
            rec["fingerprint"] = fingerprint()
        return rec

    daemon.PeerDaemon.heartbeat = heartbeat
    averaging.PseudoGradientAverager.share_state = lambda self, priority: share(self, priority + 1e6)


def forged_state() -> None:
    import torch

    from photon_p2p import daemon
    from photon_p2p.federation.identity import fingerprint

    serve, forged = daemon.PeerDaemon.shared_state, {}

    def shared_state(self):  # noqa: ANN001, ANN202
        meta, tensors = serve(self)
        fake = [torch.zeros_like(t) for t in tensors]
        if "fp" not in forged:
            forged["fp"] = fingerprint(fake)
            _note(forged["fp"])
        return {**meta, "round": int(meta["round"]) + 50, "fingerprint": forged["fp"]}, fake

    daemon.PeerDaemon.shared_state = shared_state
    _lure(50, lambda: forged.get("fp", ""))


def crash_sync() -> None:
    import torch

    from photon_p2p import daemon

    serve, calls = daemon.PeerDaemon.shared_state, [0]

    def shared_state(self):  # noqa: ANN001, ANN202
        meta, tensors = serve(self)
        calls[0] += 1
        meta = {**meta, "round": int(meta["round"]) + 50}
        kind = calls[0] % 4
        if kind == 0:
            return {**meta, "round": "NaN"}, tensors
        if kind == 1:
            return meta, [torch.zeros(3, 3), *tensors[1:]]
        if kind == 2:
            return {**meta, "n_params": int(meta["n_params"]) + 7}, tensors
        return {**meta, "inner_step": -5}, tensors

    daemon.PeerDaemon.shared_state = shared_state
    _lure(50)


def fake_fingerprint() -> None:
    from photon_p2p.federation import averaging

    average, fake = averaging.PseudoGradientAverager.average, "f" * 64
    _note(fake)

    def attacked(self, deltas, *args, **kwargs):  # noqa: ANN001, ANN202
        globals_ = getattr(self._averager, "_global_tensors", None)
        if globals_ is not None:
            for d, g in zip(deltas, globals_):
                d.copy_(2 * g)
        kwargs["fingerprint"] = fake
        return average(self, deltas, *args, **kwargs)

    averaging.PseudoGradientAverager.average = attacked


def negative_weight() -> None:
    from photon_p2p.federation import averaging, bulk

    average, gather = averaging.PseudoGradientAverager.average, bulk.gather_weights

    def attacked(self, deltas, *args, **kwargs):  # noqa: ANN001, ANN202
        for d in deltas:
            d.zero_()
        return average(self, deltas, *args, **kwargs)

    averaging.PseudoGradientAverager.average = attacked
    bulk.gather_weights = lambda pg, weight, size, timeout: gather(pg, -4.0 * abs(weight), size, timeout)


def gloo_weights() -> None:
    import torch

    from photon_p2p.federation import bulk

    def summed(pg, weight, size, timeout):  # noqa: ANN001, ANN202
        vector = torch.full((size,), -float(weight), dtype=torch.float64)
        vector[pg.rank()] = float(weight)
        pg.allreduce([vector]).wait(timeout)
        return vector

    bulk.gather_weights = summed


def dht_wipe() -> None:
    from hivemind.utils import get_dht_time

    from photon_p2p.federation import averaging, swarm

    start = swarm.HivemindSwarm.start

    def started(self, snapshot):  # noqa: ANN001, ANN202
        start(self, snapshot)
        prefix = f"{self.cfg.federation.run_id}_pseudograd"

        def wipe() -> None:
            seen: set = set()
            while True:
                try:
                    found = self.dht.get(f"{prefix}.all_averagers", latest=True)
                    seen |= set((found.value if found is not None else {}) or {})
                    far = get_dht_time() + 1e6
                    for subkey in seen:
                        self.dht.store(f"{prefix}.all_averagers", "wiped", far, subkey=subkey)
                    now_round = max((int(p.get("round", 0)) for p in self.peers()), default=0)
                    for r in range(now_round, now_round + 3):
                        key = f"{prefix}.0b{averaging.group_bits(r)}"
                        for subkey in seen:
                            self.dht.store(key, far, far, subkey=subkey)
                except Exception as e:  # the attack goes on whatever one store does
                    print(f"adversary: dht-wipe store failed: {e!r}", flush=True)
                time.sleep(2.0)

        threading.Thread(target=wipe, daemon=True, name="dht-wipe").start()

    swarm.HivemindSwarm.start = started


def ghost_record() -> None:
    from photon_p2p.federation import records

    real = records.get_dht_time
    records.get_dht_time = lambda: real() + 1e6
    _lure(1000)


def speed_abuse() -> None:
    from photon_p2p.federation import clock

    report = clock.SwarmClock.report

    def reported(self, round_no, steps, busy_s):  # noqa: ANN001, ANN202
        report(self, round_no, steps, 1e-30)  # steps over ~0 s of compute: the speed it stores
        self.tracker.measured_speed = 1e30

    clock.SwarmClock.report = reported


ATTACKS: dict[str, Callable[[], None] | None] = {
    "none": None, "forged-state": forged_state, "crash-sync": crash_sync, "fake-fingerprint": fake_fingerprint,
    "negative-weight": negative_weight, "gloo-weights": gloo_weights, "dht-wipe": dht_wipe,
    "ghost-record": ghost_record, "speed-abuse": speed_abuse}


def hostile(name: str, argv: list[str]) -> int:
    install = ATTACKS.get(name)
    if install is None:
        raise BenchError(f"unknown attack {name!r} (one of {', '.join(a for a in ATTACKS if a != 'none')})")
    install()
    print(f"adversary: hostile silo running {name}", flush=True)
    return kit.photon_peer(argv)


# ---- the swarm ---------------------------------------------------------------------------------------------------
class AttackSwarm(one_model.Swarm):
    """one_model's swarm: ``honest`` honest silos, then the hostile one (the last index) unless the attack is none."""

    def __init__(self, attack: str, honest: int, out: Path, val_dir: Path, rounds: int, local_steps: int,
                 settings: list[str] = ()) -> None:
        self.attack, self.honest = attack, honest
        # the product's defaults otherwise (the swarm clock, robust clip, gloo where every member is reachable),
        # unless ``settings`` (--set, every silo) says otherwise
        one_model.SCENARIOS[f"adversary-{attack}"] = {
            "peers": honest + (attack != "none"), "rounds": rounds,
            "overrides": [f"federation.local_steps={local_steps}", "train.eval_every=0", *settings]}
        super().__init__(f"adversary-{attack}", "new", REPO, out, val_dir, 0.0)
        self.wrapped = {honest: (__file__, "--hostile", attack)} if attack != "none" else {}
        self.note = out / "hostile-fingerprints.txt"
        os.environ[NOTE_ENV] = str(self.note)  # before any silo starts: Swarm.start copies the environment


def summarize(sw: AttackSwarm, args: argparse.Namespace) -> dict[str, Any]:
    honest = list(range(sw.honest))
    every = {i: kit.records(sw.out / f"peer-{i}") for i in sorted(sw.procs)}
    rounds = {i: [r for r in recs if r.get("kind") == "round"] for i, recs in every.items()}
    analysis = one_model.analyze({i: rounds[i] for i in honest}, honest, honest)
    ppl = [analysis["final_val_ppl"].get(str(i)) for i in honest]
    ppl = [p for p in ppl if p is not None]
    introduced = set(sw.note.read_text().split()) if sw.note.is_file() else set()
    held = {r.get("fingerprint") for i in honest for r in every[i] if r.get("kind") in ("round", "sync")}
    crashes = {}
    for i in honest:
        log = (sw.out / f"peer-{i}" / "peer.log").read_text(errors="replace")
        code = sw.procs[i].returncode
        if code not in (0, -15) or "Traceback" in log:
            crashes[str(i)] = {"exit_code": code, "traceback": "Traceback" in log}
    hostile = {}
    if sw.attack != "none":
        log = (sw.out / f"peer-{sw.honest}" / "peer.log").read_text(errors="replace")
        hostile = {"ran": "adversary: hostile silo running" in log, "exit_code": sw.procs[sw.honest].returncode,
                   "traceback": "Traceback" in log}
        if not hostile["ran"]:
            raise BenchError(f"the hostile silo never ran its attack (see {sw.out}/peer-{sw.honest}/peer.log)")
    # the attacker-free runs with the same --set settings and as many honest silos (another aggregation, or more
    # silos' data, trains another baseline)
    stored = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("none*.json"))]
    baselines = [b["honest_val_ppl"] for b in stored if b["honest_val_ppl"] and
                 b.get("settings", []) == list(args.set) and b.get("honest_silos", 3) == sw.honest]
    base = statistics.mean(baselines) if baselines else None
    honest_ppl = statistics.mean(ppl) if ppl else None
    return {
        "attack": args.attack, "settings": list(args.set), "honest_silos": sw.honest, "rounds": args.rounds, "local_steps": args.local_steps,
        "honest_val_ppl": honest_ppl, "baseline_val_ppl": base,
        "baseline_runs": baselines, "baseline_spread": (max(baselines) / min(baselines) - 1) if baselines else None,
        "ppl_vs_baseline": (honest_ppl / base - 1) if honest_ppl and base else None,
        "adopted_attacker_fingerprint": bool(introduced & held), "introduced": sorted(introduced),
        "honest_crashes": len(crashes), "crashes": crashes, "participation": analysis["participation"],
        "end_models": analysis["end_models"], "refused_states": sum(
            1 for i in honest for r in every[i] if r.get("kind") == "refused_state"),
        "syncs": sum(1 for i in honest for r in every[i] if r.get("kind") == "sync"),
        "hostile": hostile, "exit_codes": {str(i): p.returncode for i, p in sw.procs.items()}, "capped": sw.capped,
        "wall_s": round(sw.wall_s, 1), "command": kit.command(script="bench/adversary.py"),
        **sw.provenance}


def table(results: Path = RESULTS) -> str:
    rows = ["| attack | settings | honest crashes | adopted attacker's model | honest val ppl | vs baseline | participation | "
            "models at end | commit | raw |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        vs = r.get("ppl_vs_baseline")
        rows.append(f"| {r['attack']} | {' '.join(r.get('settings', [])) or 'defaults'} | {r['honest_crashes']} | {'yes' if r['adopted_attacker_fingerprint'] else 'no'} "
                    f"| {fmt(r['honest_val_ppl'])} | {'-' if vs is None else f'{vs:+.1%}'} | "
                    f"{fmt(r['participation'], '.3f')} | {r['end_models']} | {r.get('commit', '?')} | "
                    f"{os.path.relpath(path, REPO)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wrapped := kit.wrapped_silo(argv, "--hostile", "adversary.py --hostile ATTACK -- <photon-peer args>"):
        return hostile(*wrapped)
    ap = kit.parser(__doc__, cap=420.0, corpus=str(kit.CORPUS), results=str(RESULTS))
    ap.add_argument("--attack", choices=list(ATTACKS))
    ap.add_argument("--peers", type=int, default=3, help="honest silos (the hostile one comes on top)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every silo, e.g. federation.robust_aggregation=centered_clip; "
                         "compared against attacker-free runs with the same settings")
    ap.add_argument("--tag", default="", help="stored as ATTACK-TAG.json (repeated runs)")
    ap.add_argument("--out", default=None, help="run directory (default runs/adversary/ATTACK[-TAG])")
    ap.add_argument("--table", action="store_true", help="print the table of stored results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.results)))
        return 0
    if not args.attack:
        ap.error("--attack is required (or --table)")
    name = args.attack + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out) if args.out else REPO / "runs" / "adversary" / name
    val_dir = one_model.prepare_val(Path(args.corpus), out.parent / "val")  # runs/adversary/val by default
    sw = AttackSwarm(args.attack, args.peers, out, val_dir, args.rounds, args.local_steps, args.set)
    sw.run(args.cap)
    result = summarize(sw, args)
    for path in (out / "summary.json", Path(args.results) / f"{name}.json"):
        kit.write_json(path, result)
    print(json.dumps({k: result[k] for k in ("attack", "honest_crashes", "adopted_attacker_fingerprint",
                                             "honest_val_ppl", "baseline_val_ppl", "ppl_vs_baseline",
                                             "participation", "end_models")}))
    return 0


if __name__ == "__main__":
    kit.run(main, "adversary")
