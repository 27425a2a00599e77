"""A wheel install (not editable), run from another directory: the presets ship inside the package and it trains."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from deadlines import within

REPO = Path(__file__).resolve().parent.parent


def build_unavailable() -> str | None:
    """Why a wheel cannot be built and installed offline here, or None."""
    for module, why in (("venv", "the venv module is missing"), ("pip", "pip is missing"),
                        ("setuptools", "setuptools is missing (the build backend, used without build isolation)")):
        if importlib.util.find_spec(module) is None:
            return why
    # Not imported: setuptools' distutils shim asserts when something here already imported distutils.
    major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 needs the wheel package to build wheels"
    return None


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo must not shadow the wheel
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=within(600), **kw)


def test_wheel_install_trains_from_another_directory(tmp_path):
    reason = build_unavailable()
    if reason:
        pytest.skip(f"cannot build a wheel offline: {reason}")
    # Build from a copy: pip writes build/ and *.egg-info next to setup.cfg, and the checkout may be in use.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "bench",
                                                             "__pycache__", ".pytest_cache", ".venv", "out"))
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
             str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("photon_p2p-*.whl")
    venv = tmp_path / "venv"
    # A bare venv that sees exactly the packages of the interpreter running the tests (torch, hivemind: no
    # downloads), not `--system-site-packages`: inside a user's venv the "system" is the base interpreter, which
    # has none of them. Plain path lines in a .pth skip that environment's own .pth files, so its editable
    # install of this checkout stays out of sight.
    r = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    if r.returncode != 0:
        pytest.skip(f"cannot create a virtual environment: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    (site,) = (venv / "lib").glob("python*/site-packages")
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_parent_env.pth").write_text("".join(f"{p}\n" for p in ours))
    python, peer = venv / "bin" / "python", venv / "bin" / "photon-peer"
    r = run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run([str(python), "-c", "import photon_p2p; print(photon_p2p.__file__)"], cwd=elsewhere)
    assert r.stdout.strip().startswith(str(venv)), r.stdout  # the wheel's copy, not the checkout
    r = run([str(peer), "train", "--config", "tiny", "--no-progress", "--set", f"run_dir={elsewhere / 'run'}",
             "--set", "train.max_steps=3", "--set", "train.eval_every=0", "--set", "data.sources=[kjv]",
             "--set", "train.threads=1"], cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3
    # `run` with no --config loads the shipped tiny preset too: it gets as far as validating the run id.
    r = run([str(peer), "run", "--run-id", "has.dot", "--run-dir", str(elsewhere / "peer")], cwd=elsewhere)
    assert r.returncode == 2 and "federation.run_id" in r.stderr and "not found" not in r.stderr, r.stderr
