#!/usr/bin/env python
"""One GPU: bf16 tokens/s and MFU of LocalTrainer vs a bare torch loop of the same model (torch.compile off and
on, interleaved in one run), peak memory, and the largest preset that trains with FSDP2 + activation checkpointing.

Usage (GPU):  python bench/gpu_throughput.py --configs photon-125m photon-1.3b --micro-batch 8 --out gpu.json
Smoke (CPU):  python bench/gpu_throughput.py --smoke --out smoke.json   (tiny preset, 2 steps, fp32, gloo)
Prints one JSON document (and writes it to --out): per config and compile setting, both rates, their ratio
(goal: trainer >= 0.97x bare), MFU against the GPU's dense bf16 peak, peak memory; then the FSDP2+AC probe.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from photon_p2p.config import load_config  # noqa: E402
from photon_p2p.data.embedded import ensure_default_dataset  # noqa: E402
from photon_p2p.model import Transformer, count_params, flops_per_token  # noqa: E402
from photon_p2p.train import distributed  # noqa: E402
from photon_p2p.train.device import autocast  # noqa: E402
from photon_p2p.train.trainer import build_trainer  # noqa: E402

# dense bf16 peak FLOP/s (vendor datasheets, SXM parts); MFU is reported only for a GPU named here
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
PROBE_PRESETS = ["photon-125m", "photon-1.3b", "photon-3b", "photon-7b"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def bare_loop(cfg, steps: int, warmup: int) -> tuple[float, float | None]:
    """The reference: the same model and AdamW, random tokens already on the device, nothing else."""
    device = _device()
    _fresh(device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if t.compile else model
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, cfg.model.seq_len + 1), device=device)

    def step() -> None:
        with autocast(t, device):
            logits, _ = fwd(x[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = _timed(step, steps, warmup, device)
    peak = _peak_gib(device)
    return t.batch_size * cfg.model.seq_len / s, peak


def trainer_loop(cfg, data_dir: str, steps: int, warmup: int) -> tuple[float, float | None]:
    device = _device()
    _fresh(device)
    trainer = build_trainer(cfg, data_dir)
    s = _timed(trainer.train_step, steps, warmup, trainer.device)
    peak = _peak_gib(trainer.device)
    del trainer
    return cfg.train.batch_size * cfg.model.seq_len / s, peak


def _mfu(tok_s: float, cfg) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return round(tok_s * flops_per_token(cfg.model) / peak, 3) if peak else None


def throughput(preset: str, overrides: list[str], data_dir: str, args) -> list[dict]:
    rows = []
    for compile_ in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
        cfg = load_config([preset], [*overrides, f"train.compile={str(compile_).lower()}"])
        ours, bare, peaks = [], [], {}
        for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
            b, peaks["bare"] = bare_loop(cfg, args.steps, args.warmup)
            o, peaks["trainer"] = trainer_loop(cfg, data_dir, args.steps, args.warmup)
            bare.append(b)
            ours.append(o)
        o, b = statistics.median(ours), statistics.median(bare)
        rows.append({"config": preset, "params": count_params(cfg.model), "compile": compile_,
                     "micro_batch": cfg.train.batch_size, "seq_len": cfg.model.seq_len,
                     "trainer_tok_s": round(o), "bare_tok_s": round(b), "ratio": round(o / b, 3),
                     "trainer_mfu": _mfu(o, cfg), "bare_mfu": _mfu(b, cfg),
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
        device = _device()
        _fresh(device)
        row: dict = {"config": preset, "params": count_params(cfg.model), "parallel": "fsdp+ac"}
        try:
            trainer = build_trainer(cfg, data_dir)
            s = _timed(trainer.train_step, steps, 1, trainer.device)
            row.update(status="ok", tok_s=round(trainer.tokens_per_step / s), peak_gib=_peak_gib(device),
                       mfu=_mfu(trainer.tokens_per_step / s, cfg), loss=round(trainer.last_loss, 4))
            del trainer
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom", peak_gib=_peak_gib(device))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if row["status"] == "oom":
            break
    distributed.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
