"""User mistakes on the command line: one line `photon-peer: error: ...`, exit code 2, no traceback, nothing started;
and the stop watchdog (a stop that cannot finish still ends the process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, cli_env
from deadlines import within


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env())


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("photon-peer: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["train", "--set", "train.lr=-1"], ["'train.lr' must be > 0, got -1.0"]),
    (["train", "--set", "train.beta1=1.5"], ["'train.beta1' must be in [0, 1)"]),
    (["train", "--set", "train.device=gpu"], ["train.device"]),
    (["train", "--set", "federation.outer_momentum=1"], ["federation.outer_momentum"]),
    (["run", "--run-id", "my.run"], ["federation.run_id", "no '.'"]),
    (["run", "--set", "federation.round_deadline=2"], ["federation.round_deadline (2s) must exceed"]),
    (["run", "--set", "federation.record_ttl=5", "--set", "federation.heartbeat_interval=10"],
     ["federation.record_ttl (5s)"]),
    (["run", "--announce-maddrs", "/ip4/203.0.113.7/tcp/0"], ["--announce-maddrs", "non-zero port"]),
    (["run", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"], ["--initial-peers", "/p2p/<peer id>"]),
    (["run", "--set", "federation.compression=zip"], ["federation.compression", "blockwise8"]),
    (["bootstrap", "--announce-maddrs", "/ip4/1.2.3.4"], ["non-zero port"]),
    (["status", "--initial-peers", "garbage"], ["invalid multiaddr", "garbage"]),
])
def test_config_mistakes_are_one_line(tmp_path, args, needles):
    r = run_cli(*args, *(["--run-dir", str(tmp_path / "run")] if args[0] in ("train", "run") else []))
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "run").exists()  # rejected before anything was prepared or started


@pytest.mark.parametrize("command", ["run", "bootstrap"])
def test_garbage_identity_file_is_named(tmp_path, command):
    key = tmp_path / "peer.key"
    key.write_bytes(b"-----BEGIN NOTHING-----\nnot a key\n")
    extra = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    line = assert_one_line_error(run_cli(command, "--identity", str(key), *extra), str(key), "is not a private key")
    assert "proto" not in line and "wire-format" not in line
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_model_vocab(tmp_path, kjv_data):
    r = run_cli("train", "--run-dir", str(tmp_path / "run"), "--set", f"data.path={kjv_data}",
                "--set", "model.vocab_size=1000", "--no-progress")
    assert_one_line_error(r, "model.vocab_size is 1000")


def test_sample_bad_arguments(tmp_path):
    assert_one_line_error(run_cli("sample", str(tmp_path / "nothing"), "--prompt", "x"), "no checkpoint")
    assert_one_line_error(run_cli("plot", str(tmp_path)), "no metrics")


def test_a_stop_that_cannot_finish_exits_at_its_deadline(tmp_path):
    # A daemon whose helpers were killed under it can wait on a hivemind lock that is never freed; the stop
    # watchdog (federation.stop_timeout) ends the process anyway, with one line and rc 1.
    code = ("import os, signal, time\n"
            "from photon_p2p.cli import _graceful_stop\n"
            "stop = _graceful_stop(0.5)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "stop.wait(5)\n"
            "time.sleep(30)  # a stop that never finishes\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=within(60), cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 20
    assert "still stopping after 0.5s (federation.stop_timeout)" in r.stderr and "Traceback" not in r.stderr
