#!/usr/bin/env python
"""Tokens/s of LocalTrainer against a reference, the two interleaved in one run so machine noise hits both alike:
a bare torch loop of the same model, batch and optimizer (the default; goal: trainer >= 0.97x bare), or, with
--ref REF, LocalTrainer as it was at commit REF (CPU, 1 thread; until 2026-12-08 bench/trainer_ab.py).

Usage: python bench/trainer_throughput.py [--config tiny] [--steps 30] [--repeats 3] [--set KEY=VALUE ...]
       python bench/trainer_throughput.py --ref b6e783d [--config tiny] [--steps 10] [--repeats 3]
Both train on the embedded kjv data. Prints one JSON line with both medians and their ratio (this checkout's
trainer / the reference); with --ref, every sample too.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import toolkit as kit
from photon_p2p.config import load_config
from photon_p2p.data.embedded import ensure_default_dataset


def against_bare(args, data_dir: str) -> dict:  # noqa: ANN001
    cfg = load_config([args.config], args.overrides)
    ours, bare = [], []
    for _ in range(args.repeats):
        bare.append(kit.bare_rate(cfg, args.steps, 3)[0])
        ours.append(kit.trainer_rate(cfg, data_dir, args.steps, 3)[0])
    o, b = statistics.median(ours), statistics.median(bare)
    out = {"config": args.config, "overrides": args.overrides, "device": kit.device().type,
           "threads": torch.get_num_threads(), "trainer_tok_s": round(o), "bare_tok_s": round(b),
           "ratio": round(o / b, 3)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        if kit.mfu(o, cfg) is not None:
            out["mfu"] = kit.mfu(o, cfg)
    return out


def rate(root: str, config: str, data_dir: str, steps: int) -> float:
    """Tokens/s of photon_p2p's trainer imported from ``root`` (dropping any photon_p2p imported before)."""
    for name in [m for m in sys.modules if m == "photon_p2p" or m.startswith("photon_p2p.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        from photon_p2p.config import load_config
        from photon_p2p.train.trainer import build_trainer
    finally:
        sys.path.remove(root)
    trainer = build_trainer(load_config([config], ["train.eval_every=0"]), data_dir)
    return trainer.tokens_per_step / kit.timed(trainer.train_step, steps, 2, trainer.device)


def against_ref(args, data_dir: str, ref_root: Path) -> dict:  # noqa: ANN001
    torch.set_num_threads(1)
    ref_root.mkdir()
    archive = subprocess.run(["git", "-C", str(kit.REPO), "archive", args.ref, "photon_p2p"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(ref_root)], input=archive, check=True)
    samples: dict[str, list[float]] = {"ref": [], "this": []}
    for _ in range(args.repeats):
        samples["ref"].append(rate(str(ref_root), args.config, data_dir, args.steps))
        samples["this"].append(rate(str(kit.REPO), args.config, data_dir, args.steps))
    ref, this = statistics.median(samples["ref"]), statistics.median(samples["this"])
    return {"config": args.config, "ref": args.ref, "ref_tok_s": round(ref), "this_tok_s": round(this),
            "ratio": round(this / ref, 3), "samples": {k: [round(v) for v in vs] for k, vs in samples.items()}}


def main() -> None:
    ap = kit.parser(__doc__, set="overrides")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--ref", help="git commit of the reference trainer (instead of the bare loop; no --set)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.ref and args.overrides:
        ap.error("--set applies to the bare-loop comparison only")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(ensure_default_dataset(Path(tmp, "data"), ["kjv"], progress=False))
        print(json.dumps(against_ref(args, data_dir, Path(tmp, "ref")) if args.ref else against_bare(args, data_dir)))


if __name__ == "__main__":
    main()
