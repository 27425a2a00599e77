"""`photon-peer` command line: parse arguments and wire modules together; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

# Exception types that mean "the user gave bad input": printed as one line, never as a traceback.
USER_ERRORS = {"photon_p2p.config": "ConfigError", "photon_p2p.data": "DataError",
               "photon_p2p.checkpoint": "CheckpointError", "photon_p2p.federation": "FederationError",
               "photon_p2p.metrics": "MetricsError", "photon_p2p.credentials": "CredentialError",
               "photon_p2p.paths": "PathError"}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The USER_ERRORS of modules already imported: one never loaded cannot have raised, and importing it here
    (checkpoint.py pulls in torch) would add seconds before a config mistake is printed."""
    loaded = [getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules]
    return (*loaded, FileNotFoundError)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[], metavar="YAML",
                   help="preset name (tiny, photon-125m, ...) or YAML file; repeat to overlay (later wins)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: config run_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _load_config(args: argparse.Namespace, extra: list[str] | None = None):
    from photon_p2p.config import load_config
    from photon_p2p.paths import writable_dir

    overrides = list(args.overrides) + list(extra or [])
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_config(args.config or ["tiny"], overrides)
    # train and run write everything there: a file or a read-only dir fails now, not at the first checkpoint
    writable_dir(cfg.run_dir, "run dir")
    return cfg


def _graceful_stop(deadline: float | None = None) -> threading.Event:
    """First SIGINT/SIGTERM asks the job to stop cleanly (checkpoint, leave); a second one exits at once, and so
    does a stop still unfinished after ``deadline`` seconds (a watchdog: nothing waits forever)."""
    stop = threading.Event()

    def force(why: str, code: int) -> None:
        print(f"\nphoton-peer: {why}, exiting now (the last complete checkpoint is kept)", file=sys.stderr,
              flush=True)
        os._exit(code)

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            force("second signal", 130)
        stop.set()
        print(f"\nphoton-peer: {signal.Signals(signum).name} received, finishing up (again to force)", file=sys.stderr)
        if deadline:
            timer = threading.Timer(deadline, force, (f"still stopping after {deadline:g}s "
                                                      "(federation.stop_timeout)", 1))
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _on_ranks(cfg, peer: str | int, lead: Callable[[], dict]) -> int:
    """Under torchrun only rank 0 runs ``lead`` (the solo loop or the daemon: the swarm peer); the other ranks
    follow it step for step (train/distributed.py). One process: just ``lead``."""
    from photon_p2p.train import distributed

    env = distributed.init_distributed(cfg.train)
    try:
        if env.follows:
            from photon_p2p.train.solo import run_follower

            run_follower(cfg, peer)
            return 0
        result = lead()
    except BaseException as e:
        # the traceback's frames hold the trainer and so the process group: free them before shutdown destroys it
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        distributed.shutdown()  # rank 0 releases its followers even when it failed
    print(json.dumps({"run_dir": cfg.run_dir, **result}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # before the heavy imports: a config mistake is reported at once
    from photon_p2p.train.solo import run_solo

    return _on_ranks(cfg, 0, lambda: run_solo(cfg, stop=_graceful_stop(), progress=not args.no_progress))


def cmd_prepare(args: argparse.Namespace) -> int:
    from photon_p2p.config import check_value

    check_value("data.val_fraction", args.val_fraction, "--val-fraction")
    from photon_p2p.data.prepare import prepare

    manifest = prepare(args.input, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       progress=not args.no_progress)
    train = sum(s["tokens"] for s in manifest["train"])
    val = sum(s["tokens"] for s in manifest["val"])
    print(f"prepared {train:,} training and {val:,} validation tokens in {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from photon_p2p.config import check_value

    check_value("train.eval_batches", args.batches, "--batches")  # None: the run's own
    from photon_p2p.data.loader import TokenDataset
    from photon_p2p.train.solo import default_data_dir, load_model_from_run
    from photon_p2p.train.trainer import LocalTrainer

    cfg, model, _ = load_model_from_run(args.run_dir)
    if args.batches is not None:
        cfg.train.eval_batches = args.batches
    data_dir = args.data or cfg.data.path or str(default_data_dir(args.run_dir))
    val = TokenDataset(data_dir, "val")
    trainer = LocalTrainer(cfg, model, TokenDataset(data_dir, "train"), val)
    print(json.dumps(trainer.evaluate()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from photon_p2p.paths import existing_file, writable_dir

    writable_dir(args.out, "--out")  # before the checkpoint is read
    if args.tokenizer:  # before the weights are written: a missing one left a half-written export
        existing_file(args.tokenizer, "--tokenizer")
    from photon_p2p.export import export_hf
    from photon_p2p.train.solo import load_model_from_run, run_tokenizer_path

    cfg, model, _ = load_model_from_run(args.run_dir)
    tokenizer = args.tokenizer or str(run_tokenizer_path(cfg, args.run_dir))
    out = export_hf(model.state_dict(), cfg.model, tokenizer, args.out)
    print(f"exported LlamaForCausalLM to {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from photon_p2p.sample import sample_run

    print(sample_run(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed, tokenizer=args.tokenizer, device=args.device))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from photon_p2p.metrics import plot_run

    out = args.out or str(Path(args.run_dir[0]) / "metrics.png")
    print(f"wrote {plot_run(args.run_dir, out)}")
    return 0


def _add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="any running peer's multiaddr")
    p.add_argument("--identity", help="identity file (created if missing): keeps the peer id across restarts")
    p.add_argument("--host-maddrs", nargs="+", metavar="MADDR", help="listen addresses")
    p.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", help="addresses other peers should dial")


def _log_to_stderr(level: str) -> None:
    """photon_p2p's logger (not hivemind's, which has its own handler) on stderr, timestamped to the ms."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("photon_p2p")
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    extra = []
    for flag, key in (("initial_peers", "network.initial_peers"), ("host_maddrs", "network.host_maddrs"),
                      ("announce_maddrs", "network.announce_maddrs")):
        if getattr(args, flag):
            extra.append(f"{key}={json.dumps(getattr(args, flag))}")
    for flag, key in (("identity", "network.identity_path"), ("run_id", "federation.run_id"),
                      ("data", "data.path"), ("swarm_owner_key", "federation.swarm_owner_key"),
                      ("token", "federation.admission_token")):
        if getattr(args, flag):
            extra.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.client_mode:
        extra.append("network.client_mode=true")
    if args.helper:
        extra.append("federation.helper=true")
    cfg = _load_config(args, extra)  # every check (identity file, addresses, ranges) before hivemind is imported
    _log_to_stderr(args.log_level)
    from photon_p2p.daemon import PeerDaemon

    # the daemon's data seed is the silo's name (PeerDaemon._setup_training): its followers draw the same windows
    return _on_ranks(cfg, cfg.name, lambda: PeerDaemon(cfg, stop=_graceful_stop(cfg.federation.stop_timeout),
                                                        progress=not args.no_progress).run())


def cmd_status(args: argparse.Namespace) -> int:
    from photon_p2p.config import NetworkConfig, check_value, validate_network

    check_value("network.bootstrap_timeout", args.timeout, "--timeout")
    check_value("federation.run_id", args.run_id, "--run-id")
    net = NetworkConfig(initial_peers=args.initial_peers, bootstrap_timeout=args.timeout)
    validate_network(net)
    from photon_p2p.status import run_status

    owner = None
    if args.swarm_owner_key:
        from photon_p2p.credentials import load_owner_public, public_bytes

        owner = public_bytes(load_owner_public(args.swarm_owner_key))
    return run_status(net, args.run_id, as_json=args.json, watch=args.watch, owner_public=owner, wide=args.wide)


def cmd_swarm_key(args: argparse.Namespace) -> int:
    from photon_p2p.credentials import create_owner_key

    priv, pub, fp = create_owner_key(args.out)
    print(f"swarm owner key {fp}: private {priv} (keep it off the peers), public {pub}\n"
          f"peers run with --swarm-owner-key {pub}; admit each with: photon-peer admit --key {priv} "
          "--peer-id PEER_ID -o PEER.token")
    return 0


def cmd_peer_id(args: argparse.Namespace) -> int:
    from pathlib import Path

    from photon_p2p.config import check_identity_file
    from photon_p2p.credentials import create_identity, peer_id_of_identity

    if Path(args.identity).expanduser().exists():
        check_identity_file(args.identity)  # a file that is not a key: the same one-line error as `run`
        print(peer_id_of_identity(args.identity))
    else:
        peer_id = create_identity(args.identity)
        print(peer_id)
        print(f"photon-peer: created identity {args.identity}", file=sys.stderr)
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    from photon_p2p.credentials import (CredentialError, check_peer_id, load_owner_private, make_token,
                                        parse_duration, verify)

    valid_for = parse_duration(args.expires)
    check_peer_id(args.peer_id)
    if bool(args.run_id) == bool(args.any_run):
        # a token to every run the key closes is a conscious choice: one owner key often closes several runs
        raise CredentialError("name the run this peer may join with --run-id RUN (repeat it for several), or pass "
                              "--any-run for every run this owner key closes" if not args.run_id else
                              "--run-id and --any-run exclude each other")
    runs = _run_ids(args)
    key = load_owner_private(args.key)
    token = make_token(key, args.peer_id, valid_for, runs=runs)
    grant = verify(token, key.public_key())
    from photon_p2p.paths import output_file

    # -o pointed at the owner key or an identity by a slip would otherwise lose it for good
    out = output_file(args.out, "--out", replace=args.force, hint=" (pass --force to replace a token)")
    try:
        # "x" creates, never truncates: a file that appears meanwhile is not lost either
        with open(out, "w" if args.force else "x") as f:
            f.write(token + "\n")
    except FileExistsError:
        raise CredentialError(f"{out} already exists: refusing to overwrite it (pass --force to replace a token)")
    except OSError as e:
        raise CredentialError(f"cannot write {out}: {e.strerror or e}") from None
    import time

    runs = f"run(s) {', '.join(grant.runs)}" if grant.runs else "every run of this owner key"
    print(f"admitted {grant.peer_id} to {runs} until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(grant.until))}: wrote {out} (the peer runs with "
          f"--token {out})")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from photon_p2p.config import NetworkConfig, check_value, validate_network
    from photon_p2p.credentials import check_peer_id, load_owner_private, parse_duration

    check_value("network.bootstrap_timeout", args.timeout, "--timeout")
    valid_for = parse_duration(args.expires)
    check_peer_id(args.peer_id)
    key = load_owner_private(args.key)
    net = NetworkConfig(initial_peers=args.initial_peers, bootstrap_timeout=args.timeout)
    validate_network(net)
    from photon_p2p.federation.admission import revoke_via

    fp, grant, token = revoke_via(net, key, args.peer_id, valid_for)
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(grant.until))
    outlasts = ", past its token's expiry" if token is not None and grant.until > token.until else ""
    print(f"revoked {args.peer_id} in swarm {fp} until {until}{outlasts}: admitted peers refuse it from their "
          "next round on")
    return 0


def _run_ids(args: argparse.Namespace) -> list[str]:
    """The repeatable --run-id of admit and bootstrap, each checked as federation.run_id is."""
    from photon_p2p.config import check_value

    return [check_value("federation.run_id", run, "--run-id") for run in args.run_id or []]


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from photon_p2p.config import NetworkConfig, validate_network

    net = NetworkConfig(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
                        announce_maddrs=args.announce_maddrs, identity_path=args.identity or "")
    validate_network(net)  # a garbage identity file or address fails here, not inside p2pd
    runs = _run_ids(args)
    owner = None
    if args.swarm_owner_key:
        from photon_p2p.credentials import load_owner_public, public_bytes

        owner = public_bytes(load_owner_public(args.swarm_owner_key))
    from photon_p2p.bootstrap import run_bootstrap

    return run_bootstrap(net, stop=_graceful_stop(), runs=runs, owner_public=owner)


def build_parser() -> argparse.ArgumentParser:
    from photon_p2p import __version__

    parser = argparse.ArgumentParser(prog="photon-peer", description="photon_p2p: serverless federated LLM pre-training (Photon recipe over a hivemind DHT)")
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
    p.add_argument("--batches", type=int, help="validation batches (default: the run's train.eval_batches)")
    commands["eval"] = cmd_eval

    p = sub.add_parser("export", help="write a Hugging Face LlamaForCausalLM folder from a run")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one the data was prepared with)")
    commands["export"] = cmd_export

    p = sub.add_parser("sample", help="generate text from a run's checkpoint (a federated run: the swarm's model)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", "-p", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (always the most likely token)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the run's data was prepared with)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    commands["sample"] = cmd_sample

    p = sub.add_parser("plot", help="PNG of training loss and validation perplexity")
    p.add_argument("run_dir", nargs="+")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png)")
    commands["plot"] = cmd_plot

    p = sub.add_parser("run", help="run a silo: train locally and average with the swarm every round")
    _add_config_args(p)
    _add_network_args(p)
    p.add_argument("--run-id", help="swarm/experiment id: peers only average with the same run id")
    p.add_argument("--data", help="prepared data dir (photon-peer prepare-data); default: embedded corpus")
    p.add_argument("--client-mode", action="store_true",
                   help="behind NAT: accept no incoming connections (still trains and averages)")
    p.add_argument("--helper", action="store_true",
                   help="an averaging helper on a reachable machine: trains nothing, joins every round with weight "
                        "0 so that rounds of client-mode volunteers have a leader, a reducer and a state server")
    p.add_argument("--swarm-owner-key", metavar="PUB", help="closed swarm: the owner's public key file")
    p.add_argument("--token", metavar="FILE", help="closed swarm: this peer's admission token (photon-peer admit)")
    p.add_argument("--log-level", choices=["warning", "info", "debug"], default="warning",
                   help="photon_p2p's own log lines on stderr (info: matchmaking attempts, regrouping, syncs)")
    commands["run"] = cmd_run

    p = sub.add_parser("status", help="show a swarm's peers from their DHT heartbeats (read-only)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--run-id", default="photon")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    p.add_argument("--wide", action="store_true",
                   help="every column (addresses, lag, clipping, tokens, silos); the default fits 80 columns")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to reach the swarm")
    p.add_argument("--swarm-owner-key", metavar="PUB",
                   help="closed swarm: show only peers admitted by this owner key (and count them)")
    commands["status"] = cmd_status

    p = sub.add_parser("swarm-key", help="create a swarm owner key (closes a swarm: only peers it admits join)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="private key file; the public key is FILE.pub")
    commands["swarm-key"] = cmd_swarm_key

    p = sub.add_parser("peer-id", help="print the peer id of an identity file (created if missing)")
    p.add_argument("--identity", required=True, metavar="FILE")
    commands["peer-id"] = cmd_peer_id

    p = sub.add_parser("admit", help="sign an admission token for a peer id with the swarm owner key")
    p.add_argument("--peer-id", required=True)
    p.add_argument("--key", required=True, metavar="FILE", help="the owner's private key (photon-peer swarm-key)")
    p.add_argument("--run-id", action="append", metavar="RUN",
                   help="the run this token admits the peer to (repeat for several)")
    p.add_argument("--any-run", action="store_true", help="admit the peer to every run this owner key closes")
    p.add_argument("--expires", default="30d", help="validity: e.g. 12h, 7d, 2w (default 30d)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="where to write the token (a new file)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists (e.g. renewing a token)")
    commands["admit"] = cmd_admit

    p = sub.add_parser("revoke", help="revoke a peer's admission: published to the swarm's DHT, in force next round")
    p.add_argument("--peer-id", required=True)
    p.add_argument("--key", required=True, metavar="FILE", help="the owner's private key")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    p.add_argument("--expires", default="365d", help="how long peers keep honouring it (default 365d; make it "
                                                      "outlast the peer's tokens)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to reach the swarm")
    commands["revoke"] = cmd_revoke

    p = sub.add_parser("bootstrap", help="a DHT-only node (trains nothing): a stable entry point")
    p.add_argument("--identity", help="identity file (created if missing) for a stable peer id")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR")
    p.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                   help="other bootstrap nodes to connect to")
    p.add_argument("--run-id", action="append", metavar="RUN",
                   help="a run whose heartbeats this node checks against their schema (repeat for several)")
    p.add_argument("--swarm-owner-key", metavar="FILE",
                   help="closed swarm: the owner's public key; tokens, revocations and the runs' heartbeats "
                        "must carry the owner's signature")
    commands["bootstrap"] = cmd_bootstrap
    parser.set_defaults(_commands=commands)
    return parser


# Options whose value may be a negative number with a unit: argparse takes "-5d" for an option and answers with its
# usage text, so `--expires -5d` never reached parse_duration's one-line error. Glued as --expires=-5d, it does
# (plain numbers such as `--timeout -1` argparse passes on by itself).
DASHED_VALUES = ("--expires",)


def _glue_dashed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in DASHED_VALUES and re.match(r"-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_glue_dashed_values(sys.argv[1:] if argv is None else argv))
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
