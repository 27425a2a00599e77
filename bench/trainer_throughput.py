#!/usr/bin/env python
"""Tokens/s of LocalTrainer vs a bare torch loop (same model, batch, optimizer), interleaved in one run.

Usage: python bench/trainer_throughput.py [--config tiny] [--steps 30] [--repeats 3] [--set KEY=VALUE ...]
Prints one JSON line per config with both rates and their ratio (goal: trainer >= 0.97x bare).
"""

from __future__ import annotations

import json
import statistics
import tempfile

import torch

import toolkit as kit
from photon_p2p.config import load_config
from photon_p2p.data.embedded import ensure_default_dataset


def main() -> None:
    ap = kit.parser(__doc__, set="overrides")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config([args.config], args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(ensure_default_dataset(tmp, ["kjv"], progress=False))
        ours, bare = [], []
        for _ in range(args.repeats):  # interleave so machine noise hits both sides alike
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
