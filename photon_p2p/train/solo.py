"""Centralized (solo) training job: the single-silo run and the baseline federated runs are compared with."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from photon_p2p.checkpoint import (CheckpointError, CheckpointManager, Part, Stateful, checkpoint_path,
                                   load_checkpoint)
from photon_p2p.config import Config, dump_yaml, from_dict, to_dict
from photon_p2p.data import DataError
from photon_p2p.data.embedded import ensure_default_dataset
from photon_p2p.data.loader import TokenDataset
from photon_p2p.data.tokenizer import BUNDLED_TOKENIZER
from photon_p2p.metrics import MetricsLogger
from photon_p2p.model import architecture
from photon_p2p.observe import start_exporters
from photon_p2p.progress import Progress
from photon_p2p.train import distributed
from photon_p2p.train.trainer import LocalTrainer, Throughput, build_trainer


def resolve_data_dir(cfg: Config, run_dir: Path, progress: bool = True) -> Path:
    """The prepared data dir named in the config, or the embedded default prepared into the run dir."""
    if cfg.data.path:
        return Path(cfg.data.path)
    # Under torchrun rank 0 prepares it first; the others then find it (or, on another node, prepare their own).
    return distributed.in_turn(lambda: ensure_default_dataset(
        run_dir / "data", sources=cfg.data.sources or None, tokenizer=cfg.data.tokenizer or None,
        val_fraction=cfg.data.val_fraction, progress=progress and distributed.env().rank == 0))


def trainer_parts(trainer: LocalTrainer, cfg: Config) -> dict[str, Stateful]:
    """What a solo checkpoint holds (the daemon adds its global model and federation state): the config it ran
    with, the model (gathered from every rank's shard under torchrun), and the trainer (inner optimizer, schedule,
    data cursor)."""
    return {"config": Part(lambda: to_dict(cfg)),
            "model": Part(trainer.model_state_dict, trainer.load_model_state_dict),
            "trainer": trainer}


def resumable_checkpoint(cfg: Config, run_dir: Path) -> dict[str, Any] | None:
    """The run dir's checkpoint (None: a new run), checked against the model asked for before the run writes
    anything: another shape failed only in load_state_dict, after config.yaml had been rewritten to describe a
    model the checkpoint does not hold."""
    if not checkpoint_path(run_dir).exists():
        return None
    saved = load_checkpoint(run_dir)
    held, asked = architecture(from_dict(saved["config"]).model), architecture(cfg.model)
    differ = [f"model.{k}: {held[k]} in the checkpoint, {asked[k]} asked for" for k in held if held[k] != asked[k]]
    if differ:
        raise CheckpointError(f"run dir {run_dir} holds a checkpoint of a different model ({'; '.join(differ)}): "
                              "resume it with the model it was trained with, or give the new one a new run dir")
    return saved


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """The run dir and its config.yaml, once the data, the model and any checkpoint have passed every check: a
    mistake leaves the run dir as it was (or absent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def run_follower(cfg: Config, peer: str | int) -> int:
    """Ranks 1..N-1 of a torchrun silo (`train` and `run` alike): build the same trainer, then do what rank 0
    announces until it stops (train/distributed.py). ``peer`` must be rank 0's data seed name."""
    data_dir = resolve_data_dir(cfg, Path(cfg.run_dir), progress=False)
    trainer = build_trainer(cfg, str(data_dir), peer=peer)
    return distributed.follow(trainer.collectives)


def run_solo(cfg: Config, stop: threading.Event | None = None, progress: bool = True) -> dict[str, float]:
    """Train to ``train.max_steps``, resuming from RUN_DIR/checkpoint.pt when present; returns the last eval."""
    stop = stop or threading.Event()
    run_dir = Path(cfg.run_dir)
    saved = resumable_checkpoint(cfg, run_dir)
    data_dir = resolve_data_dir(cfg, run_dir, progress)
    trainer = build_trainer(cfg, str(data_dir))
    checkpoint = CheckpointManager(run_dir, trainer_parts(trainer, cfg))
    if saved is not None:
        checkpoint.restore(saved)
    write_run_config(cfg, run_dir)
    metrics = MetricsLogger(run_dir)
    t = cfg.train
    rate = Throughput()
    rate.tokens0 = trainer.tokens
    last_eval: dict[str, float] = {}
    tokens_per_s = 0.0

    def snapshot() -> dict[str, Any]:  # what observe.prometheus_port serves (the daemon serves its heartbeat)
        return {"round": 0, "local_step": trainer.step, "tokens": trainer.tokens, "loss": trainer.last_loss,
                "val_ppl": last_eval.get("val_ppl", -1.0), "tokens_per_s": tokens_per_s}

    # Off a terminal the bar becomes one plain line per log_every steps (see progress.py).
    bar = Progress(t.max_steps, cfg.name, initial=trainer.step, enabled=progress, every=t.log_every)
    with start_exporters(cfg, snapshot, run_dir):
        while trainer.step < t.max_steps and not stop.is_set():
            loss = trainer.train_step()
            step = trainer.step
            if step % t.log_every == 0 or step == t.max_steps:
                tokens_per_s = rate.update(trainer.tokens)
                metrics.log("step", step=step, tokens=trainer.tokens, loss=loss,
                            lr=trainer.optimizer.param_groups[0]["lr"], tokens_per_s=tokens_per_s)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)  # after the postfix, so a plain line carries this step's loss
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                last_eval = trainer.evaluate()
                if last_eval:
                    metrics.log("eval", step=step, tokens=trainer.tokens, **last_eval)
                    bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, ppl {last_eval['val_ppl']:.2f}")
            if step % t.checkpoint_every == 0:
                checkpoint.save()
        bar.close()
    # Always leave a checkpoint of where we stopped, so an interrupted run resumes exactly.
    checkpoint.save()
    return {"step": trainer.step, "tokens": trainer.tokens, "loss": trainer.last_loss, **last_eval}


def load_model_from_run(run_dir: str | Path) -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """Config + model (global weights where the run is federated) from a run directory's checkpoint."""
    from photon_p2p.model import Transformer

    state = load_checkpoint(run_dir)
    cfg = from_dict(state["config"])
    model = Transformer(cfg.model)
    model.load_state_dict(state.get("global_model", state["model"]))
    return cfg, model, state


def default_data_dir(run_dir: str | Path) -> Path:
    """The data a run prepared for itself (the embedded default) under RUN_DIR/data."""
    candidates = sorted(Path(run_dir, "data").glob("*/manifest.json"))
    if not candidates:
        raise FileNotFoundError(f"no prepared data under {run_dir}/data; pass --data DIR")
    return candidates[0].parent


def run_tokenizer_path(cfg: Config, run_dir: str | Path) -> Path:
    """The tokenizer a run's data was prepared with; the bundled one when that data is gone."""
    try:
        return TokenDataset(cfg.data.path or default_data_dir(run_dir)).tokenizer_path
    except (FileNotFoundError, DataError):
        return BUNDLED_TOKENIZER
