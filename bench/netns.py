"""Network-namespace testbed for benchmarks: N isolated "machines" on one host, joined by shaped veth links.

Usage (as a library):

    from netns import Testbed, unsupported_reason
    if (why := unsupported_reason()):
        raise SystemExit(f"skipped: {why}")
    with Testbed(2, rate_mbit=100) as tb:           # 2 peers: one veth pair; >2: veths to a bridge
        p = tb.popen(0, ["python", "-c", "..."])     # runs inside namespace 0 (ip netns exec)
        tb.counters(0)                               # {"tx_bytes": ..., "rx_bytes": ..., ...} of its link
    # namespaces, links, bridge and every process started in them are gone here (also at interpreter exit)

Also here: ``CounterPoller`` (samples every namespace's tx/rx counters in a thread, for per-interval byte
counts) and ``start_photon_peer`` / ``wait_peer_address`` (a `photon-peer run` daemon inside a namespace).

Usage (command line, a self-check): ``python bench/netns.py [--peers 2] [--rate-mbit 20]`` builds the testbed,
pushes a few MB through the shaped link, prints the measured throughput and tears everything down.

Each namespace i gets address 10.<a>.<b>.(i+1)/24 on its link (``Testbed.addr(i)``); its egress is shaped with
tbf at ``rate_mbit`` (both directions of a link are shaped, each by its sender). Names carry this process's pid
(``pp<pid>-<i>``), so concurrent benchmarks never collide, and stale ones of dead processes can be removed.
Requires root and iproute2 (``ip``, ``tc``); ``unsupported_reason()`` says why not, instead of failing later.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from local_swarm import PeerStartError, wait_for_address  # noqa: E402
from local_swarm import stop_all as stop_procs  # noqa: E402,F401  (the benchmarks tear peers down with it)

_LIVE: "weakref.WeakSet[Testbed]" = weakref.WeakSet()


class NetnsError(RuntimeError):
    """Setting up the testbed failed (message is one line)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def unsupported_reason() -> str | None:
    """None when namespaces, veth and tbf work here; otherwise a short reason (for a 'skipped: ...' line)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root or with CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    # A real probe: some containers have the tools and root but no permission to create namespaces.
    name = f"pp{os.getpid()}-probe"
    try:
        p = _ip("netns", "add", name, check=False)
        if p.returncode != 0:
            return f"cannot create a network namespace ({p.stderr.strip()})"
        p = _ip("-n", name, "link", "add", "pv0", "type", "veth", "peer", "name", "pv1", check=False)
        if p.returncode != 0:
            return f"cannot create veth links ({p.stderr.strip()})"
        q = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "pv0", "root", "tbf",
                            "rate", "10mbit", "burst", "32kb", "latency", "50ms"], capture_output=True, text=True)
        if q.returncode != 0:
            return f"tc tbf is not available ({q.stderr.strip()})"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def cleanup_stale(prefix: str = "pp") -> list[str]:
    """Delete namespaces left by testbeds whose process died without tearing down (e.g. SIGKILL)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix) or "-" not in name:
            continue
        pid = name[len(prefix):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _kill_ns_pids(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace ``ns`` (daemons' helpers such as p2pd included)."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Node:
    index: int
    ns: str
    ifname: str
    addr: str


class Testbed:
    """N namespaces with shaped links; a context manager that always removes everything it made."""

    def __init__(self, n: int, rate_mbit: float | None = None, burst_kb: float | None = None,
                 latency_ms: float = 50.0, tag: str = "") -> None:
        if n < 2:
            raise NetnsError("a testbed needs at least 2 namespaces")
        if n > 250:
            raise NetnsError("at most 250 namespaces (one /24)")
        self.n, self.rate_mbit, self.latency_ms = n, rate_mbit, latency_ms
        # tbf needs a bucket of at least one timer tick of traffic; 5 ms of the rate (>= 32 KB) is safe.
        self.burst_kb = burst_kb or (max(32.0, rate_mbit * 1e6 / 8 * 0.005 / 1024) if rate_mbit else 0.0)
        pid = os.getpid()
        self.prefix = f"pp{pid}{tag}"
        if len(self.prefix) + 4 > 15:  # kernel interface names are at most 15 characters
            raise NetnsError(f"name prefix {self.prefix!r} too long")
        # A subnet derived from the pid: two testbeds of different processes do not share addresses.
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50) % 256}"
        self.bridge = f"{self.prefix}br" if n > 2 else ""
        self.nodes = [Node(i, f"{self.prefix}-{i}", f"{self.prefix}n{i}", f"{self.subnet}.{i + 1}") for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._anchors: list[subprocess.Popen] = []  # one idle process per namespace: counters via its /proc
        self._up = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        self.setup()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    def setup(self) -> None:
        _LIVE.add(self)
        self._up = True  # set first: a half-built testbed is torn down too
        try:
            for node in self.nodes:
                _ip("netns", "add", node.ns)
                _ip("-n", node.ns, "link", "set", "lo", "up")
            if self.n == 2:
                a, b = self.nodes
                _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
            else:
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("link", "set", self.bridge, "up")
                for node in self.nodes:
                    host_end = f"{self.prefix}h{node.index}"
                    _ip("link", "add", node.ifname, "netns", node.ns, "type", "veth", "peer", "name", host_end)
                    _ip("link", "set", host_end, "master", self.bridge)
                    _ip("link", "set", host_end, "up")
            for node in self.nodes:
                _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
                _ip("-n", node.ns, "link", "set", node.ifname, "up")
                if self.rate_mbit:
                    self.shape(node.index, self.rate_mbit)
                # Reading /proc/<pid>/net/dev of a process inside the namespace costs no fork per sample,
                # so counters can be polled often while benchmarks run.
                self._anchors.append(subprocess.Popen(self.argv(node.index, ["sleep", "infinity"]),
                                                      start_new_session=True))
        except BaseException:
            self.teardown()
            raise

    def shape(self, i: int, rate_mbit: float) -> None:
        """(Re)shape namespace i's egress to ``rate_mbit`` with a token bucket filter."""
        node = self.nodes[i]
        burst = self.burst_kb or max(32.0, rate_mbit * 1e6 / 8 * 0.005 / 1024)
        cmd = ["tc", "qdisc", "replace", "dev", node.ifname, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
               "burst", f"{burst:.0f}kb", "latency", f"{self.latency_ms:g}ms"]
        p = subprocess.run(["ip", "netns", "exec", node.ns, *cmd], capture_output=True, text=True)
        if p.returncode != 0:
            raise NetnsError(f"tc tbf on {node.ns} failed: {p.stderr.strip()}")

    def teardown(self) -> None:
        """Kill processes (ours, then anything left inside), delete namespaces (their veths go with them)."""
        if not self._up:
            return
        self._up = False
        stop_procs(self.procs)
        stop_procs(self._anchors, grace=0.0)
        for node in self.nodes:
            _kill_ns_pids(node.ns)
        for node in self.nodes:
            _ip("netns", "del", node.ns, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        _LIVE.discard(self)

    # ---- use ---------------------------------------------------------------------------------------------
    def addr(self, i: int) -> str:
        return self.nodes[i].addr

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[i].ns, *argv]

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside namespace i in its own session (so teardown can kill its whole group)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(i, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, argv), capture_output=True, text=True, timeout=timeout)

    def counters(self, i: int) -> dict[str, int]:
        """Bytes and packets through namespace i's link as the kernel counts them (all protocols, headers)."""
        node = self.nodes[i]
        if i < len(self._anchors) and self._anchors[i].poll() is None:
            try:
                with open(f"/proc/{self._anchors[i].pid}/net/dev") as f:
                    for line in f:
                        name, _, rest = line.partition(":")
                        if name.strip() == node.ifname:
                            v = [int(x) for x in rest.split()]
                            return {"rx_bytes": v[0], "rx_packets": v[1], "tx_bytes": v[8], "tx_packets": v[9]}
            except OSError:
                pass  # the anchor is gone (or not yet in the namespace): ask ip instead
        out = _ip("-j", "-s", "-n", node.ns, "link", "show", "dev", node.ifname).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx_bytes": int(stats["tx"]["bytes"]), "rx_bytes": int(stats["rx"]["bytes"]),
                "tx_packets": int(stats["tx"]["packets"]), "rx_packets": int(stats["rx"]["packets"])}

    def all_counters(self) -> list[dict[str, int]]:
        return [self.counters(i) for i in range(self.n)]


class CounterPoller:
    """Samples every namespace's link counters every ``interval`` s in a thread: (time.time(), [counters])."""

    def __init__(self, tb: Testbed, interval: float = 0.25) -> None:
        self.tb, self.interval = tb, interval
        self.samples: list[tuple[float, list[dict[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "CounterPoller":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        try:
            self.samples.append((time.time(), self.tb.all_counters()))
        except (NetnsError, OSError, ValueError, KeyError):
            pass  # torn down under us: the samples so far stand

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def at(self, t: float, i: int, key: str = "tx_bytes") -> int:
        """Namespace i's counter at the first sample taken at or after wall-clock time ``t`` (else the last)."""
        for ts, counters in self.samples:
            if ts >= t:
                return counters[i][key]
        return self.samples[-1][1][i][key]


# ---- photon_p2p daemons inside a testbed ---------------------------------------------------------------------
def start_photon_peer(tb: Testbed, i: int, run_dir: Path, run_id: str, overrides: list[str],
                      initial: list[str] | None = None, config: str = "tiny") -> subprocess.Popen:
    """`python -m photon_p2p.cli run` in namespace i, listening on its address; log in RUN_DIR/peer.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "peer.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "photon_p2p.cli", "run", "--config", config, "--run-dir", str(run_dir),
           "--run-id", run_id, "--host-maddrs", f"/ip4/{tb.addr(i)}/tcp/0", "--no-progress",
           "--set", f"name=silo-{i}"]
    for o in overrides:
        cmd += ["--set", o]
    if initial:
        cmd += ["--initial-peers", *initial]
    log = (run_dir / "peer.log").open("w")
    return tb.popen(i, cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_peer_address(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> list[str]:
    """The multiaddrs a started daemon wrote to RUN_DIR/peer.json; NetnsError if it died or took too long."""
    try:
        return wait_for_address(proc, run_dir, timeout)
    except PeerStartError as e:
        raise NetnsError(str(e)) from None


@atexit.register
def _teardown_all() -> None:
    for tb in list(_LIVE):
        tb.teardown()


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM would otherwise end the interpreter without atexit: turn it into SystemExit so teardown runs.
    raise SystemExit(128 + signum)


def install_signal_teardown() -> None:
    """Make SIGTERM/SIGHUP run the normal exit path (context managers, atexit) so nothing is left behind."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)


# ---- self-check ------------------------------------------------------------------------------------------
_SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n, flush=True)
"""
_SOURCE = r"""
import socket, sys, time
mb = float(sys.argv[2]); buf = b"x" * (1 << 20)
c = socket.create_connection((sys.argv[1], 5201)); t0 = time.perf_counter()
for _ in range(int(mb)): c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); print(time.perf_counter() - t0, flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--mb", type=float, default=5.0, help="MiB to send from namespace 1 to namespace 0")
    args = ap.parse_args()
    why = unsupported_reason()
    if why:
        print(f"skipped: {why}")
        return 0
    install_signal_teardown()
    with Testbed(args.peers, rate_mbit=args.rate_mbit) as tb:
        sink = tb.popen(0, [sys.executable, "-c", _SINK, tb.addr(0)], stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        before = tb.counters(1)
        src = tb.run(1, [sys.executable, "-c", _SOURCE, tb.addr(0), str(args.mb)], timeout=600)
        after = tb.counters(1)
        secs = float(src.stdout.strip() or "nan")
        sent = after["tx_bytes"] - before["tx_bytes"]
        print(json.dumps({"peers": args.peers, "rate_mbit": args.rate_mbit, "payload_bytes": int(args.mb * 2**20),
                          "wire_tx_bytes": sent, "seconds": round(secs, 3),
                          "goodput_mbit": round(args.mb * 2**20 * 8 / secs / 1e6, 2)}))
        names = [n.ns for n in tb.nodes]
    left = [n for n in _ip("netns", "list").stdout.split() if n in names]
    print("teardown ok" if not left else f"teardown left {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
