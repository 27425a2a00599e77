"""Shared fixtures: a small prepared dataset and a tiny config that trains in seconds."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from types import ModuleType
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """Ctrl-C reaches the processes the tests start, however the suite itself was launched.

    A background job of a non-interactive shell (`pytest &`, a CI runner's script) starts with SIGINT ignored,
    exec passes an ignored signal on, and Python then installs no KeyboardInterrupt handler: the tests that
    stop `status --watch` or a daemon the way a terminal's Ctrl-C does would wait for an exit that never comes.
    A handled signal is reset to the default on exec, so every child starts as a terminal's foreground job.
    """
    try:
        import deadlines  # noqa: F401  (validates PHOTON_TEST_TIME_SCALE before anything runs)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items) -> None:
    """pytest-timeout's limits stretch with every other deadline (deadlines.py: PHOTON_TEST_TIME_SCALE)."""
    from deadlines import SCALE

    if SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else default
        if limit > 0:
            item.add_marker(pytest.mark.timeout(limit * SCALE))


@pytest.fixture(scope="session")
def kjv_data(tmp_path_factory) -> Path:
    """The embedded KJV slice, prepared once per test session."""
    from photon_p2p.data.embedded import ensure_default_dataset

    return ensure_default_dataset(tmp_path_factory.mktemp("data"), ["kjv"], progress=False)


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """A config that trains a very small model quickly on 1 thread (peers share 2 cores in tests)."""
    base = {"run_dir": str(run_dir), "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
            "model.seq_len": 64, "train.batch_size": 8, "train.warmup_steps": 5, "train.max_steps": 40,
            "train.eval_every": 20, "train.eval_batches": 2, "train.log_every": 5, "train.threads": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


CLI = [sys.executable, "-m", "photon_p2p.cli"]


def torchrun(nproc: int) -> list[str]:
    """`photon-peer` as a silo of ``nproc`` ranks on this machine (torchrun, gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "photon_p2p.cli"]


def load_bench(name: str) -> ModuleType:
    """bench/NAME.py as a module (bench/ is not a package; its scripts import each other from there)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
