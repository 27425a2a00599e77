"""User mistakes on the command line: one line `photon-peer: error: ...`, exit code 2, no traceback, nothing started,
nothing the user named changed; and the stop watchdog (a stop that cannot finish still ends the process)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import CLI, cli_env, tiny_overrides
from deadlines import within

# any syntactically valid initial peer: these commands fail before they dial it
MADDR = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=within(timeout), env=cli_env(),
                          **kwargs)


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
    # a flag that stands for a config key passes the key's own rule (it said "within -1s")
    (["status", "--initial-peers", MADDR, "--timeout", "-1"],
     ["--timeout (config key 'network.bootstrap_timeout') must be > 0, got -1.0"]),
    (["revoke", "--peer-id", "x", "--key", "k", "--initial-peers", MADDR, "--timeout", "-1"],
     ["--timeout (config key 'network.bootstrap_timeout') must be > 0, got -1.0"]),
    (["status", "--initial-peers", MADDR, "--run-id", "my.run"], ["--run-id (config key 'federation.run_id')"]),
    (["status", "--initial-peers", MADDR, "--watch", "nan"], ["--watch must be a finite number of seconds >= 0"]),
    (["prepare-data", "-i", "x.txt", "-o", "out", "--val-fraction", "1"],
     ["--val-fraction (config key 'data.val_fraction') must be in [0, 1), got 1.0"]),
    # "-5d" once read as an option by argparse (its usage text); now it reaches the duration's own error
    (["admit", "--peer-id", "x", "--key", "k", "-o", "t", "--expires", "-5d"],
     ["invalid duration '-5d': it must be more than 0"]),
    (["revoke", "--peer-id", "x", "--key", "k", "--initial-peers", MADDR, "--expires", "-5d"],
     ["invalid duration '-5d': it must be more than 0"]),
])
def test_config_mistakes_are_one_line(tmp_path, args, needles):
    r = run_cli(*args, *(["--run-dir", str(tmp_path / "run")] if args[0] in ("train", "run") else []), cwd=tmp_path)
    assert_one_line_error(r, *needles)
    assert not any(tmp_path.iterdir())  # rejected before anything was prepared, started or written


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
    assert not (tmp_path / "run").exists()  # the data failed its check before the run dir was written


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


# ---- bad input, the last mile: every user-named path is checked before work starts, and nothing is lost ----------

def digest(path: Path) -> dict[str, str]:
    """sha256 of every file at or under ``path`` (directories listed too): what a refused command must leave as is."""
    entries = [path] if not path.is_dir() else [path, *sorted(path.rglob("*"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in entries}


def set_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, kjv_data) -> Path:
    """A run dir with a checkpoint of a 2-layer model (two steps of `train`)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli("train", *set_args(tiny_overrides(run_dir, **{"data.path": kjv_data, "train.max_steps": 2,
                                                             "train.eval_every": 0})), "--no-progress")
    assert r.returncode == 0, r.stderr
    return run_dir


def _drop_dac_override() -> None:
    # In the child before exec: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (linux/capability.h: 1, 2;
    # PR_CAPBSET_DROP = 24) obeys file modes as any user does.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def as_user() -> dict:
    """subprocess arguments that run the CLI as an ordinary user: users do, and root writes into a read-only
    directory all the same. Root runs it as 'nobody' where that user can run this interpreter, else without the
    capabilities that let root ignore file modes. Checked: a 0555 directory refuses the child, a 0777 one does not."""
    if os.geteuid() != 0:
        return {}
    options = []
    try:
        nobody = pwd.getpwnam("nobody")
        options.append({"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []})
    except KeyError:
        pass
    options.append({"preexec_fn": _drop_dac_override})
    probe = Path(tempfile.mkdtemp(prefix="photon-test-"))
    try:
        for mode in (0o777, 0o555):
            (probe / oct(mode)).mkdir(mode=mode)
            (probe / oct(mode)).chmod(mode)  # mkdir's mode is masked by the umask
        probe.chmod(0o755)
        code = "import sys\nfor d in sys.argv[1:]:\n    open(d + '/f', 'w')"
        for kwargs in options:
            try:
                ok = subprocess.run([sys.executable, "-c", code, str(probe / "0o777")], capture_output=True,
                                    timeout=within(60), **kwargs)
                refused = subprocess.run([sys.executable, "-c", code, str(probe / "0o555")], capture_output=True,
                                         timeout=within(60), **kwargs)
            except OSError:  # e.g. 'nobody' may not execute an interpreter under /root
                continue
            if ok.returncode == 0 and refused.returncode != 0 and b"PermissionError" in refused.stderr:
                return kwargs
    finally:
        shutil.rmtree(probe)
    pytest.skip("root, and neither 'nobody' can run this interpreter nor can root drop CAP_DAC_OVERRIDE")


@pytest.fixture
def open_dir():
    """A directory any user can enter (pytest's tmp dirs are private to their owner); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="photon-test-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


def read_only_copy(src: Path | None, dst: Path) -> Path:
    """``src`` copied to ``dst`` (an empty directory when None), readable by all, writable by none."""
    shutil.copytree(src, dst) if src else dst.mkdir()
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return dst


@pytest.mark.parametrize("command", ["train", "run"])
def test_resume_with_another_model_shape_changes_nothing(tmp_path, trained_run, kjv_data, command):
    # It rewrote config.yaml first and then failed in load_state_dict (26 lines): the run dir described a model
    # its checkpoint did not hold.
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    before = digest(run_dir)
    r = run_cli(command, *set_args(tiny_overrides(run_dir, **{"data.path": kjv_data, "model.n_layers": 1})),
                "--no-progress")
    assert_one_line_error(r, f"run dir {run_dir} holds a checkpoint of a different model "
                             "(model.n_layers: 2 in the checkpoint, 1 asked for)")
    assert digest(run_dir) == before


@pytest.mark.parametrize("batches", ["-1", "0"])
def test_eval_batches_passes_the_config_rule(trained_run, batches):
    before = digest(trained_run)
    r = run_cli("eval", str(trained_run), "--batches", batches)  # -1 printed val_loss 0.0, val_ppl 1.0, rc 0
    assert_one_line_error(r, f"--batches (config key 'train.eval_batches') must be >= 1, got {batches}")
    assert digest(trained_run) == before


@pytest.mark.parametrize("command", ["train", "run"])
def test_run_dir_that_is_a_file(tmp_path, command):
    run_dir = tmp_path / "run"
    run_dir.write_text("my notes\n")
    before = digest(tmp_path)
    assert_one_line_error(run_cli(command, "--run-dir", str(run_dir)), f"run dir {run_dir} is a file, not a directory")
    assert digest(tmp_path) == before


@pytest.mark.parametrize("command,checkpoint", [("train", False), ("train", True), ("run", True)])
def test_read_only_run_dir_fails_at_start(open_dir, as_user, trained_run, command, checkpoint):
    # A resume trained until its first checkpoint and only then crashed.
    run_dir = read_only_copy(trained_run if checkpoint else None, open_dir / "run")
    before = digest(run_dir)
    r = run_cli(command, *set_args(tiny_overrides(run_dir)), "--no-progress", **as_user)
    assert_one_line_error(r, f"run dir {run_dir} is not writable (Permission denied)")
    assert digest(run_dir) == before


def test_export_out_onto_a_file(tmp_path, trained_run):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone else's weights")
    before = digest(tmp_path)
    assert_one_line_error(run_cli("export", str(trained_run), "--out", str(out)),
                          f"--out {out} is a file, not a directory")
    assert digest(tmp_path) == before


def test_export_with_a_missing_tokenizer_writes_nothing(tmp_path, trained_run):
    out = tmp_path / "hf"
    assert_one_line_error(run_cli("export", str(trained_run), "--out", str(out), "--tokenizer",
                                  str(tmp_path / "missing.json")), f"--tokenizer {tmp_path / 'missing.json'} does not exist")
    assert not out.exists()  # it wrote model.safetensors first, then failed on the copy


@pytest.mark.parametrize("args,needle", [
    (["export", "{run}", "--out", "{ro}"], "--out {ro} is not writable (Permission denied)"),
    (["export", "{run}", "--out", "{ro}/hf"], "--out {ro}/hf cannot be created in {ro} (Permission denied)"),
    (["train", "--run-dir", "{ro}/new"], "run dir {ro}/new cannot be created in {ro} (Permission denied)"),
    (["prepare-data", "-i", "{run}/config.yaml", "-o", "{ro}/data"], "output dir {ro}/data cannot be created in {ro}"),
    (["swarm-key", "-o", "{ro}/owner.key"], "swarm owner key {ro}/owner.key cannot be written in {ro}"),
])
def test_writing_into_a_read_only_directory(open_dir, as_user, trained_run, args, needle):
    run_dir = shutil.copytree(trained_run, open_dir / "run")
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    ro = read_only_copy(None, open_dir / "ro")
    before = digest(open_dir)
    fill = {"run": str(run_dir), "ro": str(ro)}
    r = run_cli(*(a.format(**fill) for a in args), **as_user)
    assert_one_line_error(r, needle.format(**fill))
    assert digest(open_dir) == before


def test_yaml_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "silo.yaml"
    bad.write_text("train:\n  lr: 1e-3\n batch_size: 8\n")  # one space short
    before = digest(tmp_path)
    assert_one_line_error(run_cli("train", "-c", str(bad), "--run-dir", str(tmp_path / "run")),
                          f"{bad}:3:2: not valid YAML: expected <block end>")
    assert digest(tmp_path) == before


def test_config_that_is_a_directory(tmp_path):
    assert_one_line_error(run_cli("train", "-c", str(tmp_path), "--run-dir", str(tmp_path / "run")),
                          f"config {tmp_path} is a directory: name a YAML file")
    assert not any(tmp_path.iterdir())


def test_broken_jsonl_line_is_named_in_a_whole_sentence(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "a raw\ttab"}\n')
    line = assert_one_line_error(run_cli("prepare-data", "-i", str(src), "-o", str(tmp_path / "out"), "--no-progress"),
                                 f"{src}:2:", "not valid JSON: Invalid control character")
    assert not line.endswith(" at"), line  # json's message ends "at"; the position came after it
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_missing_data_dir_is_named_and_the_run_dir_left_alone(tmp_path, trained_run, with_checkpoint):
    # It said "no manifest.json" and left a run dir holding only config.yaml (or a rewritten one).
    missing = tmp_path / "no-such-data"
    run_dir = shutil.copytree(trained_run, tmp_path / "run") if with_checkpoint else tmp_path / "run"
    before = digest(tmp_path)
    r = run_cli("train", *set_args(tiny_overrides(run_dir, **{"data.path": missing})), "--no-progress")
    assert_one_line_error(r, f"data dir {missing} does not exist")
    assert digest(tmp_path) == before
    assert_one_line_error(run_cli("eval", str(trained_run), "--data", str(missing)),
                          f"data dir {missing} does not exist")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is available here")
def test_sample_device_blames_the_flag(trained_run):
    assert_one_line_error(run_cli("sample", str(trained_run), "--device", "cuda"),
                          "--device is 'cuda' but no CUDA device is available")
    assert_one_line_error(run_cli("sample", str(trained_run), "--device", "gpu"),
                          "--device (config key 'train.device') must be auto, cpu, cuda or cuda:N")


def test_plot_out_onto_a_file_that_is_no_image(tmp_path, trained_run):
    key = tmp_path / "owner.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    before = digest(tmp_path)
    assert_one_line_error(run_cli("plot", str(trained_run), "--out", str(key)),
                          f"plot output {key} must end in an image suffix")
    assert_one_line_error(run_cli("plot", str(trained_run), "--out", str(tmp_path)), "is a directory")
    assert digest(tmp_path) == before
