"""NAT testbed in network namespaces: a public segment (bridge) and volunteers behind MASQUERADE routers.

Usage (as a library, next to bench/netns.py):

    from nat_net import NatTestbed, nat_unsupported_reason
    if (why := nat_unsupported_reason()):
        raise SystemExit(f"skipped: {why}")
    with NatTestbed(public=3, nats=2, rate_mbit=50) as tb:
        tb.popen(tb.public(0), [...])     # a reachable machine on the public segment (10.77.0.1, .2, ...)
        tb.popen(tb.volunteer(0), [...])  # a machine behind its own NAT router (192.168.1.2, 192.168.2.2, ...)
        tb.counters(i)                    # its link's kernel byte counters
    # namespaces, links, processes are gone here (also at interpreter exit or SIGTERM)

Layout: one namespace holds the bridge (the "internet"); every public machine is a namespace with a veth to it.
Each NAT k is a router namespace (WAN 10.77.0.(101+k) on the bridge, LAN 192.168.(k+1).1) and a volunteer
namespace (192.168.(k+1).2, default route via its router). The router MASQUERADEs LAN traffic out of its WAN and
forwards from WAN to LAN only packets of connections the LAN opened (conntrack ESTABLISHED,RELATED): no port
forwarding, so nobody can dial a volunteer, as at home. Public machines have no route to any 192.168 net.
Every machine's egress, and each router's LAN egress (the volunteer's downlink), is shaped with tbf.
Names start with ``pnat<pid>`` so concurrent testbeds never collide (the subnets live inside the namespaces).
Command line self-check: ``python bench/nat_net.py`` builds 2 public + 2 NATed machines, checks that a
volunteer can dial out and that nobody can dial in, prints the result and tears everything down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import toolkit as kit
from netns import (Namespaces, NetnsError, _exec, _ip, skipped, start_photon_peer, stop_procs,
                   unsupported_reason, wait_peer_address)

PUBLIC_NET = "10.77.0"


def nat_unsupported_reason() -> str | None:
    """None when namespaces, veth, tbf and iptables NAT work here; otherwise a one-line reason."""
    why = unsupported_reason()
    if why:
        return why
    if shutil.which("iptables") is None:
        return "'iptables' is not installed (apt-get install -y iptables)"
    name = f"pnat{os.getpid()}-probe"
    try:
        p = _ip("netns", "add", name, check=False)
        if p.returncode != 0:
            return f"cannot create a network namespace ({p.stderr.strip()})"
        q = subprocess.run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo",
                            "-j", "MASQUERADE"], capture_output=True, text=True)
        if q.returncode != 0:
            return f"iptables NAT does not work here ({(q.stderr.strip().splitlines() or ['?'])[-1]})"
    finally:
        _ip("netns", "del", name, check=False)
    return None


class NatTestbed(Namespaces):
    """``public`` reachable machines on a bridge and ``nats`` volunteers, each behind its own NAT router."""

    def __init__(self, public: int, nats: int, rate_mbit: float | None = None, latency_ms: float = 50.0) -> None:
        if public < 1 or nats < 0 or public > 90 or nats > 90:
            raise NetnsError("a NAT testbed needs 1..90 public machines and 0..90 NATs")
        self.n_public, self.n_nats = public, nats
        self.prefix = f"pnat{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.routers = [f"{self.prefix}-r{k}" for k in range(nats)]  # routers only forward
        self.wan_addrs = [f"{PUBLIC_NET}.{101 + k}" for k in range(nats)]
        # Machines (things that run peers): public ones first, then volunteers.
        super().__init__([f"{self.prefix}-p{i}" for i in range(public)] + [f"{self.prefix}-v{k}" for k in range(nats)],
                         ["eth0"] * (public + nats),
                         [f"{PUBLIC_NET}.{i + 1}" for i in range(public)] + [f"192.168.{k + 1}.2" for k in range(nats)],
                         [self.hub, *self.routers], rate_mbit, latency_ms)

    def _plug(self, ns: str, ifname: str, hub_end: str, addr: str) -> None:
        """A veth from namespace ``ns`` (``ifname``, ``addr``/24) to the bridge in the hub namespace."""
        _ip("-n", self.hub, "link", "add", hub_end, "type", "veth", "peer", "name", ifname, "netns", ns)
        _ip("-n", self.hub, "link", "set", hub_end, "master", "br0")
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
        _ip("-n", ns, "link", "set", ifname, "up")

    def _build(self) -> None:
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.n_public):
            self._plug(self.ns[i], "eth0", f"hp{i}", self.addrs[i])
        for k, (router, vol) in enumerate(zip(self.routers, self.ns[self.n_public:])):
            self._plug(router, "wan", f"hr{k}", self.wan_addrs[k])
            _ip("-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", vol)
            _ip("-n", router, "addr", "add", f"192.168.{k + 1}.1/24", "dev", "lan")
            _ip("-n", router, "link", "set", "lan", "up")
            _ip("-n", vol, "addr", "add", f"192.168.{k + 1}.2/24", "dev", "eth0")
            _ip("-n", vol, "link", "set", "eth0", "up")
            _ip("-n", vol, "route", "add", "default", "via", f"192.168.{k + 1}.1")
            _exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _exec(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            _exec(router, "iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack",
                  "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            _exec(router, "iptables", "-A", "FORWARD", "-i", "wan", "-j", "DROP")
            if self.rate_mbit:
                self._shape(router, "lan")  # the volunteer's downlink

    def public(self, i: int) -> int:
        return i

    def volunteer(self, k: int) -> int:
        return self.n_public + k

    def masqueraded_packets(self, k: int) -> int:
        """Packets NAT k's router has MASQUERADEd (proof that a volunteer's traffic went through its NAT)."""
        out = subprocess.run(["ip", "netns", "exec", self.routers[k], "iptables", "-t", "nat", "-L", "POSTROUTING",
                              "-v", "-x", "-n"], capture_output=True, text=True).stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "MASQUERADE" in line)


# ---- photon_p2p swarms in a NAT testbed -----------------------------------------------------------------------
def start_bootstrap(tb: NatTestbed, i: int, run_dir: Path, initial: list[str],
                    timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`photon-peer bootstrap` on public machine i; (process, its multiaddr on the public segment)."""
    log = run_dir / "bootstrap.log"
    proc = tb.popen(i, [sys.executable, "-m", "photon_p2p.cli", "bootstrap", "--host-maddrs",
                        f"/ip4/{tb.addr(i)}/tcp/0", *(["--initial-peers", *initial] if initial else [])], log=log)
    line = kit.wait_line(log, proc, lambda ln: ln.startswith(f"/ip4/{tb.addr(i)}/"), timeout)
    if line is None:
        raise NetnsError(f"the bootstrap node did not start (see {log})")
    return proc, line.strip()


def run_swarm(tb: NatTestbed, out: Path, *, silos: list[int], volunteers: list[int], bootstrap: int,
              common: list[str], first: list[str], joiner: list[str], volunteer: list[str],
              timeout: float = 300.0, status_from: int | None = None, run_id: str = "") -> dict[str, Any]:
    """The first silo (it starts the model), the bootstrap node (connected to it), then every other silo and
    volunteer at once, each given only the bootstrap node's multiaddr; waits until every peer has exited
    (federation.rounds) or ``timeout``. Returns each peer's metrics records, start time and exit code, and with
    ``status_from`` `photon-peer status --json` of run ``run_id`` asked from that machine through the bootstrap
    node once the peers are done (their last heartbeats) under "_status".
    ``first``/``joiner``/``volunteer``: overrides on top of ``common``."""
    peers: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen] = []
    status: dict[str, Any] = {}
    baddr, t0 = "", time.time()
    # info: a round that failed in CI can only be explained from what each peer believed (roster, leader);
    # PHOTON_NAT_LOG_LEVEL=debug for a flake hunt (matchmaking's requests and answers)
    level = ["--log-level", os.environ.get("PHOTON_NAT_LOG_LEVEL", "info")]
    try:
        order = [(f"silo-{j}", i, "tiny", common + first if j == 0 else common + joiner)
                 for j, i in enumerate(silos)]
        order += [(f"volunteer-{j}", i, str(kit.REPO / "peers" / "volunteer.yaml"), common + volunteer)
                  for j, i in enumerate(volunteers)]
        for n, (name, i, config, overrides) in enumerate(order):
            proc = start_photon_peer(tb, i, out / name, overrides, initial=[baddr] if n else [], name=name,
                                     config=config, args=level)
            procs.append(proc)
            peers[name] = {"machine": i, "addr": tb.addr(i), "proc": proc, "dir": out / name, "started": time.time()}
            if n == 0:
                # A first silo that joined through the bootstrap node would serve state only after its first
                # round; started as the run's origin it serves it at once, and the bootstrap node knows it.
                first_addr = wait_peer_address(proc, out / name, 120)
                bproc, baddr = start_bootstrap(tb, bootstrap, out / "bootstrap", first_addr[:1])
                procs.append(bproc)
        kit.wait_all([p["proc"] for p in peers.values()], timeout)
        if status_from is not None:
            st = tb.run(status_from, [sys.executable, "-m", "photon_p2p.cli", "status", "--initial-peers", baddr,
                                      "--run-id", run_id, "--json", "--timeout", "20"], timeout=90)
            status = {"rc": st.returncode, "stdout": st.stdout, "stderr": st.stderr[-2000:]}
    finally:
        stop_procs(procs)
    result: dict[str, Any] = {}
    for name, p in peers.items():
        log = (p["dir"] / "peer.log").read_text(errors="replace")
        result[name] = {"machine": p["machine"], "addr": p["addr"], "rc": p["proc"].returncode,
                        "started": p["started"], "records": kit.records(p["dir"]), "log": log, "log_tail": log[-3000:]}
    result["_t0"], result["_status"] = t0, status
    return result


_LISTEN = "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',5301));s.listen(1);print('up',flush=True);s.accept()"


def self_check() -> dict[str, bool]:
    """Dial out from behind NAT works; dialing a volunteer (from public or the other NAT) does not."""
    py = sys.executable
    dial = "import socket,sys;socket.create_connection((sys.argv[1],5301),timeout=3);print('ok')"
    with NatTestbed(public=2, nats=2, rate_mbit=50) as tb:
        out: dict[str, bool] = {}
        for name, server, client in (("volunteer_dials_public", tb.public(0), tb.volunteer(0)),
                                     ("public_dials_volunteer", tb.volunteer(0), tb.public(1)),
                                     ("volunteer_dials_other_volunteer", tb.volunteer(1), tb.volunteer(0))):
            srv = tb.popen(server, [py, "-c", _LISTEN], stdout=subprocess.PIPE, text=True)
            srv.stdout.readline()
            target = tb.addr(server) if server < tb.n_public else tb.wan_addrs[server - tb.n_public]
            # dialing the router's public address is all a stranger can do: nothing is forwarded
            r = tb.run(client, [py, "-c", dial, target], timeout=20)
            out[name] = r.returncode == 0 and "ok" in r.stdout
            srv.kill()
            srv.wait()
        return out


def main() -> int:
    kit.parser(__doc__).parse_args()
    if skipped(nat_unsupported_reason()):
        return 0
    result = self_check()
    print(result)
    ok = result == {"volunteer_dials_public": True, "public_dials_volunteer": False,
                    "volunteer_dials_other_volunteer": False}
    print("NAT testbed ok" if ok else "NAT testbed NOT as expected")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
