#!/usr/bin/env python
"""One GPU: bf16 tokens/s and MFU of LocalTrainer vs a bare torch loop of the same model (torch.compile off and
on, interleaved in one run), peak memory, and the largest preset that trains with FSDP2 + activation checkpointing.

Usage (GPU):  python bench/gpu_throughput.py --configs photon-125m photon-1.3b --micro-batch 8 --out gpu.json
Smoke (CPU):  python bench/gpu_throughput.py --smoke --out smoke.json   (tiny preset, 2 steps, fp32, gloo)
Prints one JSON document (and writes it to --out): per config and compile setting, both rates, their ratio
(goal: trainer >= 0.97x bare), MFU against the GPU's dense bf16 peak, peak memory; then the FSDP2+AC probe.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import toolkit as kit
from photon_p2p.config import load_config
from photon_p2p.data.embedded import ensure_default_dataset
from photon_p2p.model import count_params
from photon_p2p.train import distributed
from photon_p2p.train.trainer import build_trainer

PROBE_PRESETS = ["photon-125m", "photon-1.3b", "photon-3b", "photon-7b"]


def throughput(preset: str, overrides: list[str], data_dir: str, args) -> list[dict]:  # noqa: ANN001
    rows = []
    for compile_ in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
        cfg = load_config([preset], [*overrides, f"train.compile={str(compile_).lower()}"])
        ours, bare, peaks = [], [], {}
        for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
            b, peaks["bare"] = kit.bare_rate(cfg, args.steps, args.warmup)
            o, peaks["trainer"] = kit.trainer_rate(cfg, data_dir, args.steps, args.warmup)
            bare.append(b)
            ours.append(o)
        o, b = statistics.median(ours), statistics.median(bare)
        rows.append({"config": preset, "params": count_params(cfg.model), "compile": compile_,
                     "micro_batch": cfg.train.batch_size, "seq_len": cfg.model.seq_len,
                     "trainer_tok_s": round(o), "bare_tok_s": round(b), "ratio": round(o / b, 3),
                     "trainer_mfu": kit.mfu(o, cfg), "bare_mfu": kit.mfu(b, cfg),
                     "trainer_peak_gib": peaks["trainer"], "bare_peak_gib": peaks["bare"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def fsdp_probe(presets: list[str], overrides: list[str], data_dir: str, steps: int) -> list[dict]:
    """Each preset with FSDP2 + activation checkpointing on this one device (a 1-rank process group), smallest
    first, until one does not fit: 'ok' with tokens/s and peak memory, or 'oom'."""
    if not distributed.launched_by_torchrun():  # a 1-rank group of our own, as torchrun --nproc-per-node 1 would
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    rows = []
    for preset in presets:
        cfg = load_config([preset], [*overrides, "train.parallel=fsdp", "train.activation_checkpointing=true"])
        distributed.init_distributed(cfg.train)
        dev = kit.device()
        kit.fresh(dev)
        row: dict = {"config": preset, "params": count_params(cfg.model), "parallel": "fsdp+ac"}
        try:
            trainer = build_trainer(cfg, data_dir)
            s = kit.timed(trainer.train_step, steps, 1, trainer.device)
            row.update(status="ok", tok_s=round(trainer.tokens_per_step / s), peak_gib=kit.peak_gib(dev),
                       mfu=kit.mfu(trainer.tokens_per_step / s, cfg), loss=round(trainer.last_loss, 4))
            del trainer
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom", peak_gib=kit.peak_gib(dev))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if row["status"] == "oom":
            break
    distributed.shutdown()
    return rows


def main() -> None:
    ap = kit.parser(__doc__)
    ap.add_argument("--configs", nargs="+", default=["photon-125m", "photon-1.3b"])
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per step (no accumulation)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--probe", nargs="*", default=PROBE_PRESETS, help="presets for the FSDP2+AC probe")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both", help="torch.compile settings")
    ap.add_argument("--smoke", action="store_true", help="CPU check of every code path: tiny preset, 2 steps")
    ap.add_argument("--out", help="also write the JSON document here")
    args = ap.parse_args()
    common = [f"train.batch_size={args.micro_batch}", "train.grad_accum=1", "train.eval_every=0", *args.overrides]
    if args.smoke:
        args.configs, args.probe = ["tiny"], ["tiny"]
        args.steps, args.warmup, args.repeats = 2, 1, 1
        common = ["train.batch_size=2", "train.grad_accum=1", "train.eval_every=0", "model.seq_len=32",
                  *args.overrides]
    elif not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA device; use --smoke for a CPU check of the code paths")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(ensure_default_dataset(tmp, ["kjv"], progress=False))
        rows = [r for preset in args.configs for r in throughput(preset, common, data_dir, args)]
        probe = fsdp_probe(args.probe, common, data_dir, args.steps) if args.probe else []
    fits = [r["config"] for r in probe if r["status"] == "ok"]
    doc = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "smoke": args.smoke, "throughput": rows, "fsdp_probe": probe,
           "largest_fsdp_ac_preset": fits[-1] if fits else None}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
