"""What the bench/ scripts share: flags, results (command, commit, date), records, peer processes, the lock, plots."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"  # the full corpus, where a checkout has it (users never do)
LOCK = "/tmp/photon-bench.lock"  # the lock `flock /tmp/photon-bench.lock CMD` takes: one benchmark at a time
# peers/local_swarm.py, and photon_p2p from this checkout without installing; a tree on PYTHONPATH comes first
# (bench/scenarios.py one-model runs its silos of an older commit with that tree on PYTHONPATH)
for _path in (REPO / "peers", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(len(sys.path) if os.environ.get("PYTHONPATH") else 0, str(_path))

import local_swarm  # noqa: E402  (the README's swarm: its start/stop helpers are the benchmarks' too)

PeerStartError, wait_for_address, stop_all = local_swarm.PeerStartError, local_swarm.wait_for_address, \
    local_swarm.stop_all


class BenchError(Exception):
    """A user or environment problem: reported as one line, not a traceback."""


# ---- the command line --------------------------------------------------------------------------------------------
HELP = {"out": "where the results go", "data": "prepared data dir (made if missing)",
        "runs": "daemon run dirs and logs go here", "results": "where the result files go",
        "corpus": "the full corpus (else the embedded one)", "cap": "wall-clock cap per run (seconds)",
        "force": "re-run what already has a result", "report_only": "run nothing: rewrite the report from the results",
        "replot": "only rewrite OUT.md and OUT.png from OUT.json"}


def parser(doc: str, **shared: Any) -> argparse.ArgumentParser:
    """An ArgumentParser that shows ``doc``, with the shared flags of ``flags``."""
    return flags(argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter),
                 **shared)


def flags(ap: argparse.ArgumentParser, **flags: Any) -> argparse.ArgumentParser:
    """``ap`` with the shared flags named as keywords: a default value (out, data, runs, results, corpus, cap), True
    (force, report_only, replot: switches) or, for set, the KEY=VALUE list's dest."""
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if name == "set":
            ap.add_argument(flag, action="append", default=[], dest=value, metavar="KEY=VALUE",
                            help="a config override (repeatable)")
        elif value is True:
            ap.add_argument(flag, action="store_true", help=HELP[name])
        else:
            ap.add_argument(flag, type=float if name == "cap" else str, default=value, help=HELP[name])
    return ap


def md_table(columns: list[str]) -> list[str]:
    """A markdown table's header and separator lines; the rows go after them."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def command(argv: list[str] | None = None, script: str | None = None) -> str:
    """This run's command line, as the results record it."""
    return " ".join(["python", script or Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])


def run(main: Callable[[], int | None], name: str, interrupted: str = "interrupted", errors: tuple = ()) -> None:
    """``sys.exit(main())``, with a BenchError (or one of ``errors``) and Ctrl-C reported as one line."""
    try:
        sys.exit(main())
    except (BenchError, *errors) as e:
        sys.exit(f"{name}: {e}")
    except KeyboardInterrupt:
        sys.exit(f"{name}: {interrupted}")


def wrapped_silo(argv: list[str], flag: str, usage: str) -> tuple[str, list[str]] | None:
    """(VALUE, photon-peer arguments) when ``argv`` is ``FLAG VALUE -- ARGS``: a silo that a script starts through
    itself, to change the product's behaviour in that process only (a monkeypatch), then run photon_p2p.cli."""
    if argv[:1] != [flag]:
        return None
    if len(argv) < 3 or argv[2] != "--":
        raise BenchError(f"usage: {usage}")
    return argv[1], argv[3:]


def photon_peer(argv: list[str]) -> int:
    from photon_p2p.cli import main

    return main(argv)


# ---- results -----------------------------------------------------------------------------------------------------
def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


def commit(cwd: Path = REPO) -> str:
    return git("rev-parse", "--short", "HEAD", cwd=cwd) or "unknown"


def utc(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    return time.strftime(fmt, time.gmtime())


def write_json(path: Path | str, doc: Any, indent: int = 1) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=indent) + "\n")


def read_jsonl(path: Path | str) -> list[dict]:
    """Every JSON line of a file ([] when there is none); a line torn by a kill mid-write is skipped."""
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def records(run_dir: Path | str, kind: str | None = None) -> list[dict]:
    """A daemon's metrics records (RUN_DIR/metrics.jsonl), all or those of one kind."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if kind is None or r.get("kind") == kind]


def mean(xs: list[float], empty: Any = math.nan) -> Any:
    return sum(xs) / len(xs) if xs else empty


def fmt(x: Any, spec: str = ".2f") -> str:
    """A table cell: '-' for a missing value."""
    return "-" if x is None else format(x, spec)


def ensure_data(path: str) -> str:
    """The benchmarks' prepared corpus (a data dir): the full corpus when present, else the embedded default."""
    if (Path(path) / "manifest.json").exists():
        return path
    if CORPUS.is_dir():
        from photon_p2p.data.prepare import prepare

        prepare([str(CORPUS)], path, progress=False)
        return path
    from photon_p2p.data.embedded import ensure_default_dataset

    return str(ensure_default_dataset(Path(path) / "embedded", progress=False))


@contextlib.contextmanager
def bench_lock(path: str = LOCK) -> Iterator[float]:
    """Hold the shared benchmark lock (flock(2), as `flock LOCK cmd` does); yields the time it was acquired."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pyplot():  # noqa: ANN201
    """matplotlib.pyplot, headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 110) -> None:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# ---- photon-peer daemons -------------------------------------------------------------------------------------------
def peer_cmd(run_dir: Path, overrides: list[str] = (), *, config: str = "tiny", initial: list[str] = (),
             host: str = "127.0.0.1", run_id: str = "", args: list[str] = ()) -> list[str]:
    """`python -m photon_p2p.cli run` on ``host``, joining through ``initial`` (none: it starts the run)."""
    cmd = [sys.executable, "-m", "photon_p2p.cli", "run", "--config", config, "--run-dir", str(run_dir),
           *(["--run-id", run_id] if run_id else []), "--host-maddrs", f"/ip4/{host}/tcp/0", "--no-progress", *args]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--initial-peers", *initial] if initial else [])


def fresh_run_dir(run_dir: Path) -> Path:
    """RUN_DIR without an earlier daemon's address, metrics or checkpoint (a daemon would resume from them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("peer.json", "metrics.jsonl", "checkpoint.pt"):
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def popen_logged(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
    """``cmd`` in its own session (a stop reaches its whole group: the DHT child, p2pd) with its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def wait_all(procs: list[subprocess.Popen], timeout: float, every: Callable[[], Any] = lambda: None,
             poll: float = 0.5) -> bool:
    """Wait until every process has exited (True) or ``timeout`` seconds passed (False), calling ``every`` each
    ``poll`` seconds; ``every`` returning True stops the wait early (False)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or every():
            return False
        time.sleep(poll)
    return True


def wait_line(log: Path, proc: subprocess.Popen, match: Callable[[str], bool], timeout: float) -> str | None:
    """The first line of ``log`` that ``match``es, waited for up to ``timeout`` s while ``proc`` runs (else None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        line = next((ln for ln in log.read_text(errors="replace").splitlines() if match(ln)), None)
        if line is not None:
            return line
        time.sleep(0.2)
    return None


def follow(log: Path, seen: int, tag: str) -> int:
    """Echo the 'round ...' lines of a daemon's log after the first ``seen``; returns how many there are now."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("round ")] \
        if log.is_file() else []
    for ln in lines[seen:]:
        print(f"  [{tag}] {ln}", flush=True)
    return max(seen, len(lines))


# ---- one device's training speed (bench/gpu_throughput.py, trainer_throughput.py) ----------------------------------
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense, datasheets


def device():  # noqa: ANN201
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_gib(dev) -> float | None:  # noqa: ANN001
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def fresh(dev) -> None:  # noqa: ANN001
    """Free what the last measurement left and restart the peak-memory count."""
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(step: Callable[[], Any], steps: int, warmup: int, dev) -> float:  # noqa: ANN001
    """Seconds per step after ``warmup`` untimed steps (torch.compile compiles there)."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def mfu(tok_s: float, cfg) -> float | None:  # noqa: ANN001
    """Model FLOP utilization against the GPU's dense bf16 peak; None off a GPU named in PEAK_BF16."""
    import torch

    from photon_p2p.model import flops_per_token

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return round(tok_s * flops_per_token(cfg.model) / peak, 3) if peak else None


def bare_rate(cfg, steps: int, warmup: int) -> tuple[float, float | None]:  # noqa: ANN001
    """Tokens/s and peak GiB of the reference: the same model and AdamW (fused on a GPU), random tokens already on
    the device, grad_accum micro-batches, clipping, nothing else."""
    import torch
    import torch.nn.functional as F

    from photon_p2p.model import Transformer
    from photon_p2p.train.device import autocast

    dev, t = device(), cfg.train
    fresh(dev)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=dev.type == "cuda")
    fwd = torch.compile(model) if t.compile else model
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_size // t.grad_accum, cfg.model.seq_len + 1), device=dev)

    def step() -> None:
        for _ in range(t.grad_accum):
            with autocast(t, dev):
                logits, _ = fwd(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(step, steps, warmup, dev)
    return t.batch_size * cfg.model.seq_len / s, peak_gib(dev)


def trainer_rate(cfg, data_dir: str, steps: int, warmup: int) -> tuple[float, float | None]:  # noqa: ANN001
    """Tokens/s and peak GiB of LocalTrainer.train_step on ``cfg``."""
    from photon_p2p.train.trainer import build_trainer

    fresh(device())
    trainer = build_trainer(cfg, data_dir)
    s = timed(trainer.train_step, steps, warmup, trainer.device)
    return trainer.tokens_per_step / s, peak_gib(trainer.device)
