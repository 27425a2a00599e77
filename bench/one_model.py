#!/usr/bin/env python
"""One model: do the live silos average every round and hold the same weights? New code vs the code before.

Usage:
  flock /tmp/photon-bench.lock python bench/one_model.py                       # every scenario, new then before
  flock /tmp/photon-bench.lock python bench/one_model.py --scenarios three throttled --code new before
  python bench/one_model.py --report-only                                       # re-print the table
  (internal) python bench/one_model.py --throttled-peer DELAY -- run --config tiny ...   # a half-speed silo

Scenarios (tiny preset on 127.0.0.1, train.threads=1, one embedded corpus source per silo: shakespeare, kjv,
brown, shakespeare, kjv; peer 0 bootstraps, the others join through its address; every silo is scored on ONE
shared validation set, data.val_dir = the val split of ../shared/corpus, prepared once):
  three      the README's swarm: 3 silos, 8 rounds
  throttled  4 silos, 6 rounds; silo 3 sleeps one measured step time before every train_step (half speed),
             through this script's --throttled-peer wrapper (a monkeypatch of LocalTrainer.train_step; no
             product change)
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

Per scenario and version it writes RESULTS/<scenario>-<code>.json (skipped next time unless --force) and prints
a markdown table (also RESULTS/table.md). Metrics, from every silo's RUN_DIR/metrics.jsonl round records:
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
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by path (tests): toolkit is its neighbour
import toolkit as kit  # noqa: E402
from toolkit import REPO, BenchError, fmt  # noqa: E402

BEFORE_COMMIT = "e4a7636"
BEFORE_TREE = Path("/tmp/photon-before")
SOURCES = ["shakespeare", "kjv", "brown"]
CHECKSUM_TOL = 0.01  # old float checksums (sums of ~1.9M weights) this close are one model up to float rounding
ALL_SCENARIOS = ["three", "throttled", "lr50", "churn", "two", "grid"]
ALL_CODES = ["new", "before"]
SCENARIOS: dict[str, dict[str, Any]] = {
    "three": {"peers": 3, "rounds": 8},
    "throttled": {"peers": 4, "rounds": 6, "throttled": [3]},
    "lr50": {"peers": 3, "rounds": 8, "bad": {2: ["train.lr=50", "train.grad_clip=0"]}},
    "two": {"peers": 2, "rounds": 8},
    "grid": {"peers": 4, "rounds": 10, "overrides": ["federation.target_group_size=2"]},
    "churn": {"peers": 4, "rounds": 0, "overrides": ["federation.heartbeat_interval=5", "federation.record_ttl=15"],
              "kill": 3, "freeze": 2, "freeze_s": 30.0, "join": 4, "event_after": 2, "stop_after": 12},
}


# ---- the throttled silo (runs inside the silo's own process) ---------------------------------------------
def throttled_peer(delay: float, argv: list[str]) -> int:
    """Run `photon-peer ARGV` with every LocalTrainer.train_step preceded by ``delay`` seconds of sleep."""
    import photon_p2p
    from photon_p2p.train import trainer as trainer_module

    original = trainer_module.LocalTrainer.train_step

    def slow_step(self):  # noqa: ANN001, ANN202
        time.sleep(delay)
        return original(self)

    trainer_module.LocalTrainer.train_step = slow_step
    print(f"one_model: throttled silo: +{delay:.3f}s before every train_step "
          f"(photon_p2p from {Path(photon_p2p.__file__).parent})", flush=True)
    return kit.photon_peer(argv)


# ---- analysis (pure: records in, figures out) ------------------------------------------------------------
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


def log_tail(path: Path, n: int = 6) -> list[str]:
    if not path.is_file():
        return []
    return [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()][-n:]


# ---- running ---------------------------------------------------------------------------------------------
def code_tree(code: str, new_ref: str | None, before_ref: str = "") -> Path:
    if code == "new" and not new_ref:
        return REPO
    before = BEFORE_COMMIT if before_ref in ("", BEFORE_COMMIT) else before_ref
    tree_before = BEFORE_TREE if before == BEFORE_COMMIT else Path(f"/tmp/photon-before-{before}")
    ref, tree = (new_ref, Path(f"/tmp/photon-new-{new_ref}")) if code == "new" else (before, tree_before)
    if not (tree / "photon_p2p" / "cli.py").is_file():
        print(f"one_model: git worktree add --detach {tree} {ref}", flush=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True)
    return tree


def provenance(code: str, tree: Path) -> dict[str, Any]:
    return {"code": code, "tree": str(tree), "commit": kit.git("rev-parse", "--short", "HEAD", cwd=tree),
            "photon_p2p_changes": kit.git("status", "--porcelain", "photon_p2p", cwd=tree).splitlines()}


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
    print(f"one_model: preparing the shared validation set into {cache}", flush=True)
    subprocess.run([sys.executable, "-m", "photon_p2p.cli", "prepare-data", "--input", *map(str, files),
                    "--out", str(cache), "--no-progress"], cwd=REPO, check=True)
    return cache


def measure_step_s(cache: Path) -> float:
    """Median seconds of one tiny train_step on 1 thread (the throttled silo sleeps this much per step)."""
    path = cache / "step_time.json"
    if path.is_file():
        return float(json.loads(path.read_text())["step_s"])
    code = ("import json,statistics,time,sys\n"
            "from photon_p2p.config import load_config\n"
            "from photon_p2p.data.embedded import ensure_default_dataset\n"
            "from photon_p2p.train.trainer import build_trainer\n"
            "cfg = load_config(['tiny'], ['train.threads=1'])\n"
            "tr = build_trainer(cfg, str(ensure_default_dataset(sys.argv[1], ['shakespeare'], progress=False)))\n"
            "[tr.train_step() for _ in range(3)]\n"
            "ts = []\n"
            "for _ in range(15):\n"
            "    t0 = time.perf_counter(); tr.train_step(); ts.append(time.perf_counter() - t0)\n"
            "print(json.dumps({'step_s': statistics.median(ts), 'min': min(ts), 'max': max(ts)}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(cache / "steptime-data")], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(out + "\n")
    return float(json.loads(out)["step_s"])


class Swarm:
    """The silos of one scenario run: start, watch, signal, stop."""

    def __init__(self, name: str, code: str, tree: Path, out: Path, val_dir: Path, delay: float) -> None:
        shutil.rmtree(out, ignore_errors=True)  # daemons resume from checkpoints: start clean
        self.name, self.code, self.tree, self.out, self.val_dir, self.delay = name, code, tree, out, val_dir, delay
        self.spec = SCENARIOS[name]
        self.procs: dict[int, subprocess.Popen] = {}
        self.maddrs: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.capped = False
        self.provenance = provenance(code, tree)  # at the start: the code the silos import
        # silo: (script, flag, value): the silo runs `python SCRIPT FLAG VALUE -- ARGS`, its wrapper of photon-peer
        self.wrapped = {i: (__file__, "--throttled-peer", f"{delay:.4f}") for i in self.spec.get("throttled", [])}

    def cmd(self, i: int) -> list[str]:
        """Silo i's `python -m photon_p2p.cli run ...`, or its wrapper's."""
        s = self.spec
        cmd = kit.peer_cmd(self.out / f"peer-{i}", [
            f"name=silo-{i}", "train.threads=1", f"data.sources=[{SOURCES[i % len(SOURCES)]}]",
            f"data.val_dir={self.val_dir}", f"federation.rounds={s['rounds']}", *s.get("overrides", []),
            *s.get("bad", {}).get(i, [])], initial=self.maddrs[:1] if i else [],
            run_id=f"one-model-{self.name}-{self.code}")
        script, flag, value = self.wrapped.get(i, ("", "", ""))
        return [sys.executable, str(Path(script).resolve()), flag, value, "--", *cmd[3:]] if script else cmd

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

    def rounds_done(self) -> dict[int, int]:
        return {i: len(kit.records(self.out / f"peer-{i}", "round")) for i in self.procs}

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


def summarize(sw: Swarm, step_s: float) -> dict[str, Any]:
    s = sw.spec
    silos = {i: kit.records(sw.out / f"peer-{i}", "round") for i in sorted(sw.procs)}
    codes = {i: p.returncode for i, p in sw.procs.items()}
    killed = {s["kill"]} if "kill" in s else set()
    # Alive at the end: not SIGKILLed by us, and did not exit with an error before we stopped the run.
    alive = [i for i in silos if i not in killed and codes[i] in (0, -signal.SIGTERM, -signal.SIGKILL)]
    result = analyze(silos, wait_silos(s, silos), alive)
    key = "fingerprint" if sw.code == "new" else "global_checksum"
    wrong = [i for i, recs in silos.items() if any(key not in r for r in recs)]
    per_silo = {}
    for i in silos:
        recs = kit.records(sw.out / f"peer-{i}")
        log = sw.out / f"peer-{i}" / "peer.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
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
            "log_tail": log_tail(log),
        }
    return {"scenario": sw.name, "machine": "CPU-2", **sw.provenance,
            "command": "python " + " ".join(sys.argv), "spec": {k: v for k, v in s.items()},
            "throttle_delay_s": sw.delay if s.get("throttled") else None, "step_s_1thread": step_s,
            "wall_s": round(sw.wall_s, 1), "capped": sw.capped, "events": sw.events,
            "version_check": "ok" if not wrong else f"records without {key!r} in silos {wrong}",
            "alive_at_end": alive, "silos": per_silo, **result}


# ---- report ----------------------------------------------------------------------------------------------
def honest_ppl(r: dict) -> float | None:
    """Mean final val ppl of silos 0 and 1 (the silos that are honest in lr50 and its baseline)."""
    xs = [r["final_val_ppl"].get(k) for k in ("0", "1")]
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _healed(s: dict) -> str:
    if s["healed_next"] is None:
        return f"not comparable: next round has silos {s.get('next_round_silos', '?')}"
    return "healed" if s["healed_next"] else f"not healed ({s['next_round_models']} models)"


def _pair(r: dict, key: str) -> str:
    """A model count, with the count up to float rounding in brackets where it differs (old checksums)."""
    strict, coarse = r.get(key), r.get(key + "_coarse", r.get(key))
    return f"{strict}" if strict == coarse else f"{strict} [≈{coarse}]"


def markdown(results: dict[tuple[str, str], dict]) -> str:
    lines = ["| scenario | code | peer-rounds | participation | solo (reasons) | max / final distinct models "
             "(silos at final) | end models | fast silos' wait s median / max | averaging s median / max | "
             "final val ppl per silo | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (name, code), r in sorted(results.items(), key=lambda kv: (ALL_SCENARIOS.index(kv[0][0]),
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
            b, hb = bad["silos"]["2"], honest_ppl(bad)
            parts = []
            for base_name, what in (("three", "silo 2 honest"), ("two", "silos 0 and 1 alone")):
                base = results.get((base_name, code))
                h0 = honest_ppl(base) if base else None
                ratio = hb / h0 if hb is not None and h0 else None
                parts.append(f"vs {fmt(h0)} in `{base_name}` ({what}): ratio **{fmt(ratio, '.3f')}**")
            lines.append(f"\nlr50 ({code}): honest silos' final val ppl {fmt(hb)} with the lr=50 silo, "
                         f"{'; '.join(parts)}. Bad silo: exit code {b['exit_code']}, {b['rollbacks']} rollbacks, "
                         f"{b['round_records']} round records; last log line: `{(b['log_tail'] or [''])[-1]}`")
    for code in ALL_CODES:
        r = results.get(("churn", code))
        if r:
            sp = ", ".join(f"{s['round']} ({s['models']} models, silos {s['silos']}; next round "
                           f"{_healed(s)})"
                           for s in r["splits"]) or "none"
            lines.append(f"\nchurn ({code}): rounds with > 1 model: {sp}")
            if r.get("splits_coarse") != r["splits"]:
                spc = ", ".join(f"{s['round']} ({s['models']}; next "
                                f"{_healed(s)})"
                                for s in r.get("splits_coarse", [])) or "none"
                lines.append(f"churn ({code}), up to float rounding (checksums within {CHECKSUM_TOL}): {spc}")
    return "\n".join(lines)


def load_results(results: Path, out_dir: Path | None = None) -> dict[tuple[str, str], dict]:
    """Stored results; with ``out_dir``, their figures are recomputed from the run dirs and stored again."""
    out = {}
    for name in ALL_SCENARIOS:
        for code in ALL_CODES:
            p = results / f"{name}-{code}.json"
            if p.is_file():
                out[(name, code)] = json.loads(p.read_text())
                if out_dir is not None and (out_dir / code / name).is_dir():
                    out[(name, code)] = reanalyze(out[(name, code)], out_dir / code / name)
                    kit.write_json(p, out[(name, code)])
    return out


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = kit.parser(__doc__, force=True, report_only=True, cap=900.0, corpus=str(kit.CORPUS),
                    out=str(REPO / "runs" / "one-model"), results=str(REPO / "bench" / "results" / "one_model"))
    ap.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, default=ALL_SCENARIOS)
    ap.add_argument("--code", nargs="+", choices=ALL_CODES, default=ALL_CODES)
    ap.add_argument("--new-ref", default="",
                    help="run --code new from this commit (a git worktree) instead of the working tree")
    ap.add_argument("--before-ref", default=BEFORE_COMMIT,
                    help="the commit --code before runs (a git worktree at /tmp/photon-before-REF)")
    ap.add_argument("--throttle-delay", type=float, default=0.0,
                    help="seconds the throttled silo sleeps per step (0 = one measured tiny step on 1 thread)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wrapped := kit.wrapped_silo(argv, "--throttled-peer", "one_model.py --throttled-peer DELAY -- ARGS"):
        return throttled_peer(float(wrapped[0]), wrapped[1])
    args = parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        todo = [(c, n) for c in args.code for n in args.scenarios
                if args.force or not (results / f"{n}-{c}.json").is_file()]
        if todo:
            val_dir = prepare_val(Path(args.corpus), out / "val")
            step_s = measure_step_s(out)
            delay = args.throttle_delay or step_s
            print(f"one_model: tiny step on 1 thread {step_s:.3f}s; throttled silo sleeps {delay:.3f}s/step",
                  flush=True)
        for code, name in todo:
            tree = code_tree(code, args.new_ref, args.before_ref)
            run_dir = out / code / name
            print(f"one_model: {name} / {code} ({tree})", flush=True)
            sw = Swarm(name, code, tree, run_dir, val_dir, delay)
            sw.run(args.cap)
            result = summarize(sw, step_s)
            kit.write_json(results / f"{name}-{code}.json", result)
            print(f"one_model: {name} / {code} done in {result['wall_s']:.0f}s: participation "
                  f"{result['participation']}, max distinct models {result['max_distinct']}", flush=True)
    table = markdown(load_results(results, out if args.report_only else None))
    (results / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    kit.run(main, "one_model")
