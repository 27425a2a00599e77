"""Federation pieces that need no network: outer optimizers, multiaddr checks, codecs, partial all-reduce layout."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from photon_p2p.federation import FederationError
from photon_p2p.federation.compression import ByteCounter, CountingCompression, make_compression, roundtrip
from photon_p2p.federation.network import parse_multiaddrs
from photon_p2p.federation.outer import OuterOptimizer

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/QmUHTiz1Q8Rebet3GxAwVWDwVSKdzWDETGLDK6tPfB974N"


def _params() -> list[torch.Tensor]:
    return [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]


def test_fedavg_is_theta_minus_lr_delta():
    params = _params()
    opt = OuterOptimizer(params, "fedavg", lr=0.5, momentum=0.0)
    opt.step([torch.tensor([2.0, 4.0]), torch.tensor([[6.0]])])
    assert torch.equal(params[0], torch.tensor([0.0, 0.0])) and torch.equal(params[1], torch.tensor([[0.0]]))
    assert opt.state_tensors() == []


@pytest.mark.parametrize("kind", ["fedmom", "nesterov"])
def test_momentum_optimizers_follow_their_formulas(kind):
    lr, mu = 0.7, 0.9
    params = _params()
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    opt = OuterOptimizer(params, kind, lr=lr, momentum=mu)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        delta = [torch.randn(p.shape, generator=g) for p in params]
        opt.step(delta)
        for i, d in enumerate(delta):
            m[i] = mu * m[i] + d
            theta[i] = theta[i] - lr * (m[i] if kind == "fedmom" else d + mu * m[i])
    for p, t in zip(params, theta):
        torch.testing.assert_close(p, t)
    # state round-trips through both state_dict and the joiner's tensor list
    fresh = OuterOptimizer(_params(), kind, lr=lr, momentum=mu)
    fresh.load_state_dict(opt.state_dict())
    for a, b in zip(fresh.state_tensors(), m):
        torch.testing.assert_close(a, b)
    fresh.load_state_tensors([])
    assert all(not t.any() for t in fresh.state_tensors())


def test_outer_optimizer_rejects_bad_settings():
    with pytest.raises(FederationError):
        OuterOptimizer(_params(), "adam", lr=1.0, momentum=0.0)
    with pytest.raises(FederationError):
        OuterOptimizer(_params(), "fedmom", lr=1.0, momentum=1.5)
    opt = OuterOptimizer(_params(), "fedmom", lr=1.0, momentum=0.5)
    with pytest.raises(FederationError):
        opt.load_state_tensors([torch.zeros(3)])


@pytest.mark.parametrize("bad, reason", [("garbage", "unknown protocol"), ("", "empty"),
                                         ("/ip4/999.1.1.1/tcp/1", "IPv4"),
                                         ("/ip4/127.0.0.1/tcp/4001", "missing /p2p/")])
def test_parse_multiaddrs_rejects_with_one_line_reason(bad, reason):
    with pytest.raises(FederationError) as err:
        parse_multiaddrs([bad], "--initial-peers")
    msg = str(err.value)
    assert msg.startswith("invalid multiaddr for --initial-peers:") and reason in msg and "\n" not in msg


def test_parse_multiaddrs_accepts_valid():
    assert parse_multiaddrs([PEER], "--initial-peers") == [PEER]
    assert parse_multiaddrs(["/ip4/0.0.0.0/tcp/0"], "network.host_maddrs") == ["/ip4/0.0.0.0/tcp/0"]


def test_unknown_compression_is_a_federation_error():
    with pytest.raises(FederationError):
        make_compression("zip")


@pytest.mark.parametrize("name, tol", [("none", 0.0), ("fp16", 1e-3), ("scaled-fp16", 1e-3),
                                       ("uint8", 0.05), ("blockwise8", 0.02)])
def test_roundtrip_error_is_within_codec_precision(name, tol):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    y = roundtrip(name, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float((y - x).norm() / x.norm()) <= tol


def _count_in_child(codec, tensor) -> None:
    import threading

    # like hivemind's averager: torch's OpenMP pool can be broken after fork, a fresh thread gets a new one
    worker = threading.Thread(target=lambda: codec.extract(codec.compress(tensor, _info(tensor))))
    worker.start()
    worker.join()


def _info(t):
    from hivemind.compression import CompressionInfo

    return CompressionInfo.from_tensor(t)


def test_byte_counter_sees_counts_made_in_a_forked_process():
    counter = ByteCounter()
    codec = CountingCompression(make_compression("uint8"), counter)
    x = torch.randn(10000)
    proc = mp.get_context("fork").Process(target=_count_in_child, args=(codec, x))
    proc.start()
    proc.join(30)
    sent, received = counter.snapshot()
    assert sent == received and 10000 < sent < 10000 + 2000  # 1 byte per value + codebook + header
