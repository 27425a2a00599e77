"""Adaptive outer optimizers (FedAdam, FedYogi) and the outer lr schedule: math, state sharing, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from photon_p2p.config import ConfigError, FederationConfig, load_config
from photon_p2p.federation import FederationError
from photon_p2p.federation.outer import OuterOptimizer, outer_lr_at
from photon_p2p.global_state import GlobalState


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]


def _deltas(params, rounds: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) * 0.1 for p in params] for _ in range(rounds)]


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_follow_reddi_et_al(kind):
    """Reddi et al. 2021, Alg. 2 with Adam's bias correction: m ← β1 m + (1−β1)Δ;
    v ← β2 v + (1−β2)Δ² (FedAdam) or v ← v − (1−β2)Δ² sign(v − Δ²) (FedYogi); θ ← θ − η m̂ / (√v̂ + τ)."""
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    params = _params()
    theta = [p.clone().double() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    opt = OuterOptimizer(params, kind, lr=lr, momentum=b1, beta2=b2, eps=tau)
    for t, delta in enumerate(_deltas(params, 5), start=1):
        assert opt.step(delta, round_no=t - 1) == lr
        for i, d in enumerate(delta):
            d = d.double()
            m[i] = b1 * m[i] + (1 - b1) * d
            if kind == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            else:
                v[i] = v[i] - (1 - b2) * d * d * torch.sign(v[i] - d * d)
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            theta[i] = theta[i] - lr * m_hat / (v_hat.sqrt() + tau)
    for p, ref in zip(params, theta):
        torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)
    # the state is the moments of every parameter, then the step counts: 2 x 2 + 2 tensors here
    state = opt.state_tensors()
    assert len(state) == 6
    torch.testing.assert_close(state[0].double(), m[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state[3].double(), v[1], rtol=1e-5, atol=1e-9)
    assert float(state[4]) == 5.0


def test_yogi_differs_from_adam_once_the_second_moment_shrinks():
    a, y = _params(), _params()
    oa, oy = OuterOptimizer(a, "fedadam", lr=0.1, momentum=0.9), OuterOptimizer(y, "fedyogi", lr=0.1, momentum=0.9)
    big, small = [torch.ones_like(p) for p in a], [torch.full_like(p, 0.01) for p in a]
    for delta in (big, big, small, small):
        oa.step(delta)
        oy.step(delta)
    assert not torch.allclose(a[0], y[0])  # Yogi's v decays additively, Adam's multiplicatively


def test_outer_lr_schedule():
    assert [outer_lr_at(r, 1.0, "constant", 0, 0, 0.0) for r in (0, 5, 100)] == [1.0, 1.0, 1.0]
    # warmup over 4 rounds, then cosine from 1.0 to 0.1 over rounds 4..12, flat after
    lrs = [outer_lr_at(r, 1.0, "cosine", 4, 12, 0.1) for r in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == pytest.approx(0.55) and lrs[12] == pytest.approx(0.1)
    assert lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert outer_lr_at(2, 0.7, "constant", 4, 12, 0.0) == pytest.approx(0.7 * 3 / 4)  # warmup with constant
    # the optimizer applies the scheduled lr of the round it is told
    p = [torch.zeros(2)]
    opt = OuterOptimizer(p, "fedavg", lr=1.0, schedule="cosine", warmup_rounds=0, total_rounds=2)
    assert opt.step([torch.ones(2)], round_no=1) == pytest.approx(0.5)
    assert torch.allclose(p[0], torch.full((2,), -0.5))
    with pytest.raises(FederationError, match="cosine"):
        OuterOptimizer(_params(), "fedavg", lr=1.0, schedule="cosine", total_rounds=0)
    with pytest.raises(FederationError, match="schedule"):
        OuterOptimizer(_params(), "fedavg", lr=1.0, schedule="linear")


@pytest.mark.parametrize("kind", ["fedavg", "fedmom", "nesterov", "fedadam", "fedyogi"])
def test_two_instances_stay_identical_and_state_round_trips(kind):
    """Two peers stepping the same deltas hold bit-identical weights and state; a joiner that adopts the served
    state (or a resumed checkpoint) continues bit-identically."""
    a, b = _params(), _params()
    oa = OuterOptimizer(a, kind, lr=0.3, momentum=0.9, schedule="cosine", warmup_rounds=1, total_rounds=6)
    ob = OuterOptimizer(b, kind, lr=0.3, momentum=0.9, schedule="cosine", warmup_rounds=1, total_rounds=6)
    deltas = _deltas(a, 6, seed=3)
    for r, d in enumerate(deltas[:3]):
        oa.step(d, r)
        ob.step(d, r)
    assert all(torch.equal(x, y) for x, y in zip(a + oa.state_tensors(), b + ob.state_tensors()))
    joiner = [p.clone() for p in a]
    oj = OuterOptimizer(joiner, kind, lr=0.3, momentum=0.9, schedule="cosine", warmup_rounds=1, total_rounds=6)
    oj.load_state_tensors(oa.state_tensors())
    resumed = [p.clone() for p in a]
    orr = OuterOptimizer(resumed, kind, lr=0.3, momentum=0.9, schedule="cosine", warmup_rounds=1, total_rounds=6)
    orr.load_state_dict(oa.state_dict())
    for r, d in enumerate(deltas[3:], start=3):
        for o in (oa, oj, orr):
            o.step(d, r)
    for other, o in ((joiner, oj), (resumed, orr)):
        assert all(torch.equal(x, y) for x, y in zip(a + oa.state_tensors(), other + o.state_tensors()))
    # an empty list (a fedavg peer's, or a healed round) resets the state to its initial zeros
    oa.load_state_tensors([])
    fresh = OuterOptimizer(_params(), kind, lr=0.3, momentum=0.9)
    assert all(torch.equal(x, y) for x, y in zip(oa.state_tensors(), fresh.state_tensors()))
    if kind != "fedavg":  # fedavg holds no state and ignores whatever a peer of another kind serves
        with pytest.raises(FederationError, match="does not match"):
            oa.load_state_tensors([torch.zeros(7)] * len(oa.state_tensors()))


def test_global_state_fingerprints_and_serves_adam_moments():
    fed = FederationConfig(outer_optimizer="fedadam", outer_lr=0.01, outer_momentum=0.9)
    model = [torch.nn.Parameter(t) for t in _params()]
    s1 = GlobalState(model, fed)
    before = s1.fingerprint()
    for p in model:
        p.data.add_(0.1)
    s1.apply(s1.pseudo_gradient())
    assert s1.fingerprint() != before and s1.last_outer_lr == 0.01
    meta, tensors = s1.serve()
    assert len(tensors) == 2 + 6  # weights, then m and v of each parameter and their step counts
    s2 = GlobalState([torch.nn.Parameter(t) for t in _params()], fed)
    s2.adopt(meta, tensors)
    assert s2.fingerprint() == s1.fingerprint()  # same weights AND the same Adam moments
    s2.outer.load_state_tensors([])
    s2._changed()
    assert s2.fingerprint() != s1.fingerprint()  # the moments are part of the one model


def _bad_states(meta: dict, tensors: list[torch.Tensor]):
    n = 2
    yield {**meta, "round": float("nan")}, tensors, "not a count"
    yield {**meta, "round": "12"}, tensors, "not a count"
    yield {**meta, "round": -1}, tensors, "not a count"
    yield {**meta, "round": True}, tensors, "not a count"
    yield {**meta, "inner_step": 1.5}, tensors, "not a count"
    yield "not a dict", tensors, "not a count"
    yield {**meta, "n_params": 3}, tensors, "different model shape"
    yield meta, tensors[:1], "different model shape"
    yield meta, [torch.zeros(7), *tensors[1:]], "shape (7,)"
    yield meta, [tensors[0].double(), *tensors[1:]], "shape"
    yield meta, [*tensors[:n], torch.zeros(7), *tensors[n + 1:]], "outer optimizer state does not match"


def test_a_bad_downloaded_state_is_refused_whole_before_anything_is_copied():
    # issue 24, item 2: a state whose outer state had another shape, or whose round was NaN or a string, raised
    # halfway through adopt (weights already copied, the fingerprint stale) and the daemon exited.
    fed = FederationConfig(outer_optimizer="fedadam", outer_lr=0.01, outer_momentum=0.9)
    server = GlobalState([torch.nn.Parameter(t + 1.0) for t in _params()], fed)
    meta, tensors = server.serve(inner_step=40)
    peer = GlobalState([torch.nn.Parameter(t) for t in _params()], fed)
    before, weights = peer.fingerprint(), [w.clone() for w in peer.weights]
    for bad_meta, bad_tensors, why in _bad_states(meta, tensors):
        assert why in peer.mismatch(bad_meta, bad_tensors), (bad_meta, why)
        with pytest.raises(FederationError, match="not a count|shape|does not match"):
            peer.adopt(bad_meta, bad_tensors)
        assert peer.fingerprint() == before and all(torch.equal(a, b) for a, b in zip(weights, peer.weights))
        assert peer.round == 0
    assert peer.mismatch(meta, tensors) == ""
    peer.adopt(meta, tensors)
    assert peer.fingerprint() == server.fingerprint()


@pytest.mark.parametrize("override, message", [
    ("federation.outer_optimizer=adam", "fedadam, fedyogi"),
    ("federation.outer_beta2=1", "'federation.outer_beta2' must be in [0, 1)"),
    ("federation.outer_eps=0", "'federation.outer_eps' must be > 0"),
    ("federation.outer_warmup_rounds=-1", "'federation.outer_warmup_rounds' must be >= 0"),
    ("federation.outer_min_lr_ratio=2", "'federation.outer_min_lr_ratio' must be in [0, 1]"),
    ("federation.outer_lr_schedule=linear", "must be one of constant, cosine"),
])
def test_outer_config_is_validated(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(["tiny"], [override])
    assert message in str(e.value)


def test_cosine_outer_schedule_needs_rounds():
    with pytest.raises(ConfigError, match="needs federation.rounds > 0"):
        load_config(["tiny"], ["federation.outer_lr_schedule=cosine", "federation.rounds=0"])
    cfg = load_config(["tiny"], ["federation.outer_optimizer=fedyogi", "federation.outer_lr_schedule=cosine",
                                 "federation.outer_warmup_rounds=2", "federation.outer_eps=1e-4"])
    assert cfg.federation.outer_optimizer == "fedyogi" and math.isclose(cfg.federation.outer_eps, 1e-4)
