"""The bulk path: a group's uncompressed all-reduce over torch.distributed's gloo between reachable members.

hivemind stays in charge of discovery, matchmaking, state download and everything a NATed peer needs; once a
group is assembled and every member advertised a direct endpoint (``federation.transport``), the bytes move over
a gloo process group built for that group alone: the first member's rendezvous store (a TCPStore each peer
hosts), a key prefix from hivemind's random group id, ranks in the group's order. Why gloo and not more tuning of
hivemind's butterfly: profiles (BENCHMARKS.md "Averaging speed") put hivemind at ~117 MB/s of fp32 per core,
protobuf + libp2p streams + Python per part; gloo's ring all-reduce is C++ with no per-part Python and runs
near memory/link speed, so the averager scales with the link instead of with one core.

Exactness: members all-reduce their weight-scaled tensors and the weights in one flat buffer; gloo's ring
reduces each chunk once and copies the reduced bytes to every member, so every member divides the same sums by
the same total and ends on the same bytes (tests/test_bulk.py checks it), as hivemind's exact path does.
"""

from __future__ import annotations

import datetime
import ipaddress
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from photon_p2p.federation import FederationError

GATHER_KEY = "bulk"  # a member's "ip:port" endpoint in its gathered metadata


def direct_ip(maddrs: Sequence[str]) -> str | None:
    """The IP other members should dial: the first routable ip4/ip6 of this peer's addresses (loopback only if
    that is all there is, as in a single-machine swarm); None for relay-only addresses."""
    found: list[str] = []
    for m in maddrs:
        parts = str(m).split("/")
        if "p2p-circuit" in parts:
            continue
        for proto, value in zip(parts, parts[1:]):
            if proto in ("ip4", "ip6"):
                try:
                    ip = ipaddress.ip_address(value)
                except ValueError:
                    break
                if not ip.is_unspecified:
                    found.append(str(ip))
                break
    public = [ip for ip in found if not ipaddress.ip_address(ip).is_loopback]
    return (public or found or [None])[0]


class BulkEndpoint:
    """This peer's rendezvous store for groups it leads (a TCPStore server; gloo pairs use their own ports)."""

    def __init__(self, ip: str, timeout: float) -> None:
        try:
            self.store = dist.TCPStore(ip, 0, None, True, datetime.timedelta(seconds=timeout),
                                       wait_for_workers=False)
        except Exception as e:  # the address is not ours to bind (a wrong announce address): say which
            raise FederationError(f"cannot open the bulk transport's rendezvous on {ip}: {e}") from None
        self.address = f"{ip}:{self.store.port}"


@dataclass
class BulkTraffic:
    sent: int
    received: int
    factors: dict[int, float] = field(default_factory=dict)  # robust path: sender rank -> smallest factor kept
    rejected: list[int] = field(default_factory=list)  # robust path: reducers whose slices failed ``check``


# (chunks by sender rank, their weights, summation order) -> (the reduced chunk, {sender rank: factor < 1})
Reducer = Callable[[list, list, list], tuple[torch.Tensor, dict]]


@contextmanager
def _process_group(rank: int, endpoints: Sequence[str], group_key: str, delta: datetime.timedelta,
                   threads: int) -> Iterator[dist.ProcessGroupGloo]:
    """A gloo group of these members alone: member 0's store, keys under the (random, per-group) ``group_key``."""
    host, port = endpoints[0].rsplit(":", 1)
    store = dist.TCPStore(host, int(port), None, False, delta)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=endpoints[rank].rsplit(":", 1)[0])]
    options._timeout = delta
    options._threads = max(1, threads)
    pg = dist.ProcessGroupGloo(dist.PrefixStore(group_key, store), rank, len(endpoints), options)
    try:
        yield pg
    finally:
        try:
            pg.shutdown()
        except Exception:  # already broken by the failure being raised
            pass


def _flatten(tensors: Sequence[torch.Tensor], length: int, scale: float = 1.0) -> torch.Tensor:
    """The tensors one after the other in a zero-padded fp32 buffer of ``length`` values (times ``scale``)."""
    flat = torch.zeros(length, dtype=torch.float32)
    offset = 0
    for t in tensors:
        piece = flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        if scale != 1.0:
            piece.mul_(scale)
        offset += t.numel()
    return flat


def _unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """The inverse of _flatten, in place: each tensor takes its values back (divided by ``scale``)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        if scale != 1.0:
            t.div_(scale)
        offset += t.numel()


def _parts(valid: int, part_numel: int) -> Iterator[slice]:
    """A reducer's slice cut into parts of ``part_numel`` values (its ``valid`` ones: padding is never reduced)."""
    for start in range(0, max(0, valid), part_numel):
        yield slice(start, min(valid, start + part_numel))


def allreduce_mean(tensors: Sequence[torch.Tensor], weight: float, rank: int, endpoints: Sequence[str],
                   group_key: str, timeout: float, threads: int = 2) -> BulkTraffic:
    """Replace ``tensors`` (fp32, in place) with the group's weighted mean; ``endpoints[i]`` is member i's
    "ip:port", member 0's store is the rendezvous. Raises on any failure (a member gone, a timeout): then no
    member applies anything from this round (gloo's collectives fail on every member together)."""
    size = len(endpoints)
    delta = datetime.timedelta(seconds=timeout)
    with _process_group(rank, endpoints, group_key, delta, threads) as pg:
        numel = sum(t.numel() for t in tensors)
        flat = _flatten(tensors, numel + 1, scale=weight)
        flat[-1] = weight
        pg.allreduce([flat]).wait(delta)
        total = float(flat[-1])
        if total <= 0:
            raise FederationError("the group's total weight is zero")
        _unflatten(flat, tensors, scale=total)
        # a ring all-reduce sends (and receives) 2·(n−1)/n of the buffer per member
        moved = int(2 * (size - 1) / size * flat.numel() * flat.element_size())
        return BulkTraffic(moved, moved)


def robust_mean(tensors: Sequence[torch.Tensor], weight: float, rank: int, endpoints: Sequence[str],
                group_key: str, timeout: float, reduce: Reducer, part_numel: int, order: Sequence[int],
                threads: int = 2, check: Callable[[int, torch.Tensor], bool] | None = None) -> BulkTraffic:
    """Like allreduce_mean, but every member reduces one slice of the vector from every sender's chunk of it
    (all-to-all), so ``reduce`` (federation/robust.py: clipping, CenteredClip, dropping non-finite chunks) sees
    each sender's contribution, part by part of ``part_numel`` values; the reduced slices are then all-gathered,
    so every member ends on the same bytes. ``order``: the canonical summation order of sender ranks. ``check``
    (robust.ReducerCheck.accept): every member checks every reducer's slice, part by part, against what the
    senders declared; a part it refuses is zeroed (no update) — the same verdict on every member (same bytes)."""
    size = len(endpoints)
    delta = datetime.timedelta(seconds=timeout)
    numel = sum(t.numel() for t in tensors)
    share = -(-numel // size)  # ceil: each member reduces one share (the last one padded with zeros)
    flat = _flatten(tensors, share * size)

    def valid(reducer: int) -> int:  # values of a reducer's share that are not padding
        return min(share, numel - reducer * share)

    with _process_group(rank, endpoints, group_key, delta, threads) as pg:
        weights = torch.zeros(size, dtype=torch.float64)
        weights[rank] = weight
        pg.allreduce([weights]).wait(delta)  # every member learns every sender's weight
        received = [torch.empty(share, dtype=torch.float32) for _ in range(size)]
        pg.alltoall(received, list(flat.view(size, share).unbind(0))).wait(delta)
        mine = flat.new_zeros(share)
        factors: dict[int, float] = {}
        for part in _parts(valid(rank), part_numel):
            averaged, part_factors = reduce([r[part] for r in received], weights.tolist(), list(order))
            mine[part].copy_(averaged)
            for sender, f in part_factors.items():
                factors[sender] = min(f, factors.get(sender, 1.0))
        gathered = [torch.empty(share, dtype=torch.float32) for _ in range(size)]
        pg.allgather([gathered], [mine]).wait(delta)
        rejected: list[int] = []
        if check is not None:
            for reducer, piece in enumerate(gathered):
                for part in _parts(valid(reducer), part_numel):
                    if not check(reducer, piece[part]):
                        piece[part].zero_()
                        if reducer not in rejected:
                            rejected.append(reducer)
        _unflatten(torch.cat(gathered), tensors)
        moved = int(2 * (size - 1) * share * 4 + (size - 1) * 8)
        return BulkTraffic(moved, moved, factors, rejected)
