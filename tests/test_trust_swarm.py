"""Robust aggregation with real peers on 127.0.0.1: a silo that sends its Δ × 1e4 is clipped, not followed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from photon_p2p.checkpoint import load_checkpoint
from photon_p2p.config import load_config
from photon_p2p.train.trainer import build_trainer
from swarm import Swarm
from deadlines import within

pytestmark = pytest.mark.timeout(300)
ADVERSARY = [sys.executable, str(Path(__file__).resolve().parent / "_adversarial_peer.py"), "scale:1e4", "--"]


@pytest.fixture
def swarm(tmp_path, kjv_data):
    s = Swarm(tmp_path, kjv_data)
    yield s
    s.close()


def init_and_local(run_dir, data_dir, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A peer's initial and first-round local weights, recomputed from its saved config (deterministic on CPU)."""
    cfg = load_config([str(run_dir / "config.yaml")])
    trainer = build_trainer(cfg, str(data_dir), peer=cfg.name)
    init = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(steps):
        trainer.train_step()
    return init, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.slow
def test_a_scaled_delta_is_clipped_and_the_honest_peers_stay_close(swarm, kjv_data):
    common = {"federation.rounds": 1, "federation.min_group_size": 3, "federation.round_clock": "steps",
              "federation.robust_aggregation": "clip"}
    a = swarm.start("honest-a", extra=common)
    addr = a.address()
    b = swarm.start("honest-b", initial=[addr], extra=common)
    bad = swarm.start("scaled", initial=[addr], extra=common, cli=ADVERSARY)
    for p in (a, b, bad):
        assert p.wait(within(200)) == 0, p.log()[-3000:]
    bad_id = json.loads((bad.run_dir / "peer.json").read_text())["peer_id"]
    reported = {}
    for p in (a, b):
        (r,) = p.rounds()
        assert not r["solo"] and r["group_size"] == 3, r
        assert math.isfinite(r["loss"])
        reported.update(r["clipped"])
        assert set(r["clipped"]) <= {bad_id}, r["clipped"]  # honest peers are never clipped
        if r["clipped"]:  # the round line names it: clipped, or dropped once past its declared norm
            assert f"..{bad_id[-12:]}" in next(ln for ln in p.log().splitlines() if ln.startswith("round 1:"))
    assert bad_id in reported and reported[bad_id] < 1e-2, reported  # ~ 2 x median / (1e4 x its norm), or 0
    assert len({p.rounds()[-1]["fingerprint"] for p in (a, b, bad)}) == 1  # still one model, the bad peer's too

    # The global model is within a median-sized step of the honest mean of all three local updates; following
    # the scaled Δ would put it ~3000 honest steps away.
    init, local = zip(*(init_and_local(p.run_dir, kjv_data, 5) for p in (a, b, bad)))
    names = [n for n, _ in build_trainer(load_config([str(a.run_dir / "config.yaml")]), str(kjv_data))
             .model.named_parameters()]
    glob = load_checkpoint(a.run_dir)["global_model"]
    honest_step = torch.cat([sum(init[0][i] - loc[i] for loc in local).flatten() / 3 for i in range(len(names))])
    got_step = torch.cat([(init[0][i] - glob[n]).flatten() for i, n in enumerate(names)])
    assert bool(torch.isfinite(got_step).all())
    assert float((got_step - honest_step).norm()) < 1.5 * float(honest_step.norm())
