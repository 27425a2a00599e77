"""Multi-peer test helpers: a scripted peer process (run this file) and a fixture that reaps every peer it starts.

Peers are fresh interpreters (subprocess, own session): hivemind's forked averager cannot be built under the
spawn start method, and a whole process group can be SIGKILLed like a machine failure.
Protocol: the peer prints one JSON object per line ({"event": "ready", ...} first) and reads JSON commands.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from deadlines import within

REPO = Path(__file__).resolve().parent.parent
# Short windows so tests run in seconds; a slow machine stretches them with every other deadline (deadlines.py).
FAST_FED = dict(matchmaking_time=within(1.5), allreduce_timeout=within(10.0), round_deadline=within(8.0),
                target_group_size=4, min_group_size=2, state_sync_timeout=within(10.0))
FAST_NET = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap_timeout=within(20.0), request_timeout=within(3.0),
                use_relay=False)


def make_tensors(shapes: list[list[int]], seed: int) -> list[Any]:
    """Deterministic test tensors, reproducible in the test process to compute expected means."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


class Peer:
    """A peer process speaking the JSON-lines protocol."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", HIVEMIND_LOGLEVEL=os.environ.get("HIVEMIND_LOGLEVEL", "WARNING"))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True, cwd=REPO)
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self.ready: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"peer {self.pid}: no '{event}' within {timeout}s (log: {self.log.name})") from None
            if msg is None:
                raise RuntimeError(f"peer {self.pid} exited before '{event}' (log: {self.log.name}):\n"
                                   + Path(self.log.name).read_text()[-3000:])
            if msg.get("event") == "error":
                raise RuntimeError(f"peer {self.pid} failed: {msg['error']}")
            if msg.get("event") == event:
                if event == "ready":
                    self.ready = msg
                return msg

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(within(10))
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


class PeerPool:
    """Starts peers and remembers them, so that ``reap()`` can SIGKILL every process group afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.peers = log_dir, []

    def __call__(self, spec: dict[str, Any]) -> Peer:
        peer = Peer(spec, self.log_dir / f"peer{len(self.peers)}.log")
        self.peers.append(peer)
        return peer

    def swarm(self, n: int, spec: dict[str, Any], timeout: float = 90) -> list[Peer]:
        """n peers that share ``spec``; the first one is the others' initial peer."""
        first = self(spec)
        maddrs = first.expect("ready", timeout)["maddrs"]
        others = [self({**spec, "initial_peers": maddrs[:1]}) for _ in range(n - 1)]
        for peer in others:
            peer.expect("ready", timeout)
        return [first, *others]

    def reap(self) -> None:
        for peer in self.peers:
            peer.kill_group()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[PeerPool]:
    """``spawn(spec) -> Peer``; at teardown, even after a failure, every peer's process group is SIGKILLed."""
    pool = PeerPool(tmp_path)
    yield pool
    pool.reap()


# ---- the peer process ------------------------------------------------------------------------------------

def _peer_main(spec: dict[str, Any]) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    # round outcomes, regroups and each stage's group, in the peer's log
    logging.getLogger("photon_p2p").setLevel(logging.DEBUG)

    from photon_p2p.config import FederationConfig, NetworkConfig
    from photon_p2p.federation.averaging import PseudoGradientAverager
    from photon_p2p.federation.network import start_dht, visible_maddrs

    out_lock = threading.Lock()

    def emit(**msg: Any) -> None:
        with out_lock:
            print(json.dumps(msg), flush=True)

    net = NetworkConfig(**{**FAST_NET, **spec.get("net", {})})
    dht = start_dht(net, initial_peers=spec.get("initial_peers", []))
    shapes = spec["shapes"]
    state = (spec.get("state_meta", {"round": 0}),
             make_tensors(spec.get("state_shapes", shapes), spec.get("state_seed", 1000)))
    averagers = {}
    owner, admission = None, None
    if spec.get("owner_pub"):  # a closed swarm: "owner_pub" key file, "token" file, and net.identity_path set
        from photon_p2p.credentials import load_owner_public, public_bytes
        from photon_p2p.federation.admission import SwarmAdmission

        owner = public_bytes(load_owner_public(spec["owner_pub"]))
        admission = SwarmAdmission(dht, owner, Path(spec["token"]).read_text(), str(dht.peer_id),
                                   net.request_timeout, 90.0)
        admission.refresh()
    if spec.get("break_gloo"):  # a member that fails every gloo all-reduce it is in (bulk.BulkBackoff)
        from photon_p2p.federation.hivemind_ext import averager as process_averager

        def broken(*args: Any, **kwargs: Any) -> Any:
            with open(spec["break_gloo"], "a") as f:  # one line per gloo all-reduce its group tried
                f.write("gloo\n")
            time.sleep(spec.get("break_gloo_hang", 0.0))  # hung in the collective, past the round's deadline
            raise RuntimeError("this member breaks every gloo all-reduce")
        process_averager.allreduce_mean = process_averager.robust_mean = broken
    # "global_seed": this peer's global weights, shared with its averager so a split group can heal
    globals_ = make_tensors(shapes, spec["global_seed"]) if "global_seed" in spec else None
    for name, fed in spec.get("averagers", {"main": {}}).items():
        cfg = FederationConfig(**{**FAST_FED, "run_id": f"test-{name}", **fed})
        averagers[name] = PseudoGradientAverager(dht, make_tensors(shapes, 0), cfg, net, lambda: state,
                                                 global_tensors=globals_, owner_public=owner)
    emit(event="ready", maddrs=visible_maddrs(dht), pid=os.getpid(), peer_id=str(dht.peer_id))
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        avg = averagers[cmd.get("averager", "main")]
        if admission is not None:
            admission.refresh()  # as the daemon does every round: republish our token, read revocations
        if cmd["cmd"] == "average":
            deltas = make_tensors(shapes, cmd["seed"])
            if cmd.get("announce_traffic"):  # tells the test when the all-reduce has begun moving data
                threading.Thread(target=_announce_traffic, args=(avg, emit), daemon=True).start()
            plan = replan = None
            if "members" in cmd:  # the round's live peers: one group, or rows then columns (groups.py)
                from photon_p2p.federation.groups import plan_groups

                plan = plan_groups(cmd["members"], avg.peer_id, cmd["target"])
                if "members_later" in cmd:  # what a fresh read of the members says from later_s on
                    seen_at = time.monotonic() + cmd["later_s"]
                    later = plan_groups(cmd["members_later"], avg.peer_id, cmd["target"])
                    replan = lambda: later if time.monotonic() >= seen_at else plan  # noqa: E731
            res = avg.average(deltas, cmd["round"], weight=cmd["weight"], fingerprint=cmd.get("fingerprint", ""),
                              plan=plan, replan=replan)
            torch.save(deltas, cmd["out"])
            emit(event="averaged", **res.__dict__, finite=all(bool(torch.isfinite(d).all()) for d in deltas))
        elif cmd["cmd"] == "load_state":
            got = avg.load_state(timeout=cmd["timeout"])
            if got is not None:
                torch.save(got[1], cmd["out"])
            emit(event="state", meta=got[0] if got else None)
    for avg in averagers.values():
        avg.shutdown()
    dht.shutdown()
    emit(event="bye")


def _bootstrap_main(spec: dict[str, Any]) -> None:
    """Try to join through a well-formed but unreachable peer; report the error, time and leftover children."""
    import socket

    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    from photon_p2p.config import NetworkConfig
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.network import start_dht

    key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PeerID.from_identity(key.SerializeToString())}"
    net = NetworkConfig(**{**FAST_NET, "bootstrap_timeout": spec["bootstrap_timeout"]})
    t0 = time.monotonic()
    try:
        start_dht(net, initial_peers=[addr])
        error = None
    except FederationError as e:
        error = str(e)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    children = [f"{p.pid}:{p.name()}" for p in __import__("psutil").Process().children(recursive=True)
                if p.name() != "torch_shm_manager" and p.status() != "zombie"]
    print(json.dumps({"event": "done", "error": error, "elapsed": elapsed, "children": children}), flush=True)


def _announce_traffic(avg: Any, emit: Any) -> None:
    sent0 = avg.counter.snapshot()[0]
    while avg.counter.snapshot()[0] == sent0:
        time.sleep(0.01)
    emit(event="traffic")


if __name__ == "__main__":
    try:
        _spec = json.loads(sys.argv[1])
        _bootstrap_main(_spec) if _spec.get("mode") == "bootstrap" else _peer_main(_spec)
    except Exception as e:  # report instead of dying silently, so the test shows why
        print(json.dumps({"event": "error", "error": f"{type(e).__name__}: {e}"}), flush=True)
        raise
