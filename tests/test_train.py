"""Local trainer and solo runs: loss falls, resume is exact, checkpoints are atomic, CLI errors are one line."""

from __future__ import annotations

import json
import math
import subprocess
import threading

import pytest
import torch

from conftest import CLI, cli_env, tiny_overrides
from photon_p2p.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from photon_p2p.config import TrainConfig, load_config
from photon_p2p.metrics import read_metrics
from photon_p2p.train.schedule import lr_at
from photon_p2p.train.solo import run_solo
from deadlines import within


def test_schedule_warmup_cosine():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)


def test_solo_run_loss_falls_and_writes_files(tmp_path, kjv_data):
    cfg = load_config(["tiny"], tiny_overrides(tmp_path / "run", **{"data.path": str(kjv_data)}))
    result = run_solo(cfg, progress=False)
    assert result["step"] == 40 and math.isfinite(result["val_ppl"])
    records = list(read_metrics(tmp_path / "run"))
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert losses[-1] < losses[0] - 1.0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [20, 40]
    state = load_checkpoint(tmp_path / "run")
    assert state["trainer"]["step"] == 40 and state["trainer"]["sampler"]["cursor"] == 40


class StopAfter(threading.Event):
    """Reports 'stop requested' once the training loop has asked ``n`` times (once per step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.calls, self.n = 0, n

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def test_resume_is_exact(tmp_path, kjv_data):
    common = {"data.path": str(kjv_data), "train.eval_every": 0, "train.checkpoint_every": 1000}
    full = load_config(["tiny"], tiny_overrides(tmp_path / "full", **common, **{"train.max_steps": 30}))
    run_solo(full, progress=False)
    part = load_config(["tiny"], tiny_overrides(tmp_path / "part", **common, **{"train.max_steps": 30}))
    # Stop after 12 steps (as a SIGINT would: same config, so the same schedule), then resume to the end.
    run_solo(part, stop=StopAfter(12), progress=False)
    assert load_checkpoint(tmp_path / "part")["trainer"]["step"] == 12
    run_solo(part, progress=False)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["trainer"]["step"] == b["trainer"]["step"] == 30
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5)
    assert a["trainer"]["last_loss"] == pytest.approx(b["trainer"]["last_loss"], rel=1e-4)


def test_checkpoint_corrupt_and_atomic(tmp_path):
    save_checkpoint(tmp_path, {"x": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp files left behind
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env())


def test_cli_train_eval_export_plot(tmp_path, kjv_data):
    run_dir = tmp_path / "run"
    sets = []
    for o in tiny_overrides(run_dir, **{"data.path": str(kjv_data), "train.max_steps": 20, "train.eval_every": 10}):
        sets += ["--set", o]
    r = run_cli("train", "--config", "tiny", *sets, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 20
    r = run_cli("eval", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["val_ppl"] > 1
    r = run_cli("export", str(run_dir), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    r = run_cli("plot", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert (run_dir / "metrics.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,needle", [
    (["train", "--set", "train.lrr=1"], "train.lrr"),
    (["train", "--config", "nope.yaml"], "not found"),
    (["eval", "/nonexistent/run"], "no checkpoint"),
    (["prepare-data", "--input", "/nonexistent/file.txt", "--out", "/tmp/x"], "/nonexistent/file.txt"),
])
def test_cli_bad_input_is_one_line(args, needle):
    r = run_cli(*args, timeout=within(60))
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip() and "kernels" not in line]) == 1


def test_cli_corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 100)
    r = run_cli("eval", str(tmp_path), timeout=within(60))
    assert r.returncode != 0 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_val_dir_shared_validation_set(tmp_path, kjv_data):
    """data.val_dir scores on another dir's val split; a different tokenizer there is a one-line DataError."""
    import shutil

    from photon_p2p.data import DataError
    from photon_p2p.train.trainer import build_trainer

    shared = tmp_path / "shared-val"
    shutil.copytree(kjv_data, shared)

    def trainer(run: str, **extra: object):
        cfg = load_config(["tiny"], tiny_overrides(tmp_path / run, **{"data.val_dir": str(shared),
                                                                     "train.eval_batch_size": 4, **extra}))
        return build_trainer(cfg, str(kjv_data))

    a, b = trainer("a"), trainer("b", **{"train.batch_size": 16})
    assert a.val_data.data_dir == shared and a.sampler.dataset.data_dir == kjv_data
    # Same weights (same seed), different training batch: eval_batch_size makes them score the same windows.
    assert a.evaluate()["val_loss"] == pytest.approx(b.evaluate()["val_loss"], rel=1e-5)
    manifest = json.loads((shared / "manifest.json").read_text())
    (shared / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(DataError, match="different tokenizer"):
        trainer("c")
    (shared / "manifest.json").write_text(json.dumps({**manifest, "val": []}))
    with pytest.raises(DataError, match="no validation split"):
        trainer("d")
