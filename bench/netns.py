"""Network-namespace testbeds: isolated "machines" on one host, joined by tbf-shaped veth links.

Usage (as a library):

    from netns import Testbed, skipped, unsupported_reason
    if skipped(unsupported_reason()):               # prints "skipped: WHY" where namespaces do not work
        return 0
    with Testbed(2, rate_mbit=100) as tb:           # 2 peers: one veth pair; >2: veths to a bridge
        p = tb.popen(0, ["python", "-c", "..."])     # runs inside namespace 0 (ip netns exec)
        tb.counters(0)                               # {"tx_bytes": ..., "rx_bytes": ..., ...} of its link
    # namespaces, links, bridge and every process started in them are gone here (also at interpreter exit)

Also here: ``Namespaces`` (what Testbed and nat_net.NatTestbed share: lifecycle, shaping, counters, processes),
``CounterPoller`` (samples every namespace's counters in a thread, for per-interval byte counts) and
``start_photon_peer`` / ``wait_peer_address`` (a `photon-peer run` daemon inside a namespace) and ``bench_main``
(a netns benchmark's main: --replot, "skipped: ...", data, one-line errors).

Usage (command line, a self-check): ``python bench/netns.py [--peers 2] [--rate-mbit 20]`` builds the testbed,
pushes a few MB through the shaped link, prints the measured throughput and tears everything down.

Each namespace i gets address 10.<a>.<b>.(i+1)/24 on its link (``Testbed.addr(i)``); its egress is shaped with
tbf at ``rate_mbit`` (both directions of a link are shaped, each by its sender). Names carry this process's pid
(``pp<pid>-<i>``), so concurrent benchmarks never collide. Requires root and iproute2 (``ip``, ``tc``);
``unsupported_reason()`` says why not, instead of failing later.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, Callable

import toolkit as kit
from toolkit import stop_all as stop_procs  # noqa: F401  (the benchmarks tear peers down with it)

_LIVE: "weakref.WeakSet[Namespaces]" = weakref.WeakSet()


class NetnsError(RuntimeError):
    """Setting up the testbed failed (message is one line)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _exec(ns: str, *argv: str) -> None:
    p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` in {ns} failed: {p.stderr.strip() or p.stdout.strip()}")


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


def skipped(why: str | None) -> bool:
    """Print "skipped: WHY" when the testbed cannot run here; else make SIGTERM/SIGHUP tear it down on the way out."""
    if why:
        print(f"skipped: {why}")
        return True
    install_signal_teardown()
    return False


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace ``ns`` (daemons' helpers such as p2pd included)."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Namespaces:
    """Machines (namespace ``ns[i]``, link ``ifnames[i]``, address ``addrs[i]``) plus ``others`` (bridges, routers)
    that ``_build`` joins; a context manager that always removes everything it made. Each machine's egress is
    shaped with tbf at ``rate_mbit``, and one idle process per machine gives its link counters through its
    /proc/<pid>/net/dev: no fork per sample, so counters can be polled often while benchmarks run."""

    def __init__(self, ns: list[str], ifnames: list[str], addrs: list[str], others: list[str],
                 rate_mbit: float | None, latency_ms: float) -> None:
        self.ns, self.ifnames, self.addrs, self.others = ns, ifnames, addrs, others
        self.rate_mbit, self.latency_ms = rate_mbit, latency_ms
        self.procs: list[subprocess.Popen] = []
        self._anchors: list[subprocess.Popen] = []
        self._up = False

    def __enter__(self) -> Namespaces:
        self.setup()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    @property
    def n(self) -> int:
        return len(self.ns)

    def _build(self) -> None:
        raise NotImplementedError

    def setup(self) -> None:
        _LIVE.add(self)
        self._up = True  # set first: a half-built testbed is torn down too
        try:
            for ns in [*self.others, *self.ns]:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            self._build()
            for i, ns in enumerate(self.ns):
                if self.rate_mbit:
                    self._shape(ns, self.ifnames[i])
                self._anchors.append(subprocess.Popen(self.argv(i, ["sleep", "infinity"]), start_new_session=True))
            # `ip netns exec` enters the namespace after fork: until then /proc/<anchor>/net/dev is the host's
            for anchor, ns in zip(self._anchors, self.ns):
                want, deadline = os.stat(f"/run/netns/{ns}").st_ino, time.monotonic() + 10
                while os.stat(f"/proc/{anchor.pid}/ns/net").st_ino != want:
                    if time.monotonic() > deadline:
                        raise NetnsError(f"the counter anchor of {ns} did not enter it")
                    time.sleep(0.01)
        except BaseException:
            self.teardown()
            raise

    def _shape(self, ns: str, ifname: str) -> None:
        # tbf needs a bucket of at least one timer tick of traffic; 5 ms of the rate (>= 32 KB) is safe.
        burst = max(32.0, self.rate_mbit * 1e6 / 8 * 0.005 / 1024)
        _exec(ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{self.rate_mbit:g}mbit",
              "burst", f"{burst:.0f}kb", "latency", f"{self.latency_ms:g}ms")

    def teardown(self) -> None:
        """Kill processes (ours, then anything left inside), delete namespaces (their veths go with them)."""
        if not self._up:
            return
        self._up = False
        stop_procs(self.procs)
        stop_procs(self._anchors, grace=0.0)
        for ns in [*self.ns, *self.others]:
            _kill_ns_pids(ns)
        for ns in [*self.ns, *self.others]:
            _ip("netns", "del", ns, check=False)
        _LIVE.discard(self)

    def addr(self, i: int) -> str:
        return self.addrs[i]

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i], *argv]

    def popen(self, i: int, argv: list[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside namespace i in its own session (so teardown can kill its whole group)."""
        proc = kit.popen_logged(self.argv(i, argv), log, **kwargs) if log else \
            subprocess.Popen(self.argv(i, argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, argv), capture_output=True, text=True, timeout=timeout)

    def counters(self, i: int) -> dict[str, int]:
        """Bytes and packets through machine i's link as the kernel counts them (all protocols, headers)."""
        try:
            with open(f"/proc/{self._anchors[i].pid}/net/dev") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name.strip() == self.ifnames[i]:
                        v = [int(x) for x in rest.split()]
                        return {"rx_bytes": v[0], "rx_packets": v[1], "tx_bytes": v[8], "tx_packets": v[9]}
        except (OSError, IndexError):
            pass  # the anchor is gone: ask ip instead
        stats = json.loads(_ip("-j", "-s", "-n", self.ns[i], "link", "show", "dev", self.ifnames[i]).stdout)[0]
        return {f"{d}_{k}": int(stats["stats64"][d][k]) for d in ("rx", "tx") for k in ("bytes", "packets")}

    def all_counters(self) -> list[dict[str, int]]:
        return [self.counters(i) for i in range(self.n)]


class Testbed(Namespaces):
    """N namespaces with shaped links: a veth pair for 2, veths to a bridge (in the host namespace) for more."""

    def __init__(self, n: int, rate_mbit: float | None = None, latency_ms: float = 50.0) -> None:
        if not 2 <= n <= 250:
            raise NetnsError("a testbed needs 2 to 250 namespaces (one /24)")
        pid = os.getpid()
        self.prefix = f"pp{pid}"
        # A subnet derived from the pid: two testbeds of different processes do not share addresses.
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50) % 256}"
        self.bridge = f"{self.prefix}br" if n > 2 else ""
        super().__init__([f"{self.prefix}-{i}" for i in range(n)], [f"{self.prefix}n{i}" for i in range(n)],
                         [f"{self.subnet}.{i + 1}" for i in range(n)], [], rate_mbit, latency_ms)

    def _build(self) -> None:
        if self.n == 2:
            _ip("link", "add", self.ifnames[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.ifnames[1],
                "netns", self.ns[1])
        else:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                _ip("link", "add", self.ifnames[i], "netns", self.ns[i], "type", "veth", "peer", "name",
                    f"{self.prefix}h{i}")
                _ip("link", "set", f"{self.prefix}h{i}", "master", self.bridge)
                _ip("link", "set", f"{self.prefix}h{i}", "up")
        for i in range(self.n):
            _ip("-n", self.ns[i], "addr", "add", f"{self.addrs[i]}/24", "dev", self.ifnames[i])
            _ip("-n", self.ns[i], "link", "set", self.ifnames[i], "up")

    def teardown(self) -> None:
        up = self._up
        super().teardown()
        if up and self.bridge:
            _ip("link", "del", self.bridge, check=False)


class CounterPoller:
    """Samples every namespace's link counters every ``interval`` s in a thread: (time.time(), [counters])."""

    def __init__(self, tb: Namespaces, interval: float = 0.25) -> None:
        self.tb, self.interval = tb, interval
        self.samples: list[tuple[float, list[dict[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CounterPoller:
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
        return next((c[i][key] for ts, c in self.samples if ts >= t), self.samples[-1][1][i][key])


# ---- photon_p2p daemons inside a testbed ---------------------------------------------------------------------
def start_photon_peer(tb: Namespaces, i: int, run_dir: Path, overrides: list[str], *, initial: list[str] = (),
                      name: str = "", config: str = "tiny", run_id: str = "", args: list[str] = ()
                      ) -> subprocess.Popen:
    """`photon-peer run` in namespace i on its address, in a fresh RUN_DIR (no earlier metrics or checkpoint), named
    ``name`` (default silo-I), joining through ``initial`` (none: it starts the run); log in RUN_DIR/peer.log."""
    cmd = kit.peer_cmd(kit.fresh_run_dir(run_dir), [f"name={name or f'silo-{i}'}", *overrides], config=config,
                       initial=initial, host=tb.addr(i), run_id=run_id, args=args)
    return tb.popen(i, cmd, log=run_dir / "peer.log")


def wait_peer_address(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> list[str]:
    """The multiaddrs a started daemon wrote to RUN_DIR/peer.json; NetnsError if it died or took too long."""
    try:
        return kit.wait_for_address(proc, run_dir, timeout)
    except kit.PeerStartError as e:
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


def bench_main(name: str, args: Any, write_reports: Callable[[Path, dict | None], int],
               measure: Callable[[Any], dict], invalid: str = "", why: Callable[[], str | None] = unsupported_reason
               ) -> int:
    """A netns benchmark's main: --replot rewrites OUT.md and OUT.png from OUT.json; else, unless the arguments are
    ``invalid`` (why) or the testbed cannot run here, prepare the data and measure in the repository root (relative
    paths are its) and write OUT.json, OUT.md and OUT.png. A testbed or config error ends it as one line."""
    from photon_p2p.config import ConfigError

    if args.replot:
        return write_reports(Path(args.out), None)
    if invalid:
        print(f"{name}: {invalid}", file=sys.stderr)
        return 2
    if skipped(why()):
        return 0
    os.chdir(kit.REPO)
    try:
        args.data = kit.ensure_data(args.data)
        result = measure(args)
    except (NetnsError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return write_reports(Path(args.out), result)


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
    ap = kit.parser(__doc__)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--mb", type=float, default=5.0, help="MiB to send from namespace 1 to namespace 0")
    args = ap.parse_args()
    if skipped(unsupported_reason()):
        return 0
    with Testbed(args.peers, rate_mbit=args.rate_mbit) as tb:
        sink = tb.popen(0, [sys.executable, "-c", _SINK, tb.addr(0)], stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        before = tb.counters(1)
        src = tb.run(1, [sys.executable, "-c", _SOURCE, tb.addr(0), str(args.mb)], timeout=600)
        sent = tb.counters(1)["tx_bytes"] - before["tx_bytes"]
        secs = float(src.stdout.strip() or "nan")
        print(json.dumps({"peers": args.peers, "rate_mbit": args.rate_mbit, "payload_bytes": int(args.mb * 2**20),
                          "wire_tx_bytes": sent, "seconds": round(secs, 3),
                          "goodput_mbit": round(args.mb * 2**20 * 8 / secs / 1e6, 2)}))
    left = [n for n in _ip("netns", "list").stdout.split() if n in tb.ns]
    print("teardown ok" if not left else f"teardown left {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
