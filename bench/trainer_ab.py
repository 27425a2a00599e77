#!/usr/bin/env python
"""Tokens/s of LocalTrainer at a reference commit vs this checkout, interleaved in one process (CPU, 1 thread).

Usage: python bench/trainer_ab.py --ref b6e783d [--config tiny] [--steps 10] [--repeats 3]
Both versions train the same config on the embedded kjv data, alternating, so machine noise hits both alike;
prints one JSON line with both medians, every sample and their ratio (this checkout / reference).
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


def main() -> None:
    ap = kit.parser(__doc__)
    ap.add_argument("--ref", required=True, help="git commit of the reference trainer")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ref_root = Path(tmp, "ref")
        ref_root.mkdir()
        archive = subprocess.run(["git", "-C", str(kit.REPO), "archive", args.ref, "photon_p2p"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", str(ref_root)], input=archive, check=True)
        from photon_p2p.data.embedded import ensure_default_dataset

        data_dir = str(ensure_default_dataset(Path(tmp, "data"), ["kjv"], progress=False))
        samples: dict[str, list[float]] = {"ref": [], "this": []}
        for _ in range(args.repeats):
            samples["ref"].append(rate(str(ref_root), args.config, data_dir, args.steps))
            samples["this"].append(rate(str(kit.REPO), args.config, data_dir, args.steps))
    ref, this = statistics.median(samples["ref"]), statistics.median(samples["this"])
    print(json.dumps({"config": args.config, "ref": args.ref, "ref_tok_s": round(ref), "this_tok_s": round(this),
                      "ratio": round(this / ref, 3),
                      "samples": {k: [round(v) for v in vs] for k, vs in samples.items()}}))


if __name__ == "__main__":
    main()
