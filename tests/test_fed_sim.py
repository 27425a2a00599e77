"""bench/fed_sim.py: one simulated round is exactly FedAvg of independently trained silos; the CLI and records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_bench
from deadlines import within

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16", "train.eval_batches=2",
         "train.batch_size=4"]


@pytest.fixture(scope="module")
def sim():
    return load_bench("fed_sim")


@pytest.fixture(scope="module")
def data_root(kjv_data, tmp_path_factory) -> Path:
    """The layout of bench-data (union + one dir per source), every dir the same prepared KJV slice."""
    root = tmp_path_factory.mktemp("bench-data")
    for name in ("union", "shakespeare", "kjv", "brown"):
        (root / name).symlink_to(kjv_data, target_is_directory=True)
    return root


def fed_config(sim, steps: int, **params) -> dict:
    cfg = sim.sweep.make("fed-noniid", "screen", {"H": steps} | params)
    cfg["budget"] = steps / sim.sweep.BASE_STEPS
    cfg["extra"] = SMALL
    return cfg


def test_one_round_is_fedavg_of_independent_silos(sim, data_root, tmp_path):
    """Outer FedAvg at lr 1 after one round of H steps: the global model is the mean of 4 silos that each trained
    H steps alone from the same init. Scored by the same evaluation, the perplexities must agree exactly."""
    from photon_p2p.train.trainer import build_trainer

    cfg = fed_config(sim, 3)
    out = sim.run_one(cfg, data_root, tmp_path / "sim")
    assert out["engine"] == "sim" and len(out["curve"]) == 1
    tokens, ppl = out["curve"][0]
    assert tokens == 4 * 3 * 4 * 16  # silos x steps x batch x seq len

    spec = sim.spec_of(cfg, sim.data_dirs(data_root))
    trainers = [build_trainer(sim._load(spec, d, tmp_path / f"alone-{i}", f"silo-{i}"), str(d), peer=f"silo-{i}")
                for i, d in enumerate(spec.silo_data)]
    for t in trainers:
        for _ in range(3):
            t.train_step()
    with torch.no_grad():
        for ps in zip(*(t.model.parameters() for t in trainers)):
            ps[0].copy_(sum(p.detach() for p in ps) / len(ps))
    assert trainers[0].evaluate()["val_ppl"] == pytest.approx(ppl, rel=1e-5)


def test_simulated_rounds_match_the_daemon_round_loop(sim, kjv_data, tmp_path):
    """The claim fed_sim rests on: its rounds compute what PeerDaemon's round loop computes. Two silos, three
    rounds of H = 3 with Nesterov momentum, driven once by fed_sim and once by two PeerDaemons over the
    in-process fake swarm (tests/fake_swarm.py): the global weights and outer buffers must agree."""
    import threading

    from fake_swarm import FakeNet, factory
    from photon_p2p.config import load_config
    from photon_p2p.daemon import PeerDaemon

    recipe = SMALL + ["federation.local_steps=3", "federation.rounds=3", "train.max_steps=9",
                      "federation.outer_optimizer=nesterov", "federation.outer_lr=0.7",
                      "federation.outer_momentum=0.9", "federation.round_clock=steps", "train.warmup_steps=2",
                      "train.eval_every=0", "federation.min_group_size=2", "train.threads=1"] + sim.SIM_OVERRIDES
    spec = sim.sweep.conv.RunSpec("fed-iid", "tiny", [kjv_data, kjv_data], 3, recipe)
    states: list = []
    sim.run_federated(spec, tmp_path / "sim", states_out=states)

    net, init = FakeNet(), threading.Lock()
    daemons = []
    for i in range(2):
        cfg = sim._load(spec, kjv_data, tmp_path / f"daemon-{i}", f"silo-{i}")
        d = PeerDaemon(cfg, progress=False, make_swarm=factory(net, f"silo-{i}"))
        setup = d._setup_training

        def serialized(setup=setup) -> None:  # model init draws from torch's global RNG: one silo at a time
            with init:
                setup()
        d._setup_training = serialized
        daemons.append(d)
    threads = [threading.Thread(target=d.run) for d in daemons]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a daemon did not finish"
    for d in daemons:
        assert d.state.round == 3
        for ours, theirs in zip(states[0].tensors(), d.state.tensors()):
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_reset_policy_and_outer_optimizer_change_the_result(sim, data_root, tmp_path):
    """Two rounds: federation.inner_state and the outer optimizer reach the simulated round (not ignored)."""
    base = sim.run_one(fed_config(sim, 4, H=2), data_root, tmp_path / "a")["final_ppl"]
    reset = sim.run_one(fed_config(sim, 4, H=2, inner_state="reset"), data_root, tmp_path / "b")["final_ppl"]
    nesterov = sim.run_one(fed_config(sim, 4, H=2, outer="nesterov", outer_lr=0.7, momentum=0.9), data_root,
                           tmp_path / "c")["final_ppl"]
    assert len({base, reset, nesterov}) == 3


def test_clipping_reaches_the_simulated_round(sim, data_root, tmp_path):
    """--set federation.robust_aggregation=clip reduces as the daemons do: with a bound nobody reaches it is the
    plain mean; at multiplier 1 (the bound = the lower median chunk norm of 4) the larger senders are scaled."""
    def run(name: str, *extra: str) -> dict:
        cfg = fed_config(sim, 6, H=2)  # 3 rounds
        cfg["extra"] = SMALL + list(extra)
        return sim.run_one(cfg, data_root, tmp_path / name)

    plain = run("plain")
    loose = run("loose", "federation.robust_aggregation=clip", "federation.clip_multiplier=1000")
    tight = run("tight", "federation.robust_aggregation=clip", "federation.clip_multiplier=1")
    assert "clipped_rounds" not in plain
    assert loose["clipped_rounds"] == {f"silo-{i}": 0 for i in range(4)}
    assert loose["final_ppl"] == pytest.approx(plain["final_ppl"], rel=1e-6)  # summation order only
    assert sum(tight["clipped_rounds"].values()) >= 2 * 3  # the senders above the lower median, every round
    # the scaled-down mean moves the model less (a tiny one, barely trained: the change is small; loose: none)
    assert abs(tight["final_ppl"] / plain["final_ppl"] - 1) > 1e-5


@pytest.mark.slow  # 12.5 s: the default suite stays under 10 min on 2 cores
def test_cli_writes_sweep_records_and_resumes(sim, data_root, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "fed_sim.py"), "--smoke", "--data", str(data_root),
           "--results", str(results), "--runs", str(tmp_path / "runs")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=within(300))
    assert first.returncode == 0, first.stdout + first.stderr
    recs = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
    assert {r["config"]["side"] for r in recs} == {"central", "fed-noniid"}
    assert all(r["engine"] == "sim" and r["final_ppl"] > 1 for r in recs)
    assert "| central |" in (results / "sweep.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=within(120))
    assert again.returncode == 0 and "started" not in again.stdout  # every run is done: nothing starts


def test_missing_data_is_one_line_error(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "fed_sim.py"), "--smoke", "--data", str(tmp_path / "nope"),
           "--results", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=within(120))
    assert proc.returncode != 0
    assert proc.stderr.startswith("fed_sim: no prepared data") and "Traceback" not in proc.stderr
