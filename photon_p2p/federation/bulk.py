"""The bulk path: a group's uncompressed all-reduce over torch.distributed's gloo between reachable members.

hivemind stays in charge of discovery, matchmaking, state download and everything a NATed peer needs; once a
group is assembled and every member advertised a direct endpoint (``federation.transport``), the bytes move over
a gloo process group of that group's members: the first member's rendezvous store (a TCPStore each peer
hosts), a key prefix from hivemind's random group id, ranks in the group's order, kept for the next rounds of
the same members when every member still holds it (BulkGroups). Why gloo and not more tuning of
hivemind's butterfly: profiles (BENCHMARKS.md "Averaging speed") put hivemind at ~117 MB/s of fp32 per core,
protobuf + libp2p streams + Python per part; gloo's ring all-reduce is C++ with no per-part Python and runs
near memory/link speed, so the averager scales with the link instead of with one core.

Exactness: members all-reduce the weights, then their weight-scaled tensors in one flat buffer (the averager's
shared buffer itself when its tensors lie back to back in it: no copy in or out); gloo's ring
reduces each chunk once and copies the reduced bytes to every member, so every member divides the same sums by
the same total and ends on the same bytes (tests/test_bulk.py checks it), as hivemind's exact path does.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import threading
from collections import OrderedDict
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


class BulkBackoff:
    """Whether this member advertises its bulk endpoint in a round: not for FIRST_OFF, then twice as many ...
    MAX_OFF rounds after a gloo round of its group failed. A gloo collective has no isolation between members:
    one that calls another collective (or none) fails the whole group at the deadline, round after round
    (bench/scenarios.py adversary --attack gloo-weights: nothing averaged in 8 rounds). A group takes gloo only if EVERY
    member advertises an endpoint, so one honest member backing off sends its whole group to hivemind's
    all-reduce, where a member that misbehaves loses only its own part. Doubling: a member that breaks every gloo
    round costs O(log rounds) rounds (a broken collective hangs until its timeout, usually the whole round: with
    1, 2, 4 ... an 8-round run lost 3 rounds); a gloo round that succeeds (that member was not in it) starts the
    count again. An honest failure (a member crashed mid-round) is rare enough that FIRST_OFF rounds on hivemind
    cost little."""

    FIRST_OFF, MAX_OFF = 4, 64

    def __init__(self) -> None:
        self.off_until, self.failures = -1, 0

    def allows(self, round_no: int) -> bool:
        return round_no >= self.off_until

    def failed(self, round_no: int) -> int:
        """A gloo round of ours failed at ``round_no``: how many rounds this member now stays off gloo."""
        self.failures += 1
        off = min(self.FIRST_OFF * 2 ** (self.failures - 1), self.MAX_OFF)
        self.off_until = round_no + 1 + off
        return off

    def succeeded(self) -> None:
        self.failures = 0


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


class _Buffers:
    """Scratch buffers reused across rounds (page-faulting a fresh 100 MB buffer every round costs as much as the
    copy into it), up to ``limit`` bytes in all: past that (a multi-GB model) they are allocated per round and
    freed, so an averager does not hold several copies of the model between rounds."""

    def __init__(self, limit: int) -> None:
        self.limit, self.busy = limit, False
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        buf = self._kept.get(name)
        if buf is not None and buf.numel() == numel:
            return buf
        self._kept.pop(name, None)
        buf = torch.empty(numel, dtype=torch.float32)
        if sum(b.numel() * 4 for b in self._kept.values()) + numel * 4 <= self.limit:
            self._kept[name] = buf
        return buf


class _Kept:
    """One kept process group: the round it was built in (its ``gen``) and whether an all-reduce is using it."""

    def __init__(self, pg: dist.ProcessGroupGloo, gen: str) -> None:
        self.pg, self.gen, self.busy = pg, gen, False
        self.buffers = _Buffers(0)  # while in use: the averager's shared scratch buffers, unless another has them

    def buffer(self, name: str, numel: int) -> torch.Tensor:
        return self.buffers.get(name, numel)

    def shutdown(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # already broken by the failure that retires it
            pass


class BulkGroups:
    """The gloo process groups of this averager, kept across rounds: a group of the same members (the same
    endpoints, in the same order) reuses the process group of an earlier round instead of building a new one
    (the store rendezvous, gloo's full mesh of connections and its first collective's set-up cost 0.03–0.8 s
    per round on loopback, a large share of a 100 MB round's 0.2 s).

    Reuse is agreed, never assumed: each member writes the generation it holds for this member list ("-" for
    none) to member 0's store under the round's random group key and reads everyone's; only when all name the
    same generation do they reuse it, otherwise every member builds a new one under this round's key. A member
    that restarted, evicted the group, or saw it fail (any exception retires it) makes the whole group rebuild,
    so members never meet on two different process groups."""

    def __init__(self, timeout: float, threads: int = 2, keep: int = 4, rendezvous: float | None = None,
                 buffer_bytes: int = 2 ** 32) -> None:
        """``timeout``: each collective's deadline; ``rendezvous``: how long to wait for every member's word on
        reuse (a member hivemind counted but that left, a "ghost", never writes it: fail fast, not at the end)."""
        self.delta = datetime.timedelta(seconds=timeout)
        self.rendezvous = datetime.timedelta(seconds=min(timeout, rendezvous if rendezvous else timeout))
        self.threads, self.keep = max(1, threads), keep
        self._kept: OrderedDict[tuple, _Kept] = OrderedDict()
        self._stores: dict[str, dist.TCPStore] = {}
        self._lock = threading.Lock()
        self._buffers = _Buffers(buffer_bytes)  # one set for all groups: one all-reduce at a time uses it
        self.reused = 0  # how many rounds reused a kept process group (tests)

    def _store(self, endpoint: str) -> dist.TCPStore:
        store = self._stores.get(endpoint)
        if store is None:
            host, port = endpoint.rsplit(":", 1)
            store = self._stores[endpoint] = dist.TCPStore(host, int(port), None, False, self.delta)
        return store

    @contextmanager
    def group(self, rank: int, endpoints: Sequence[str], group_key: str) -> Iterator[_Kept]:
        """The members' process group for this round (kept or new), agreed with every member through member 0's
        store; retired if anything inside fails."""
        key = (rank, tuple(endpoints))
        with self._lock:
            kept = self._kept.get(key)
            have = kept.gen if kept is not None and not kept.busy else "-"
        try:
            agree = dist.PrefixStore(f"{group_key}/kept", self._store(endpoints[0]))
            agree.set(str(rank), have)
            agree.wait([str(r) for r in range(len(endpoints))], self.rendezvous)
            gens = {agree.get(str(r)).decode() for r in range(len(endpoints))}
        except Exception:
            self._stores.pop(endpoints[0], None)  # a stale connection to member 0: dial again next round
            raise
        if gens == {have} and have != "-":
            entry = kept
            self.reused += 1
        else:
            entry = _Kept(self._build(rank, endpoints, group_key), group_key)
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None and old is not entry and not old.busy:
                old.shutdown()
            entry.busy = True
            # a cancelled round's all-reduce may still be running on the shared buffers: then use fresh ones
            entry.buffers = self._buffers if not self._buffers.busy else _Buffers(0)
            entry.buffers.busy = True
            self._kept[key] = entry
            while len(self._kept) > self.keep:
                _, evicted = self._kept.popitem(last=False)
                if not evicted.busy:
                    evicted.shutdown()
        failed = True
        try:
            yield entry
            failed = False
        finally:
            with self._lock:
                entry.busy = entry.buffers.busy = False
                entry.buffers = _Buffers(0)
                current = self._kept.get(key) is entry
                if failed and current:
                    del self._kept[key]
                if failed or not current:
                    entry.shutdown()

    def _build(self, rank: int, endpoints: Sequence[str], group_key: str) -> dist.ProcessGroupGloo:
        """A gloo group of these members alone: member 0's store, keys under the (random, per-group) key."""
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=endpoints[rank].rsplit(":", 1)[0])]
        options._timeout = self.delta
        options._threads = self.threads
        return dist.ProcessGroupGloo(dist.PrefixStore(group_key, self._store(endpoints[0])), rank, len(endpoints),
                                     options)


def flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one flat fp32 tensor over their own storage, when they lie back to back in one buffer
    (the averager's shared buffers do: averaging.py allocates them so), else None; the bulk path then reduces
    in place, with no copy in or out."""
    if not tensors:
        return None
    first = tensors[0]
    ptr, start = first.untyped_storage().data_ptr(), first.storage_offset()
    offset = start
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr \
                or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return torch.empty(0, dtype=torch.float32).set_(first.untyped_storage(), start, (offset - start,))


def _flatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """The tensors one after the other at the start of ``flat`` (the rest is zeroed: padding)."""
    offset = 0
    for t in tensors:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    flat[offset:].zero_()


def _unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """The inverse of _flatten_into, in place: each tensor takes its values back."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _parts(valid: int, part_numel: int) -> Iterator[slice]:
    """A reducer's slice cut into parts of ``part_numel`` values (its ``valid`` ones: padding is never reduced)."""
    for start in range(0, max(0, valid), part_numel):
        yield slice(start, min(valid, start + part_numel))


def gather_weights(pg, weight: float, size: int, timeout) -> torch.Tensor:
    """Every member's declared weight, each slot exactly what that member sent. (Summed from vectors that each
    member fills at its own rank, one member could add into the others' slots: zero their weights and make its
    own chunk the whole update.)"""
    slots = [torch.zeros(1, dtype=torch.float64) for _ in range(size)]
    pg.allgather([slots], [torch.tensor([float(weight)], dtype=torch.float64)]).wait(timeout)
    return torch.cat(slots)


def allreduce_mean(tensors: Sequence[torch.Tensor], weight: float, rank: int, endpoints: Sequence[str],
                   group_key: str, groups: BulkGroups) -> BulkTraffic:
    """Replace ``tensors`` (fp32, in place) with the group's weighted mean; ``endpoints[i]`` is member i's
    "ip:port", member 0's store is the rendezvous. Raises on any failure (a member gone, a timeout): then no
    member applies anything from this round (gloo's collectives fail on every member together); the tensors
    are scratch then (the averager's buffers are copied in afresh for every stage)."""
    size = len(endpoints)
    with groups.group(rank, endpoints, group_key) as kept:
        weights = gather_weights(kept.pg, weight, size, groups.delta)
        bad = [(r, w) for r, w in enumerate(weights.tolist()) if not (math.isfinite(w) and w >= 0)]
        if bad:  # the same verdict on every member: no one applies anything from this round
            raise FederationError(f"member {bad[0][0]} declared the weight {bad[0][1]!r}")
        total = float(weights.sum())
        if total <= 0:
            raise FederationError("the group's total weight is zero")
        flat = flat_view(tensors)
        inplace = flat is not None
        if not inplace:
            flat = kept.buffer("flat", sum(t.numel() for t in tensors))
            _flatten_into(flat, tensors)
        if weight != 1.0:
            flat.mul_(weight)
        kept.pg.allreduce([flat]).wait(groups.delta)
        flat.div_(total)  # every member divides the same sums by the same total: the same bytes on all
        if not inplace:
            _unflatten(flat, tensors)
        # a ring all-reduce sends (and receives) 2·(n−1)/n of the buffer per member, plus the weights
        moved = int(2 * (size - 1) / size * (flat.numel() * flat.element_size() + 8))
        return BulkTraffic(moved, moved)


def local_robust_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float], reduce: Reducer,
                      part_numel: int) -> tuple[torch.Tensor, dict[int, float]]:
    """What robust_mean computes for a group of ``len(vectors)`` members, in one process and without a network
    (bench/fed_sim.py runs the daemons' clipping with it): member r reduces the r-th share of the flat vectors,
    part by part, senders in index order. The reduced vector and {sender: smallest factor}."""
    size, numel = len(vectors), vectors[0].numel()
    share = -(-numel // size)
    out = torch.empty_like(vectors[0])
    factors: dict[int, float] = {}
    for reducer in range(size):
        for part in _parts(min(share, numel - reducer * share), part_numel):
            at = slice(reducer * share + part.start, reducer * share + part.stop)
            out[at], part_factors = reduce([v[at] for v in vectors], list(weights), list(range(size)))
            for sender, f in part_factors.items():
                factors[sender] = min(f, factors.get(sender, 1.0))
    return out, factors


def robust_mean(tensors: Sequence[torch.Tensor], weight: float, rank: int, endpoints: Sequence[str],
                group_key: str, groups: BulkGroups, reduce: Reducer, part_numel: int, order: Sequence[int],
                check: Callable[[int, torch.Tensor], bool] | None = None) -> BulkTraffic:
    """Like allreduce_mean, but every member reduces one slice of the vector from every sender's chunk of it
    (all-to-all), so ``reduce`` (federation/robust.py: clipping, CenteredClip, dropping non-finite chunks) sees
    each sender's contribution, part by part of ``part_numel`` values; the reduced slices are then all-gathered,
    so every member ends on the same bytes. ``order``: the canonical summation order of sender ranks. ``check``
    (robust.ReducerCheck.accept): every member checks every reducer's slice, part by part, against what the
    senders declared; a part it refuses is zeroed (no update) — the same verdict on every member (same bytes)."""
    size = len(endpoints)
    numel = sum(t.numel() for t in tensors)
    share = -(-numel // size)  # ceil: each member reduces one share (the last one padded with zeros)

    def valid(reducer: int) -> int:  # values of a reducer's share that are not padding
        return min(share, numel - reducer * share)

    with groups.group(rank, endpoints, group_key) as kept:
        flat = kept.buffer("send", share * size)
        _flatten_into(flat, tensors)
        weights = gather_weights(kept.pg, weight, size, groups.delta)  # every member learns every sender's weight
        # alltoall_base on one flat buffer, not alltoall on lists of views: gloo's list form took 0.29-0.31 s for
        # 100 MB at 4 members against 0.08 s; the robust round went from 1.73-1.88x the plain one to 1.03-1.17x
        # (bench/results/allreduce_a2a)
        buffer = kept.buffer("received", share * size)
        kept.pg.alltoall_base(buffer, flat, [], [], dist.AllToAllOptions()).wait(groups.delta)
        received = list(buffer.view(size, share).unbind(0))
        mine = kept.buffer("mine", share)
        mine.zero_()
        factors: dict[int, float] = {}
        for part in _parts(valid(rank), part_numel):
            averaged, part_factors = reduce([r[part] for r in received], weights.tolist(), list(order))
            mine[part].copy_(averaged)
            for sender, f in part_factors.items():
                factors[sender] = min(f, factors.get(sender, 1.0))
        # The all-gather as an all-to-all of our share repeated to every member (0.09 s against gloo's ring
        # all-gather's 0.19 s at 4 members, 100 MB); the received chunks are no longer needed, so they hold the
        # copies, and what this member sent holds the reduced slices.
        buffer.view(size, share).copy_(mine.expand(size, share))
        gathered = flat
        kept.pg.alltoall_base(gathered, buffer, [], [], dist.AllToAllOptions()).wait(groups.delta)
        rejected: list[int] = []
        if check is not None:
            for reducer, piece in enumerate(gathered.view(size, share).unbind(0)):
                for part in _parts(valid(reducer), part_numel):
                    if not check(reducer, piece[part]):
                        piece[part].zero_()
                        if reducer not in rejected:
                            rejected.append(reducer)
        _unflatten(gathered, tensors)
        moved = int(2 * (size - 1) * share * 4 + (size - 1) * 8)
        return BulkTraffic(moved, moved, factors, rejected)
