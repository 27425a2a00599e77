"""`photon-peer` command line: parse arguments and wire modules together; no logic of its own."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user gave bad input': printed as one line, never as a traceback."""
    from photon_p2p.checkpoint import CheckpointError
    from photon_p2p.config import ConfigError
    from photon_p2p.data import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError, CheckpointError, FileNotFoundError]
    try:
        from photon_p2p.federation import FederationError

        errors.append(FederationError)
    except ImportError:  # federation extras missing: the training half still works
        pass
    return tuple(errors)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[], metavar="YAML",
                   help="preset name (tiny, photon-125m, ...) or YAML file; repeat to overlay (later wins)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: config run_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _load_config(args: argparse.Namespace, extra: list[str] | None = None):
    from photon_p2p.config import load_config

    overrides = list(args.overrides) + list(extra or [])
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config or ["tiny"], overrides)


def _graceful_stop() -> threading.Event:
    """First SIGINT/SIGTERM asks the job to stop cleanly (checkpoint, leave); a second one exits at once."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            print("\nphoton-peer: second signal, exiting now", file=sys.stderr)
            import os

            os._exit(130)
        stop.set()
        print(f"\nphoton-peer: {signal.Signals(signum).name} received, finishing up (again to force)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_train(args: argparse.Namespace) -> int:
    from photon_p2p.train.solo import run_solo

    cfg = _load_config(args)
    result = run_solo(cfg, stop=_graceful_stop(), progress=not args.no_progress)
    print(json.dumps({"run_dir": cfg.run_dir, **result}))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from photon_p2p.data.prepare import prepare

    manifest = prepare(args.input, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       progress=not args.no_progress)
    train = sum(s["tokens"] for s in manifest["train"])
    val = sum(s["tokens"] for s in manifest["val"])
    print(f"prepared {train:,} training and {val:,} validation tokens in {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from photon_p2p.data.loader import TokenDataset
    from photon_p2p.train.solo import load_model_from_run
    from photon_p2p.train.trainer import LocalTrainer

    cfg, model, _ = load_model_from_run(args.run_dir)
    if args.batches:
        cfg.train.eval_batches = args.batches
    data_dir = args.data or cfg.data.path or str(_default_data_dir(args.run_dir))
    val = TokenDataset(data_dir, "val")
    trainer = LocalTrainer(cfg, model, TokenDataset(data_dir, "train"), val)
    print(json.dumps(trainer.evaluate()))
    return 0


def _default_data_dir(run_dir: str) -> Path:
    candidates = sorted(Path(run_dir, "data").glob("*/manifest.json"))
    if not candidates:
        raise FileNotFoundError(f"no prepared data under {run_dir}/data; pass --data DIR")
    return candidates[0].parent


def cmd_export(args: argparse.Namespace) -> int:
    from photon_p2p.data.loader import TokenDataset
    from photon_p2p.data.tokenizer import BUNDLED_TOKENIZER
    from photon_p2p.export import export_hf
    from photon_p2p.train.solo import load_model_from_run

    cfg, model, _ = load_model_from_run(args.run_dir)
    tokenizer = args.tokenizer
    if not tokenizer:
        try:
            tokenizer = str(TokenDataset(cfg.data.path or _default_data_dir(args.run_dir)).tokenizer_path)
        except (FileNotFoundError, ValueError):
            tokenizer = str(BUNDLED_TOKENIZER)
    out = export_hf(model.state_dict(), cfg.model, tokenizer, args.out)
    print(f"exported LlamaForCausalLM to {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from photon_p2p.metrics import plot_run

    out = args.out or str(Path(args.run_dir[0]) / "metrics.png")
    print(f"wrote {plot_run(args.run_dir, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from photon_p2p import __version__

    parser = argparse.ArgumentParser(prog="photon-peer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"photon_p2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("train", help="centralized (solo) training run: the single-silo baseline")
    _add_config_args(p)
    commands["train"] = cmd_train

    p = sub.add_parser("prepare-data", help="tokenize .txt/.jsonl/.parquet files into token shards")
    p.add_argument("--input", "-i", nargs="+", required=True, help="files or directories")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the bundled 8k byte-level BPE)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--no-progress", action="store_true")
    commands["prepare-data"] = cmd_prepare

    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--data", help="prepared data dir (default: the run's)")
    p.add_argument("--batches", type=int, default=0, help="validation batches (default: config)")
    commands["eval"] = cmd_eval

    p = sub.add_parser("export", help="write a Hugging Face LlamaForCausalLM folder from a run")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one the data was prepared with)")
    commands["export"] = cmd_export

    p = sub.add_parser("plot", help="PNG of training loss and validation perplexity")
    p.add_argument("run_dir", nargs="+")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png)")
    commands["plot"] = cmd_plot

    try:
        from photon_p2p.cli_peer import add_peer_commands
    except ImportError:
        pass
    else:
        add_peer_commands(sub, commands, _add_config_args)
    parser.set_defaults(_commands=commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._commands[args.command](args)
    except _user_errors() as e:
        print(f"photon-peer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("photon-peer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
