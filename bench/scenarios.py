#!/usr/bin/env python
"""Swarm scenarios: real tiny silos on 127.0.0.1, some of them slowed, broken or hostile, scored from every silo's
round records. One runner (start the silos, disturb them, wait, score) for three families of scenarios.

Usage:
  flock /tmp/photon-bench.lock python bench/scenarios.py one-model                  # every scenario, new then before
  flock /tmp/photon-bench.lock python bench/scenarios.py one-model --scenarios three throttled --code new before
  flock /tmp/photon-bench.lock python bench/scenarios.py trust                      # every trust scenario
  flock /tmp/photon-bench.lock python bench/scenarios.py trust --micro              # in-process costs only
  flock /tmp/photon-bench.lock python bench/scenarios.py adversary --attack forged-state   # 3 honest + 1 hostile
  flock /tmp/photon-bench.lock python bench/scenarios.py adversary --attack none --tag 2   # attacker-free baseline
  python bench/scenarios.py one-model --report-only     # the table again (trust --report-only, adversary --table)
  (internal) python bench/scenarios.py --silo KIND:ARG -- run --config tiny ...    # a silo with one change
Until 2026-12-08 the three families were bench/one_model.py, bench/trust.py and bench/adversary.py, with the same
flags; their results (bench/results/one_model, trust, adversary) record those commands.

Every silo runs the tiny preset on 127.0.0.1 with train.threads=1 and one embedded corpus source (silo i: shakespeare,
kjv, brown, shakespeare, kjv ...); silo 0 bootstraps, the others join through its address; every silo is scored on
ONE shared validation set (data.val_dir = the val split of ../shared/corpus, else of the embedded corpus, prepared
once). A changed silo runs this script's --silo wrapper, which changes one thing in that process only (a monkeypatch;
no product change), then runs photon_p2p.cli:
  throttle:DELAY   sleep DELAY s before every LocalTrainer.train_step (one-model's half-speed silo)
  tamper:ATTACK    change every Δ before it is sent (trust): scale:F multiplies it by F, noise replaces each tensor
                   by Gaussian noise of the same norm
  hostile:NAME     one of adversary's attacks (below), with the project's own code

one-model: do the live silos average every round and hold the same weights? New code vs the code before.
  three      the README's swarm: 3 silos, 8 rounds
  throttled  4 silos, 6 rounds; silo 3 sleeps one measured step time (tiny, 1 thread) before every step: half speed
  churn      4 silos, rounds=0, heartbeat_interval=5, record_ttl=15; once the fastest silo has 2 round records:
             SIGKILL silo 3's process group, SIGSTOP silo 2's for 30 s (then SIGCONT), start silo 4; stop
             everything once the fastest silo has 12 round records (or at --cap seconds)
  lr50       3 silos, 8 rounds, silo 2 with train.lr=50 and train.grad_clip=0; baselines of the same code version:
             `three` (the same run with silo 2 honest) and `two` (silos 0 and 1 alone: what is left if the bad
             silo contributes nothing, so the damage it does shows apart from the loss of its data and compute)
  two        2 silos (shakespeare, kjv), 8 rounds: lr50's honest silos without silo 2
  grid       4 silos, 10 rounds, target_group_size=2: every round averages in two stages (rows, then columns)
  Versions: --code new runs this working tree (or, with --new-ref REF, commit REF from a git worktree at
  /tmp/photon-new-REF: a fixed code version while the working tree is being edited); --code before runs commit
  e4a7636 from a git worktree at /tmp/photon-before (--before-ref REF: commit REF, at /tmp/photon-before-REF).
  Worktrees are created if absent; every silo runs with PYTHONPATH and cwd pointing at its version's tree.
  Per scenario and version: RESULTS/<scenario>-<code>.json (skipped next time unless --force) and the markdown
  table (also RESULTS/table.md). Metrics, from every silo's RUN_DIR/metrics.jsonl round records:
  participation  non-solo round records / all round records, over all silos
  models         at each round value, the number of distinct fingerprints among the silos' records with that
                 round (new: sha256 `fingerprint`; before: `global_checksum` rounded to 4 decimals): the max over
                 rounds, and at the final round (the highest round value reported by >= 2 silos); in brackets
                 [≈n] where it differs: old checksums within 0.01 counted as one model (members of one old group
                 end ~1e-6 apart, float rounding rather than a different history)
  end models     distinct fingerprints among the last records of the silos alive at the end
  wait           per round of the non-throttled honest silos: phases.matchmaking (= wait_s in the new code)
                 when the round formed a group, else the whole averaging_s (a solo round waited all of it)
  splits         round values with > 1 fingerprints, and whether the silos that held different models hold one
                 at the next round value ("not comparable" when that round does not show both sides)
  --report-only recomputes these figures from the run dirs (when present) and rewrites the JSONs.

trust: does robust aggregation keep the honest silos' model when one or two silos misbehave, and what does it cost
an honest swarm? 4 silos, federation.rounds=R and local_steps=H from --rounds/--local-steps, round_clock steps:
  honest-none  4 honest silos, federation.robust_aggregation=none (the plain mean: the baseline)
  honest       4 honest silos, robust_aggregation=clip (the default)
  lr50         silo 3 with train.lr=50 and train.grad_clip=0 (the daemon's non-finite guard already keeps its
               Δ out; robust aggregation would drop a non-finite chunk too)
  scaled       silo 3 sends its Δ × 1e4 (tamper:scale:1e4)
  noise        silo 3 sends Gaussian noise with the norm of its honest Δ (per tensor)
  collude      silos 2 and 3 both send their Δ × 1e4 (two of four: the lower median is still honest)
  scaled-none  silo 3 sends Δ × 1e4 with robust_aggregation=none (what the defence buys)
  Figures (RESULTS/<scenario>.json, table.md): final val ppl of the honest silos (they hold one model; the mean
  over them), its ratio to honest-none; the all-reduce seconds (phases.allreduce) median of the honest silos and
  its ratio to honest-none; which silos the honest peers' round records report as clipped/dropped, and the
  smallest factor. --micro: ms per reduce_part call (4 senders × 2 MiB parts, fp32) for none / clip /
  centered_clip, and seconds per exact all-reduce round (4 members with real p2p daemons in one process, 8 and
  100 MB, codec none) per mode.

adversary: honest silos and one hostile silo that runs a named attack (issue 24; it otherwise trains and averages
like any other). Did an honest silo crash, ever hold a model the attacker introduced, or end worse?
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
  Each run writes OUT/summary.json and RESULTS/<attack>[-TAG].json: honest_val_ppl (the honest silos' mean final
  validation perplexity), baseline_val_ppl (the mean of the stored attacker-free runs with the same --set
  settings and as many honest silos, with their spread), adopted_attacker_fingerprint (whether an honest silo
  ever recorded a fingerprint the hostile silo introduced), honest_crashes (an honest silo that exited non-zero
  or logged a traceback), participation (the honest silos' grouped share of rounds) and end_models (distinct
  models among the honest silos at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by path (tests): toolkit is its neighbour
import toolkit as kit  # noqa: E402
from toolkit import REPO, BenchError, fmt  # noqa: E402

SOURCES = ["shakespeare", "kjv", "brown"]
RESULTS = REPO / "bench" / "results"
NOTE_ENV = "PHOTON_ADVERSARY_NOTE"  # the hostile silo appends the fingerprints it introduces to this file
NOTE = "hostile-fingerprints.txt"  # that file, in the run dir


# ---- the changed silos (each runs inside the silo's own process, before photon_p2p.cli) ---------------------------
def throttle(delay: str) -> None:
    import photon_p2p
    from photon_p2p.train import trainer as trainer_module

    original = trainer_module.LocalTrainer.train_step

    def slow_step(self):  # noqa: ANN001, ANN202
        time.sleep(float(delay))
        return original(self)

    trainer_module.LocalTrainer.train_step = slow_step
    print(f"scenarios: throttled silo: +{float(delay):.3f}s before every train_step "
          f"(photon_p2p from {Path(photon_p2p.__file__).parent})", flush=True)


def tamper(attack: str) -> None:
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


def hostile(name: str) -> None:
    if ATTACKS.get(name) is None:
        raise BenchError(f"unknown attack {name!r} (one of {', '.join(a for a in ATTACKS if a != 'none')})")
    ATTACKS[name]()
    print(f"adversary: hostile silo running {name}", flush=True)


def changed_silo(change: str, argv: list[str]) -> int:
    """`photon-peer ARGV` with ``change`` (KIND:ARG, see the module's doc) installed first."""
    kind, _, arg = change.partition(":")
    changes = {"throttle": throttle, "tamper": tamper, "hostile": hostile}
    if kind not in changes:
        raise BenchError(f"unknown silo change {kind!r} (one of {', '.join(changes)})")
    changes[kind](arg)
    return kit.photon_peer(argv)


# ---- one-model's analysis (pure: records in, figures out) ---------------------------------------------------------
CHECKSUM_TOL = 0.01  # old float checksums (sums of ~1.9M weights) this close are one model up to float rounding


def model_id(rec: dict) -> str:
    """The global model a round record describes: the sha256 fingerprint, else the old float checksum."""
    if rec.get("fingerprint"):
        return str(rec["fingerprint"])
    return f"{float(rec['global_checksum']):.4f}"


def round_wait(rec: dict) -> float:
    """Seconds this round spent waiting for others: matchmaking when a group formed, else all of averaging."""
    phases = rec.get("phases") or {}
    if not rec.get("solo") and "matchmaking" in phases:
        return float(phases["matchmaking"])
    return float(rec.get("averaging_s", 0.0))


def _stats(xs: list[float]) -> dict[str, float | None]:
    return {"median": round(statistics.median(xs), 3) if xs else None, "max": round(max(xs), 3) if xs else None}


def model_classes(recs: list[dict], coarse: bool = False) -> list[int]:
    """One class id per record: the same id for the same global model. ``coarse``: the old float checksums within
    CHECKSUM_TOL of each other are one class (members of one old group end a few 1e-6 apart: float rounding,
    not a different history); sha256 fingerprints are always compared exactly."""
    if not coarse or all(r.get("fingerprint") for r in recs):
        ids: dict[str, int] = {}
        return [ids.setdefault(model_id(r), len(ids)) for r in recs]
    values = [float(r["global_checksum"]) for r in recs]
    out = [-1] * len(recs)  # every NaN checksum (a NaN model) is one class: -1
    cls, prev = 0, None
    for k in sorted((k for k, v in enumerate(values) if not math.isnan(v)), key=values.__getitem__):
        if prev is not None and values[k] - prev > CHECKSUM_TOL:
            cls += 1
        out[k], prev = cls, values[k]
    return out


def count_models(recs: list[dict], coarse: bool = False) -> int:
    """Distinct global models among ``recs`` (see model_classes)."""
    return len(set(model_classes(recs, coarse)))


def _splits(by_round: dict[int, list[tuple[int, dict]]], coarse: bool) -> tuple[dict[int, int], list[dict]]:
    """Distinct models per round value, and the rounds with more than one. A split is healed at the next round
    when the silos that held different models hold one model there; None when the next round does not show
    silos from both sides of the split (a silo skipped that round value, left, or the run was stopped)."""
    distinct, per_silo = {}, {}
    for rnd, recs in by_round.items():
        classes = model_classes([r for _, r in recs], coarse)
        distinct[rnd] = len(set(classes))
        per_silo[rnd] = {i: c for (i, _), c in zip(recs, classes)}  # a silo's last record at that round
    splits = []
    for rnd, n in distinct.items():
        if n < 2:
            continue
        nxt = per_silo.get(rnd + 1, {})
        common = [i for i in per_silo[rnd] if i in nxt]
        healed = None
        if len({per_silo[rnd][i] for i in common}) >= 2:
            healed = len({nxt[i] for i in common}) == 1
        splits.append({"round": rnd, "models": n, "silos": sorted(per_silo[rnd]),
                       "next_round_models": distinct.get(rnd + 1), "next_round_silos": sorted(nxt),
                       "healed_next": healed})
    return distinct, splits


def analyze(silos: dict[int, list[dict]], wait_silos: list[int], alive_at_end: list[int]) -> dict[str, Any]:
    """Figures of one run from each silo's round records (in file order)."""
    flat = [(i, r) for i, recs in silos.items() for r in recs]
    by_round: dict[int, list[tuple[int, dict]]] = {}
    for i, r in flat:
        by_round.setdefault(int(r["round"]), []).append((i, r))
    by_round = dict(sorted(by_round.items()))
    distinct, splits = _splits(by_round, coarse=False)
    coarse, splits_coarse = _splits(by_round, coarse=True)
    multi = [rnd for rnd, recs in by_round.items() if len({i for i, _ in recs}) >= 2]
    final_round = max(multi) if multi else (max(by_round) if by_round else None)
    waits = [round_wait(r) for i, r in flat if i in wait_silos]
    avg_s = [float(r.get("averaging_s", 0.0)) for i, r in flat if i in wait_silos]
    solo = [{"silo": i, "round": int(r["round"]), "reason": r.get("reason", "")} for i, r in flat if r.get("solo")]
    last = [silos[i][-1] for i in alive_at_end if silos.get(i)]
    return {
        "peer_rounds": len(flat),
        "grouped_rounds": sum(1 for _, r in flat if not r.get("solo")),
        "participation": round(sum(1 for _, r in flat if not r.get("solo")) / len(flat), 4) if flat else None,
        "solo": solo,
        "solo_reasons": dict(Counter(s["reason"] for s in solo)),
        "healed_rounds": sum(1 for _, r in flat if r.get("healed")),
        "group_sizes": dict(Counter(str(r.get("group_size")) for _, r in flat)),
        "distinct_by_round": {str(k): v for k, v in distinct.items()},
        "distinct_by_round_coarse": {str(k): v for k, v in coarse.items()},
        "max_distinct": max(distinct.values()) if distinct else None,
        "max_distinct_coarse": max(coarse.values()) if coarse else None,
        "final_round": final_round,
        "final_distinct": distinct.get(final_round) if final_round is not None else None,
        "final_distinct_coarse": coarse.get(final_round) if final_round is not None else None,
        "final_silos": len({i for i, _ in by_round.get(final_round, [])}) if final_round is not None else 0,
        "end_models": count_models(last) if last else None,
        "end_models_coarse": count_models(last, coarse=True) if last else None,
        "end_rounds": {str(i): int(silos[i][-1]["round"]) for i in alive_at_end if silos.get(i)},
        "splits": splits,
        "splits_coarse": splits_coarse,
        "wait_s": _stats(waits),
        "averaging_s": _stats(avg_s),
        "final_val_ppl": {str(i): next((float(r["val_ppl"]) for r in reversed(recs) if "val_ppl" in r), None)
                          for i, recs in silos.items()},
        "round_records": {str(i): len(recs) for i, recs in silos.items()},
    }


def mean_ppl(result: dict, silos: list[int]) -> float | None:
    """The mean final val ppl of ``silos`` in a result (analyze's final_val_ppl): the honest silos' model."""
    xs = [p for p in (result["final_val_ppl"].get(str(i)) for i in silos) if p is not None]
    return statistics.mean(xs) if xs else None


# ---- the runner: code versions, the shared validation set, the swarm ---------------------------------------------
BEFORE_COMMIT = "e4a7636"
BEFORE_TREE = Path("/tmp/photon-before")


def code_tree(code: str, new_ref: str | None, before_ref: str = "") -> Path:
    if code == "new" and not new_ref:
        return REPO
    before = BEFORE_COMMIT if before_ref in ("", BEFORE_COMMIT) else before_ref
    tree_before = BEFORE_TREE if before == BEFORE_COMMIT else Path(f"/tmp/photon-before-{before}")
    ref, tree = (new_ref, Path(f"/tmp/photon-new-{new_ref}")) if code == "new" else (before, tree_before)
    if not (tree / "photon_p2p" / "cli.py").is_file():
        print(f"scenarios: git worktree add --detach {tree} {ref}", flush=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True)
    return tree


def prepare_val(corpus: Path, cache: Path) -> Path:
    """One shared held-out set: the val split (last 1% of each file) of the full corpus, else of the embedded one."""
    if (cache / "manifest.json").is_file():
        return cache
    files = [corpus / f"{s}.txt" for s in SOURCES]
    if not all(f.is_file() for f in files):
        import lzma

        src = cache.parent / "embedded-txt"
        src.mkdir(parents=True, exist_ok=True)
        for s in SOURCES:
            with lzma.open(REPO / "photon_p2p" / "assets" / "corpus" / f"{s}.txt.xz", "rb") as f:
                (src / f"{s}.txt").write_bytes(f.read())
        files = [src / f"{s}.txt" for s in SOURCES]
    print(f"scenarios: preparing the shared validation set into {cache}", flush=True)
    subprocess.run([sys.executable, "-m", "photon_p2p.cli", "prepare-data", "--input", *map(str, files),
                    "--out", str(cache), "--no-progress"], cwd=REPO, check=True)
    return cache


def measure_step_s(cache: Path) -> float:
    """Median seconds of one tiny train_step on 1 thread (the throttled silo sleeps this much per step)."""
    path = cache / "step_time.json"
    if not path.is_file():
        from photon_p2p.config import load_config
        from photon_p2p.data.embedded import ensure_default_dataset
        from photon_p2p.train.trainer import build_trainer

        data = ensure_default_dataset(cache / "steptime-data", ["shakespeare"], progress=False)
        trainer = build_trainer(load_config(["tiny"], ["train.threads=1"]), str(data))
        for _ in range(3):
            trainer.train_step()
        steps = [kit.timed(trainer.train_step, 1, 0, trainer.device) for _ in range(15)]
        kit.write_json(path, {"step_s": statistics.median(steps), "min": min(steps), "max": max(steps)}, indent=None)
    return float(json.loads(path.read_text())["step_s"])


class Swarm:
    """The silos of one scenario run: start, watch, signal (churn), stop. ``spec``: peers, rounds, overrides (every
    silo), bad ({silo: its own overrides}), changed ({silo: KIND:ARG}, run through --silo) and churn's keys."""

    def __init__(self, name: str, spec: dict[str, Any], out: Path, val_dir: Path, code: str = "new",
                 tree: Path = REPO) -> None:
        shutil.rmtree(out, ignore_errors=True)  # daemons resume from checkpoints: start clean
        self.name, self.spec, self.out, self.val_dir, self.code, self.tree = name, spec, out, val_dir, code, tree
        self.procs: dict[int, subprocess.Popen] = {}
        self.maddrs: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.capped = False
        # at the start: the code the silos import
        self.provenance = {"code": code, "tree": str(tree), "commit": kit.git("rev-parse", "--short", "HEAD", cwd=tree),
                           "photon_p2p_changes": kit.git("status", "--porcelain", "photon_p2p", cwd=tree).splitlines()}

    def cmd(self, i: int) -> list[str]:
        """Silo i's `python -m photon_p2p.cli run ...`, or its --silo wrapper's."""
        s = self.spec
        cmd = kit.peer_cmd(self.out / f"peer-{i}", [
            f"name=silo-{i}", "train.threads=1", f"data.sources=[{SOURCES[i % len(SOURCES)]}]",
            f"data.val_dir={self.val_dir}", f"federation.rounds={s['rounds']}", *s.get("overrides", []),
            *s.get("bad", {}).get(i, [])], initial=self.maddrs[:1] if i else [],
            run_id=f"scenario-{self.name}-{self.code}")
        change = s.get("changed", {}).get(i)
        return [sys.executable, str(Path(__file__).resolve()), "--silo", change, "--", *cmd[3:]] if change else cmd

    def start(self, i: int) -> None:
        d = self.out / f"peer-{i}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = self.cmd(i)
        (d / "command.txt").write_text(" ".join(cmd) + "\n")
        self.procs[i] = kit.popen_logged(cmd, d / "peer.log", cwd=self.tree,
                                         env=dict(os.environ, PYTHONPATH=str(self.tree)))
        if i == 0:
            try:
                self.maddrs = kit.wait_for_address(self.procs[0], d, timeout=120)
            except kit.PeerStartError as e:
                raise BenchError(f"{self.name}/{self.code}: {e}") from None

    def records(self, i: int, kind: str | None = "round") -> list[dict]:
        return kit.records(self.out / f"peer-{i}", kind)

    def log(self, i: int) -> str:
        path = self.out / f"peer-{i}" / "peer.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def exit_codes(self) -> dict[str, int | None]:
        return {str(i): p.returncode for i, p in self.procs.items()}

    def rounds_done(self) -> dict[int, int]:
        return {i: len(self.records(i)) for i in self.procs}

    def signal_group(self, i: int, sig: signal.Signals, what: str) -> None:
        try:
            os.killpg(self.procs[i].pid, sig)
        except ProcessLookupError:
            pass
        self.event(f"{what} silo-{i}")

    def event(self, what: str) -> None:
        e = {"t": round(time.monotonic() - self.t0, 1), "what": what, "round_records": self.rounds_done()}
        self.events.append(e)
        print(f"  [{self.name}/{self.code} t={e['t']:.0f}s] {what}; round records {e['round_records']}", flush=True)

    def run(self, cap: float) -> None:
        """Start the silos, watch (and for churn, disturb) them until they exit or ``cap`` s; sets ``wall_s``."""
        s, start = self.spec, time.monotonic()
        for i in range(s["peers"]):
            self.start(i)
        self.event(f"started {s['peers']} silos")
        fired, frozen_at, seen, capped = False, None, 0, False
        try:
            while any(p.poll() is None for p in self.procs.values()):
                time.sleep(1.0)
                seen = kit.follow(self.out / "peer-0" / "peer.log", seen, f"{self.name}/{self.code} silo-0")
                if "kill" in s:  # churn
                    done = max(self.rounds_done().values())
                    if not fired and done >= s["event_after"]:
                        fired = True
                        self.signal_group(s["kill"], signal.SIGKILL, "SIGKILL")
                        self.signal_group(s["freeze"], signal.SIGSTOP, "SIGSTOP")
                        frozen_at = time.monotonic()
                        self.start(s["join"])
                        self.event(f"started silo-{s['join']} (joins)")
                    if frozen_at and time.monotonic() - frozen_at >= s["freeze_s"]:
                        self.signal_group(s["freeze"], signal.SIGCONT, "SIGCONT")
                        frozen_at = None
                    if done >= s["stop_after"] and frozen_at is None:
                        self.event(f"fastest silo has {done} round records: stopping")
                        break
                if time.monotonic() - self.t0 > cap:
                    capped = True
                    self.event(f"wall-clock cap {cap:.0f}s: stopping")
                    break
        finally:
            if frozen_at:
                self.signal_group(s["freeze"], signal.SIGCONT, "SIGCONT")
            kit.stop_all(list(self.procs.values()))
        self.capped, self.wall_s = capped, time.monotonic() - start

    def stored(self) -> dict[str, Any]:
        """What every family's result holds about the run itself."""
        return {**self.provenance, "wall_s": round(self.wall_s, 1), "capped": self.capped,
                "exit_codes": self.exit_codes(), "command": kit.command()}


def scenario_flags(ap: argparse.ArgumentParser, name: str, cap: float) -> None:
    """The flags every family has: where its runs and results go, the corpus, the cap per run."""
    kit.flags(ap, cap=cap, corpus=str(kit.CORPUS), results=str(RESULTS / name.replace("-", "_")))


# ---- one-model ---------------------------------------------------------------------------------------------------
ALL_CODES = ["new", "before"]
ONE_MODEL: dict[str, dict[str, Any]] = {
    "three": {"peers": 3, "rounds": 8},
    "throttled": {"peers": 4, "rounds": 6, "throttled": [3]},
    "lr50": {"peers": 3, "rounds": 8, "bad": {2: ["train.lr=50", "train.grad_clip=0"]}},
    "churn": {"peers": 4, "rounds": 0, "overrides": ["federation.heartbeat_interval=5", "federation.record_ttl=15"],
              "kill": 3, "freeze": 2, "freeze_s": 30.0, "join": 4, "event_after": 2, "stop_after": 12},
    "two": {"peers": 2, "rounds": 8},
    "grid": {"peers": 4, "rounds": 10, "overrides": ["federation.target_group_size=2"]},
}


def wait_silos(spec: dict, silos: dict[int, Any]) -> list[int]:
    """The silos whose waiting is measured: not the throttled one, not the bad one."""
    return [i for i in silos if i not in set(spec.get("throttled", [])) | set(spec.get("bad", {}))]


def reanalyze(result: dict, run_dir: Path) -> dict:
    """Recompute the figures of a stored result from its run dir (keeps exit codes, events and wall time)."""
    n = len(result["silos"])
    silos = {i: kit.records(run_dir / f"peer-{i}", "round") for i in range(n)}
    if not any(silos.values()):
        return result
    return {**result, **analyze(silos, wait_silos(result["spec"], silos), result["alive_at_end"])}


def one_model_result(sw: Swarm, delay: float, step_s: float) -> dict[str, Any]:
    s = sw.spec
    silos = {i: sw.records(i) for i in sorted(sw.procs)}
    codes = {i: p.returncode for i, p in sw.procs.items()}
    killed = {s["kill"]} if "kill" in s else set()
    # Alive at the end: not SIGKILLed by us, and did not exit with an error before we stopped the run.
    alive = [i for i in silos if i not in killed and codes[i] in (0, -signal.SIGTERM, -signal.SIGKILL)]
    key = "fingerprint" if sw.code == "new" else "global_checksum"
    wrong = [i for i, recs in silos.items() if any(key not in r for r in recs)]
    per_silo = {}
    for i in silos:
        recs, text = sw.records(i, None), sw.log(i)
        per_silo[str(i)] = {
            "source": SOURCES[i % len(SOURCES)], "exit_code": codes[i],
            "role": ("throttled" if i in s.get("throttled", []) else "bad (lr50)" if i in s.get("bad", {})
                     else "killed" if i in killed else "frozen 30s" if i == s.get("freeze")
                     else "joined late" if i == s.get("join") else "honest"),
            "round_records": len(silos[i]),
            "last_round": int(silos[i][-1]["round"]) if silos[i] else None,
            "steps": int(silos[i][-1]["step"]) if silos[i] else None,
            "rollbacks": sum(1 for r in recs if r.get("kind") == "rollback"),
            "syncs": [{"round": r.get("round"), "reason": r.get("reason")} for r in recs if r.get("kind") == "sync"],
            "diverged_lines": [ln for ln in text.splitlines() if "diverged" in ln][-3:],
            "log_tail": [ln for ln in text.splitlines() if ln.strip()][-6:],
        }
    return {"scenario": sw.name, "machine": "CPU-2", **sw.stored(), "spec": dict(s),
            "throttle_delay_s": delay if s.get("throttled") else None, "step_s_1thread": step_s,
            "events": sw.events, "version_check": "ok" if not wrong else f"records without {key!r} in silos {wrong}",
            "alive_at_end": alive, "silos": per_silo, **analyze(silos, wait_silos(s, silos), alive)}


def _healed(s: dict) -> str:
    if s["healed_next"] is None:
        return f"not comparable: next round has silos {s.get('next_round_silos', '?')}"
    return "healed" if s["healed_next"] else f"not healed ({s['next_round_models']} models)"


def _pair(r: dict, key: str) -> str:
    """A model count, with the count up to float rounding in brackets where it differs (old checksums)."""
    strict, coarse = r.get(key), r.get(key + "_coarse", r.get(key))
    return f"{strict}" if strict == coarse else f"{strict} [≈{coarse}]"


def one_model_table(results: dict[tuple[str, str], dict]) -> str:
    lines = kit.md_table(["scenario", "code", "peer-rounds", "participation", "solo (reasons)",
                          "max / final distinct models (silos at final)", "end models",
                          "fast silos' wait s median / max", "averaging s median / max", "final val ppl per silo",
                          "wall s"])
    for (name, code), r in sorted(results.items(), key=lambda kv: (list(ONE_MODEL).index(kv[0][0]),
                                                                  ALL_CODES.index(kv[0][1]))):
        reasons = ", ".join(f"{k or '?'} ×{v}" for k, v in r["solo_reasons"].items())
        ppl = " / ".join(fmt(v, ".1f") for v in r["final_val_ppl"].values())
        lines.append(
            f"| {name} | {code} ({r['commit']}) | {r['peer_rounds']} | {fmt(r['participation'], '.3f')} | "
            f"{len(r['solo'])}{' (' + reasons + ')' if reasons else ''} | {_pair(r, 'max_distinct')} / "
            f"{_pair(r, 'final_distinct')} (round {r['final_round']}, {r['final_silos']} silos) | "
            f"{_pair(r, 'end_models')} | "
            f"{fmt(r['wait_s']['median'])} / {fmt(r['wait_s']['max'])} | "
            f"{fmt(r['averaging_s']['median'])} / {fmt(r['averaging_s']['max'])} | {ppl} | {r['wall_s']:.0f} |")
    for code in ALL_CODES:
        bad = results.get(("lr50", code))
        if bad:
            b, hb = bad["silos"]["2"], mean_ppl(bad, [0, 1])  # silos 0 and 1: honest in lr50 and its baselines
            parts = []
            for base_name, what in (("three", "silo 2 honest"), ("two", "silos 0 and 1 alone")):
                base = results.get((base_name, code))
                h0 = mean_ppl(base, [0, 1]) if base else None
                ratio = hb / h0 if hb is not None and h0 else None
                parts.append(f"vs {fmt(h0)} in `{base_name}` ({what}): ratio **{fmt(ratio, '.3f')}**")
            lines.append(f"\nlr50 ({code}): honest silos' final val ppl {fmt(hb)} with the lr=50 silo, "
                         f"{'; '.join(parts)}. Bad silo: exit code {b['exit_code']}, {b['rollbacks']} rollbacks, "
                         f"{b['round_records']} round records; last log line: `{(b['log_tail'] or [''])[-1]}`")
    for code in ALL_CODES:
        r = results.get(("churn", code))
        if r:
            sp = ", ".join(f"{s['round']} ({s['models']} models, silos {s['silos']}; next round {_healed(s)})"
                           for s in r["splits"]) or "none"
            lines.append(f"\nchurn ({code}): rounds with > 1 model: {sp}")
            if r.get("splits_coarse") != r["splits"]:
                spc = ", ".join(f"{s['round']} ({s['models']}; next {_healed(s)})"
                                for s in r.get("splits_coarse", [])) or "none"
                lines.append(f"churn ({code}), up to float rounding (checksums within {CHECKSUM_TOL}): {spc}")
    return "\n".join(lines)


def load_one_model(results: Path, out_dir: Path | None = None) -> dict[tuple[str, str], dict]:
    """Stored results; with ``out_dir``, their figures are recomputed from the run dirs and stored again."""
    out = {}
    for name in ONE_MODEL:
        for code in ALL_CODES:
            p = results / f"{name}-{code}.json"
            if p.is_file():
                out[(name, code)] = json.loads(p.read_text())
                if out_dir is not None and (out_dir / code / name).is_dir():
                    out[(name, code)] = reanalyze(out[(name, code)], out_dir / code / name)
                    kit.write_json(p, out[(name, code)])
    return out


def one_model(args: argparse.Namespace) -> int:
    results, out = Path(args.results), Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    todo = [] if args.report_only else [(c, n) for c in args.code for n in args.scenarios
                                        if args.force or not (results / f"{n}-{c}.json").is_file()]
    if todo:
        val_dir = prepare_val(Path(args.corpus), out / "val")
        step_s = measure_step_s(out)
        delay = args.throttle_delay or step_s
        print(f"one-model: tiny step on 1 thread {step_s:.3f}s; throttled silo sleeps {delay:.3f}s/step", flush=True)
    for code, name in todo:
        tree = code_tree(code, args.new_ref, args.before_ref)
        print(f"one-model: {name} / {code} ({tree})", flush=True)
        spec = ONE_MODEL[name] | {"changed": {i: f"throttle:{delay:.4f}" for i in ONE_MODEL[name].get("throttled", [])}}
        sw = Swarm(name, spec, out / code / name, val_dir, code, tree)
        sw.run(args.cap)
        result = one_model_result(sw, delay, step_s)
        kit.write_json(results / f"{name}-{code}.json", result)
        print(f"one-model: {name} / {code} done in {result['wall_s']:.0f}s: participation "
              f"{result['participation']}, max distinct models {result['max_distinct']}", flush=True)
    table = one_model_table(load_one_model(results, out if args.report_only else None))
    (results / "table.md").write_text(table + "\n")
    print(table)
    return 0


# ---- trust -------------------------------------------------------------------------------------------------------
TRUST: dict[str, dict[str, Any]] = {
    "honest-none": {"robust": "none"},
    "honest": {"robust": "clip"},
    "lr50": {"robust": "clip", "bad": {3: ["train.lr=50", "train.grad_clip=0"]}},
    "scaled": {"robust": "clip", "attack": {3: "scale:1e4"}},
    "noise": {"robust": "clip", "attack": {3: "noise"}},
    "collude": {"robust": "clip", "attack": {2: "scale:1e4", 3: "scale:1e4"}},
    "scaled-none": {"robust": "none", "attack": {3: "scale:1e4"}},
}


def trust_swarm(name: str, out: Path, val_dir: Path, rounds: int, local_steps: int) -> Swarm:
    """4 silos with robust_aggregation set, the bad ones with their overrides, the adversarial ones tampered."""
    spec = TRUST[name]
    return Swarm(f"trust-{name}", {
        "peers": 4, "rounds": rounds, "bad": spec.get("bad", {}),
        "changed": {i: f"tamper:{attack}" for i, attack in spec.get("attack", {}).items()},
        "overrides": [f"federation.robust_aggregation={spec['robust']}", f"federation.local_steps={local_steps}",
                      "train.eval_every=0", "federation.round_clock=steps"]}, out, val_dir)


def trust_result(name: str, sw: Swarm) -> dict[str, Any]:
    spec = TRUST[name]
    bad = set(spec.get("bad", {})) | set(spec.get("attack", {}))
    recs = {i: sw.records(i) for i in sorted(sw.procs)}
    honest = [i for i in recs if i not in bad]
    analysis = analyze(recs, honest, [i for i in recs if sw.procs[i].returncode in (0, -15, -9)])
    ids = {}
    for i in recs:
        for ln in sw.log(i).splitlines():
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
    return {"scenario": name, "spec": spec, **sw.stored(),
            "allreduce_s": {"median": round(statistics.median(allreduce), 4) if allreduce else None,
                            "n": len(allreduce)}, "honest_silos": honest, "bad_silos": sorted(bad),
            "honest_val_ppl": mean_ppl(analysis, honest), "clipped_reported": clipped_out,
            "rollbacks": {str(i): len(sw.records(i, "rollback")) for i in recs},
            **{k: analysis[k] for k in ("participation", "solo_reasons", "max_distinct", "final_distinct",
                                        "end_models", "averaging_s", "final_val_ppl", "round_records")}}


def micro(repeats: int = 20) -> dict[str, Any]:
    """Milliseconds per reduce_part call: one 2 MiB fp32 part, 4 senders, 1 thread, per robust mode."""
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


def allreduce_cost(sizes: tuple[int, ...] = (2_000_000, 25_000_000), repeats: int = 3) -> dict[str, Any]:
    """Seconds per ExactAllReduceRunner round, 4 members on 127.0.0.1 (real p2p daemons, one process, codec none,
    2 MiB parts), per mode, modes interleaved; members declare their norms as the averager does."""
    import asyncio

    import torch
    from hivemind.p2p import P2P

    from photon_p2p.federation.compression import make_compression
    from photon_p2p.federation.hivemind_ext.allreduce import ExactAllReduceRunner
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


def trust_table(results: dict[str, dict], micro_result: dict | None) -> str:
    base = results.get("honest-none", {})
    b_ppl, b_avg = base.get("honest_val_ppl"), (base.get("allreduce_s") or {}).get("median")
    lines = kit.md_table(["scenario", "code", "robust", "bad silos", "honest silos' final val ppl",
                          "ratio to honest-none", "honest silos finished",
                          "all-reduce s median (honest, phases.allreduce)", "ratio", "participation", "models at end",
                          "clipped/dropped as reported by honest reducers (rounds, smallest factor)", "wall s"])
    for name in TRUST:
        r = results.get(name)
        if not r:
            continue
        ppl, avg = r["honest_val_ppl"], (r.get("allreduce_s") or {}).get("median")
        clip = "; ".join(f"{k}: {len(v['rounds'])} rounds, ×{v['factor']:.2g}"
                         for k, v in r["clipped_reported"].items()) or "none"
        lines.append(f"| {name} | {r.get('commit', '?')} | {r['spec']['robust']} | {r['bad_silos'] or '-'} | "
                     f"{fmt(ppl)} | {fmt(ppl / b_ppl if ppl and b_ppl else None, '.3f')} | "
                     f"{sum(r['exit_codes'][str(i)] == 0 for i in r['honest_silos'])}/{len(r['honest_silos'])} | "
                     f"{fmt(avg, '.3f')} | {fmt(avg / b_avg if avg and b_avg else None, '.2f')} | "
                     f"{fmt(r['participation'], '.3f')} | {r['end_models']} | {clip} | {r['wall_s']:.0f} |")
    if micro_result:
        m = micro_result["ms_per_part_4_senders_2MiB"]
        lines.append("\nReducer cost in-process (one 2 MiB fp32 part, 4 senders, 1 thread, median ms): "
                     + ", ".join(f"{k} {v}" for k, v in m.items()))
        for size, by_mode in micro_result.get("allreduce", {}).get("s_per_round_4_members", {}).items():
            lines.append(f"Exact all-reduce, 4 members in one process, {size} of fp32 (median s per round): "
                         + ", ".join(f"{k} {v} ({v / by_mode['none']:.2f}x)" for k, v in by_mode.items()))
    return "\n".join(lines)


def trust(args: argparse.Namespace) -> int:
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
        val_dir = prepare_val(Path(args.corpus), out / "val")
        for name in args.scenarios:
            if not args.force and (results / f"{name}.json").is_file():
                continue
            print(f"trust: {name}", flush=True)
            sw = trust_swarm(name, out / name, val_dir, args.rounds, args.local_steps)
            sw.run(args.cap)
            result = trust_result(name, sw)
            kit.write_json(results / f"{name}.json", result)
            print(f"trust: {name} done in {result['wall_s']:.0f}s: honest val ppl {result['honest_val_ppl']}, "
                  f"clipped {result['clipped_reported']}", flush=True)
    loaded = {n: json.loads((results / f"{n}.json").read_text()) for n in TRUST if (results / f"{n}.json").is_file()}
    table = trust_table(loaded, json.loads(micro_path.read_text()) if micro_path.is_file() else None)
    (results / "table.md").write_text(table + "\n")
    print(table)
    return 0


# ---- adversary ---------------------------------------------------------------------------------------------------
def attack_swarm(attack: str, honest: int, out: Path, val_dir: Path, rounds: int, local_steps: int,
                 settings: list[str] = ()) -> Swarm:
    """``honest`` honest silos, then the hostile one (the last index) unless the attack is none; the product's
    defaults otherwise (the swarm clock, robust clip, gloo where every member is reachable), unless ``settings``
    (--set, every silo) says otherwise."""
    sw = Swarm(f"adversary-{attack}", {
        "peers": honest + (attack != "none"), "rounds": rounds, "honest": honest,
        "changed": {honest: f"hostile:{attack}"} if attack != "none" else {},
        "overrides": [f"federation.local_steps={local_steps}", "train.eval_every=0", *settings]}, out, val_dir)
    os.environ[NOTE_ENV] = str(out / NOTE)  # before any silo starts: Swarm.start copies the environment
    return sw


def adversary_result(sw: Swarm, args: argparse.Namespace) -> dict[str, Any]:
    n, note = sw.spec["honest"], sw.out / NOTE
    honest = list(range(n))
    every = {i: sw.records(i, None) for i in sorted(sw.procs)}
    analysis = analyze({i: [r for r in every[i] if r.get("kind") == "round"] for i in honest}, honest, honest)
    introduced = set(note.read_text().split()) if note.is_file() else set()
    held = {r.get("fingerprint") for i in honest for r in every[i] if r.get("kind") in ("round", "sync")}
    crashes = {}
    for i in honest:
        code = sw.procs[i].returncode
        if code not in (0, -15) or "Traceback" in sw.log(i):
            crashes[str(i)] = {"exit_code": code, "traceback": "Traceback" in sw.log(i)}
    hostile_silo = {}
    if sw.spec["changed"]:
        log = sw.log(n)
        hostile_silo = {"ran": "adversary: hostile silo running" in log, "exit_code": sw.procs[n].returncode,
                        "traceback": "Traceback" in log}
        if not hostile_silo["ran"]:
            raise BenchError(f"the hostile silo never ran its attack (see {sw.out}/peer-{n}/peer.log)")
    # the attacker-free runs with the same --set settings and as many honest silos (another aggregation, or more
    # silos' data, trains another baseline)
    stored = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("none*.json"))]
    baselines = [b["honest_val_ppl"] for b in stored if b["honest_val_ppl"] and
                 b.get("settings", []) == list(args.set) and b.get("honest_silos", 3) == n]
    base = statistics.mean(baselines) if baselines else None
    honest_ppl = mean_ppl(analysis, honest)
    return {
        "attack": args.attack, "settings": list(args.set), "honest_silos": n, "rounds": args.rounds,
        "local_steps": args.local_steps, "honest_val_ppl": honest_ppl, "baseline_val_ppl": base,
        "baseline_runs": baselines, "baseline_spread": (max(baselines) / min(baselines) - 1) if baselines else None,
        "ppl_vs_baseline": (honest_ppl / base - 1) if honest_ppl and base else None,
        "adopted_attacker_fingerprint": bool(introduced & held), "introduced": sorted(introduced),
        "honest_crashes": len(crashes), "crashes": crashes, "participation": analysis["participation"],
        "end_models": analysis["end_models"], "refused_states": sum(
            1 for i in honest for r in every[i] if r.get("kind") == "refused_state"),
        "syncs": sum(1 for i in honest for r in every[i] if r.get("kind") == "sync"),
        "hostile": hostile_silo, **sw.stored()}


def adversary_table(results: Path) -> str:
    rows = kit.md_table(["attack", "settings", "honest crashes", "adopted attacker's model", "honest val ppl",
                         "vs baseline", "participation", "models at end", "commit", "raw"])
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        vs = r.get("ppl_vs_baseline")
        rows.append(f"| {r['attack']} | {' '.join(r.get('settings', [])) or 'defaults'} | {r['honest_crashes']} | "
                    f"{'yes' if r['adopted_attacker_fingerprint'] else 'no'} | {fmt(r['honest_val_ppl'])} | "
                    f"{'-' if vs is None else f'{vs:+.1%}'} | {fmt(r['participation'], '.3f')} | {r['end_models']} | "
                    f"{r.get('commit', '?')} | {os.path.relpath(path, REPO)} |")
    return "\n".join(rows)


def adversary(args: argparse.Namespace) -> int:
    if args.table:
        print(adversary_table(Path(args.results)))
        return 0
    if not args.attack:
        raise BenchError("adversary: --attack is required (or --table)")
    name = args.attack + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out) if args.out else REPO / "runs" / "adversary" / name
    val_dir = prepare_val(Path(args.corpus), out.parent / "val")  # runs/adversary/val by default
    sw = attack_swarm(args.attack, args.peers, out, val_dir, args.rounds, args.local_steps, args.set)
    sw.run(args.cap)
    result = adversary_result(sw, args)
    for path in (out / "summary.json", Path(args.results) / f"{name}.json"):
        kit.write_json(path, result)
    print(json.dumps({k: result[k] for k in ("attack", "honest_crashes", "adopted_attacker_fingerprint",
                                             "honest_val_ppl", "baseline_val_ppl", "ppl_vs_baseline",
                                             "participation", "end_models")}))
    return 0


# ---- the command line --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = kit.parser(__doc__)
    families = ap.add_subparsers(dest="family", required=True, metavar="{one-model,trust,adversary}")
    om = families.add_parser("one-model", help="participation and one model: new code vs the code before")
    scenario_flags(om, "one-model", 900.0)
    kit.flags(om, force=True, report_only=True, out=str(REPO / "runs" / "one-model"))
    om.add_argument("--scenarios", nargs="+", choices=list(ONE_MODEL), default=list(ONE_MODEL))
    om.add_argument("--code", nargs="+", choices=ALL_CODES, default=ALL_CODES)
    om.add_argument("--new-ref", default="",
                    help="run --code new from this commit (a git worktree) instead of the working tree")
    om.add_argument("--before-ref", default=BEFORE_COMMIT,
                    help="the commit --code before runs (a git worktree at /tmp/photon-before-REF)")
    om.add_argument("--throttle-delay", type=float, default=0.0,
                    help="seconds the throttled silo sleeps per step (0 = one measured tiny step on 1 thread)")
    tr = families.add_parser("trust", help="robust aggregation against bad silos, and its cost")
    scenario_flags(tr, "trust", 300.0)
    kit.flags(tr, force=True, report_only=True, out=str(REPO / "runs" / "trust"))
    tr.add_argument("--scenarios", nargs="+", choices=list(TRUST), default=list(TRUST))
    tr.add_argument("--rounds", type=int, default=4)
    tr.add_argument("--local-steps", type=int, default=16)
    tr.add_argument("--micro", action="store_true",
                    help="only the in-process costs: reduce_part per part, and exact all-reduce rounds per mode")
    ad = families.add_parser("adversary", help="one hostile silo against honest ones (issue 24)")
    scenario_flags(ad, "adversary", 420.0)
    ad.add_argument("--attack", choices=list(ATTACKS))
    ad.add_argument("--peers", type=int, default=3, help="honest silos (the hostile one comes on top)")
    ad.add_argument("--rounds", type=int, default=6)
    ad.add_argument("--local-steps", type=int, default=16)
    ad.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every silo, e.g. federation.robust_aggregation=centered_clip; "
                         "compared against attacker-free runs with the same settings")
    ad.add_argument("--tag", default="", help="stored as ATTACK-TAG.json (repeated runs)")
    ad.add_argument("--out", default=None, help="run directory (default runs/adversary/ATTACK[-TAG])")
    ad.add_argument("--table", action="store_true", help="print the table of stored results and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wrapped := kit.wrapped_silo(argv, "--silo", "scenarios.py --silo KIND:ARG -- <photon-peer args>"):
        return changed_silo(*wrapped)
    args = parse_args(argv)
    return {"one-model": one_model, "trust": trust, "adversary": adversary}[args.family](args)


if __name__ == "__main__":
    kit.run(main, "scenarios")
