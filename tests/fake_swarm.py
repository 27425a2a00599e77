"""An in-process fake of the ``Swarm`` protocol: several PeerDaemons in one process, driven round by round.

The fake keeps the semantics the daemon relies on: a group averages Δ weighted by tokens (or local weights when
the members' fingerprints differ), every member gets the same values, a peer that is not in the group gets a
solo result, and state downloads return the newest state served by another peer. Which peers group in which
round is scripted by the test (``plan``), so clock, catch-up, healing and the guard are tested deterministically.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from photon_p2p.federation.averaging import LEFT, RoundResult
from photon_p2p.federation.protocol import speed_quota


@dataclass
class FakeNet:
    """Shared by the fake peers of one test: who is live, what each serves, and the grouping plan."""

    plan: Callable[[int, str], list[str] | None] = lambda round_no, me: None  # None: everyone live at that round
    peers: dict[str, "FakeSwarm"] = field(default_factory=dict)
    barrier_timeout: float = 30.0
    pending: dict[int, dict[str, tuple]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    progress: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # peer: (round, steps, speed)
    targeted_downloads: bool = True  # False: a download from chosen holders (a split's majority) finds nobody
    # broken(round, peer): the fraction of this member's values whose stream from their reducer broke: it alone
    # gets zeros there (no update), as hivemind's all-reduce returns for a failed reducer; the others the mean
    broken: Callable[[int, str], float] = lambda round_no, me: 0.0


class FakeSwarm:
    def __init__(self, net: FakeNet, name: str, global_params, state_provider) -> None:
        self.net, self.peer_id, self.maddrs = net, name, [f"/fake/{name}"]
        self.connection = "direct"
        self.global_params, self.state_provider = global_params, state_provider
        self.snapshot: Callable[[], dict] | None = None
        self.live = True
        net.peers[name] = self

    def start(self, snapshot) -> None:
        self.snapshot = snapshot

    def check_run(self) -> None:
        pass

    def peers(self) -> list[dict]:
        return [p.snapshot() | {"peer_id": n} for n, p in self.net.peers.items()
                if n != self.peer_id and p.live and p.snapshot is not None]

    # the clock: each peer's speed (its steps over their compute seconds), and the real quota rule over them
    def report_progress(self, round_no: int, steps: int, busy_s: float) -> None:
        old = self.net.progress.get(self.peer_id, (0, 0, 0.0))[2]
        self.net.progress[self.peer_id] = (round_no, steps, steps / busy_s if steps and busy_s > 0 else old)

    def round_quota(self, round_no: int, local_steps: int, late: bool = False) -> int:
        own = self.net.progress.get(self.peer_id, (0, 0, 0.0))[2]
        others = [s for n, (r, _, s) in self.net.progress.items()
                  if n != self.peer_id and self.net.peers[n].live and r >= round_no - 1]
        return speed_quota(local_steps, own, others)

    def others_done(self, round_no: int) -> bool:
        return True  # an averaging helper goes straight to the group: average() waits for every member

    def seen_ahead(self, round_no: int) -> bool:
        # the clock's last fetch: every live peer's round as reported (the real one is seconds old)
        return any(r > round_no for n, (r, _, _) in self.net.progress.items()
                   if n != self.peer_id and self.net.peers[n].live)

    def strangers(self, members: frozenset) -> bool:
        return not members or any(n not in members for n, p in self.net.peers.items() if p.live and n != self.peer_id)

    def begin_round(self, round_no: int) -> None:
        old = self.net.progress.get(self.peer_id, (0, 0, 0.0))
        self.net.progress[self.peer_id] = (round_no, 0, old[2])  # the last measured speed carries over

    def average(self, deltas, round_no, weight, *, stop, fingerprint, budget, joined="") -> RoundResult:
        group = self.net.plan(round_no, self.peer_id)
        if group is None:
            group = [n for n, p in self.net.peers.items() if p.live]
        if self.peer_id not in group or len(group) < 2:
            # like a real straggler, matchmaking gives up only after the group it missed has finished the round
            others = [p for n, p in self.net.peers.items() if p.live and n != self.peer_id]
            with self.net.cond:
                past = self.net.cond.wait_for(
                    lambda: all(p.snapshot and p.snapshot()["round"] > round_no for p in others),
                    self.net.barrier_timeout)
            return RoundResult(round_no, True, 1, [], weight, 0.0, 0, 0, LEFT if past and others else "no group found")
        key = (round_no, tuple(sorted(group)))
        with self.net.cond:
            box = self.net.pending.setdefault(key, {})
            globals_ = [g.clone() for g in self.global_params]
            box[self.peer_id] = ([d.clone() for d in deltas], weight, fingerprint, globals_)
            self.net.cond.notify_all()
            if not self.net.cond.wait_for(lambda: len(box) == len(group), self.net.barrier_timeout):
                return RoundResult(round_no, True, 1, [], weight, 0.0, 0, 0, "deadline")
        members = sorted(box)
        prints = {n: box[n][2] for n in members}
        healed = len(set(prints.values())) > 1
        total = sum(box[n][1] for n in members)
        for i, d in enumerate(deltas):
            if healed:  # average local weights θ_g − Δ, as the real averager does
                values = [box[n][3][i] - box[n][0][i] for n in members]
            else:
                values = [box[n][0][i] for n in members]
            d.copy_(sum(box[n][1] * v for n, v in zip(members, values)) / total)
        lost = self.net.broken(round_no, self.peer_id)
        for d in deltas if lost else ():
            flat = d.view(-1)
            flat[:max(1, int(lost * flat.numel()))] = 0
        return RoundResult(round_no, False, len(members), members, total, 0.0, 0, 0, "", healed=healed,
                           fingerprints=prints, partial=lost)

    def load_state(self, timeout: float, progress: bool, only: list[str] | None = None, exclude: list[str] = ()):
        if only is not None and not self.net.targeted_downloads:
            return None
        servers = [(n, p) for n, p in self.net.peers.items() if n != self.peer_id and p.live and p.snapshot
                   and (only is None or n in only) and n not in exclude]
        if not servers:
            return None
        name, best = max(servers, key=lambda s: s[1].snapshot()["round"])
        meta, tensors = best.state_provider()
        return {**meta, "served_by": name}, tensors  # as the real averager stamps it

    def publish_now(self) -> None:
        with self.net.cond:
            self.net.cond.notify_all()  # a straggler may be waiting for this peer's round to advance

    def shutdown(self) -> None:
        self.live = False


def factory(net: FakeNet, name: str):
    def make(cfg, global_params, state_provider):
        return FakeSwarm(net, name, global_params, state_provider)

    return make


def assert_equal_models(*state_lists: list[torch.Tensor]) -> None:
    for tensors in state_lists[1:]:
        assert all(torch.equal(a, b) for a, b in zip(state_lists[0], tensors))
