"""Test helpers: start `photon-peer run` daemons as real processes on 127.0.0.1 and always reap them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import CLI, cli_env, tiny_overrides, torchrun
from photon_p2p.metrics import read_metrics
from deadlines import within


@dataclass
class Peer:
    name: str
    run_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def address(self, timeout: float = 60.0) -> str:
        """The peer's first full multiaddr, once its DHT is up (from RUN_DIR/peer.json)."""
        timeout = within(timeout)
        deadline = time.monotonic() + timeout
        info = self.run_dir / "peer.json"
        while time.monotonic() < deadline:
            if info.exists():
                try:
                    return json.loads(info.read_text())["maddrs"][0]
                except (json.JSONDecodeError, KeyError, IndexError):
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name} published no address within {timeout}s:\n{self.log()[-3000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.log()[-3000:]}") from None

    def records(self, kind: str) -> list[dict]:
        """This peer's metrics records of one kind (round, sync, eval, ...), as written so far."""
        if not (self.run_dir / "metrics.jsonl").exists():
            return []
        return [r for r in read_metrics(self.run_dir) if r.get("kind") == kind]

    def rounds(self) -> list[dict]:
        return self.records("round")


@dataclass
class Swarm:
    """Starts peers in their own sessions so that killing a peer kills its DHT child and p2pd too."""

    root: Path
    data_dir: Path
    peers: list[Peer] = field(default_factory=list)

    def start(self, name: str, *, initial: list[str] | None = None, extra: dict | None = None,
              args: list[str] | None = None, cli: list[str] | None = None, nproc: int = 1) -> Peer:
        run_dir = self.root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "peer.json").unlink(missing_ok=True)
        overrides = {"data.path": str(self.data_dir), "name": name, "federation.run_id": "test",
                     "federation.local_steps": 5, "federation.rounds": 2,
                     "federation.matchmaking_time": within(2.0), "federation.round_deadline": within(25.0),
                     "federation.allreduce_timeout": within(10.0), "federation.state_sync_timeout": within(10.0),
                     "federation.target_group_size": 4, "network.bootstrap_timeout": within(15.0),
                     "train.eval_every": 10, **(extra or {})}
        launcher = cli or (torchrun(nproc) if nproc > 1 else CLI)
        # info: each round's clock records and members, matchmaking attempts, regrouping (why a round went solo)
        cmd = [*launcher, "run", "--no-progress", "--log-level", os.environ.get("PHOTON_TEST_LOG_LEVEL", "info"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        for o in tiny_overrides(run_dir, **overrides):
            cmd += ["--set", o]
        if initial:
            cmd += ["--initial-peers", *initial]
        cmd += args or []
        log_path = run_dir / "peer.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                                    start_new_session=True)
        peer = Peer(name, run_dir, proc, log_path)
        self.peers.append(peer)
        return peer

    def kill(self, peer: Peer, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(peer.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_for(self, peers: list[Peer], ready, timeout: float, poll: float = 1.0) -> None:
        """Poll ``ready()`` until it holds; fail (with the peers' logs) at the deadline or if a peer exits."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline and all(p.proc.poll() is None for p in peers), \
                [p.log()[-2000:] for p in peers]
            time.sleep(poll)

    def stop(self, peers: list[Peer], timeout: float = 60.0) -> None:
        """SIGTERM each peer's process group (as Ctrl-C would) and require a clean exit (rc 0) in time."""
        for p in peers:
            self.kill(p, signal.SIGTERM)
        for p in peers:
            assert p.wait(within(timeout)) == 0, p.log()[-3000:]

    def close(self) -> None:
        for peer in self.peers:
            self.kill(peer, signal.SIGKILL)
        for peer in self.peers:
            try:
                peer.proc.wait(timeout=within(10))
            except subprocess.TimeoutExpired:
                pass
