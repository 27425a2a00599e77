"""Joining the swarm: multiaddr validation, starting the hivemind DHT with deadlines, and a lifeline for its helpers.

hivemind runs the DHT in a forked child process that starts a ``p2pd`` daemon; both outlive a SIGKILLed parent and
keep answering in the swarm. The lifeline makes them die with us: forked children get PR_SET_PDEATHSIG(SIGKILL),
and a tiny reaper process (which needs no lifeline itself: it exits as soon as our process is gone) SIGKILLs the
DHT's p2pd, which is spawned by exec and therefore out of reach of fork hooks. The helpers run in their own
process group, so a signal meant for the whole job (Ctrl-C) lets the daemon stop them in order.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hivemind
import multiaddr

from photon_p2p.config import NetworkConfig
from photon_p2p.federation import FederationError
from photon_p2p.federation.hivemind_ext import dht as quiet_dht, dht_stats

log = logging.getLogger("photon_p2p.federation")
_PR_SET_PDEATHSIG = 1
# The lifeline's only global state: fork hooks can only be registered once per process.
_hooks_installed = False
_armed = threading.local()
_forking_pid = 0


def use_identity(path: str) -> str:
    """The identity file to start p2pd with: created here, 0600 and exclusively, when missing (hivemind writes it
    under the umask, often world-readable), else checked: ours and private (credentials.check_private)."""
    from photon_p2p.credentials import CredentialError, check_private, create_identity

    p = Path(path).expanduser()
    try:
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            peer = create_identity(p)
            log.info("created a new identity in %s (peer %s)", p, peer)
        check_private(p, "identity file")
    except CredentialError as e:
        raise FederationError(str(e)) from None
    except OSError as e:
        raise FederationError(f"identity file {p} cannot be created: {e.strerror or e}") from None
    return str(p)


def parse_multiaddrs(addrs: list[str], what: str, *, require_peer_id: bool | None = None) -> list[str]:
    """Validate multiaddrs (as text); by default those for initial peers (``what`` names them) need /p2p/<id>."""
    if require_peer_id is None:
        require_peer_id = "initial" in what.lower()
    if isinstance(addrs, str):
        addrs = [addrs]  # a lone address instead of a list is an easy slip; judge it, don't iterate its letters
    out = []
    for s in addrs:
        if not isinstance(s, str) or not s.strip():
            raise FederationError(f"invalid multiaddr for {what}: '{s}' (empty address)")
        s = s.strip()
        try:
            maddr = multiaddr.Multiaddr(s)
        except Exception as e:  # StringParseError is a ValueError; any other failure is just as fatal
            raise FederationError(f"invalid multiaddr for {what}: '{s}' ({_parse_reason(e)})") from None
        names = [p.name for p in maddr.protocols()]
        if require_peer_id and "p2p" not in names:
            raise FederationError(f"invalid multiaddr for {what}: '{s}' (missing /p2p/<peer id>: copy the full "
                                  "address a running peer prints)")
        out.append(str(maddr))
    return out


def _parse_reason(e: Exception) -> str:
    text = str(e).split("\n")[0]
    if "': " in text:  # "Invalid MultiAddr 'x': unknown protocol: x (string: x)" -> "unknown protocol: x"
        text = text.split("': ", 1)[1]
    return text.split(" (string:")[0] or type(e).__name__


def start_dht(net: NetworkConfig, *, initial_peers: list[str] | None = None,
              client_mode: bool | None = None) -> hivemind.DHT:
    """Start this peer's DHT node; retry unreachable initial peers until ``net.bootstrap_timeout``, then fail."""
    peers = parse_multiaddrs(net.initial_peers if initial_peers is None else initial_peers, "initial peers",
                             require_peer_id=True)
    host = parse_multiaddrs(net.host_maddrs, "network.host_maddrs")
    announce = parse_multiaddrs(net.announce_maddrs, "network.announce_maddrs")
    for a in announce:
        if "/tcp/0" in a + "/" or "/udp/0/" in a + "/":
            raise FederationError(f"invalid multiaddr for network.announce_maddrs: '{a}' (needs an explicit port)")
    kwargs = dict(host_maddrs=host, client_mode=net.client_mode if client_mode is None else client_mode,
                  use_relay=net.use_relay, use_auto_relay=net.use_auto_relay)
    if announce:
        kwargs["announce_maddrs"] = announce
    # Our keys are re-stored by their owners every few seconds and read by every peer: hivemind's Kademlia caching
    # (a found value copied to the nearest node lacking it; cached values refreshed before they expire) only
    # adds stores, each of which the receiver validates record by record (with bench/scale.py's 8 peers,
    # together with the validation cache in hivemind_ext/validation.py: 34 % less CPU per idle peer).
    # Nor a local copy of what this node read or stored: every node holding a key answers every search for it
    # with the whole value, and our clock and heartbeat keys are dictionaries of every peer's record. With the
    # copies, one keepalive store at 32 peers moved 669 kB (26 times the value) through the 20 nodes its search
    # visits and one read 554 kB; without, 135 kB and 132 kB (only the replicas hold it; bench/dht_cost.py). We
    # read with latest=True everywhere, which searches the replicas anyway: the local copy never answered one.
    kwargs.update(cache_nearest=0, cache_refresh_before_expiry=0, cache_locally=False, cache_on_store=False)
    if net.identity_path:
        kwargs["identity_path"] = use_identity(net.identity_path)
    timeout = float(net.bootstrap_timeout)
    deadline = time.monotonic() + timeout
    quiet_dht.install()  # before the fork: no traceback for a result we stopped waiting for
    dht_stats.install()  # before the fork: the DHT process counts the requests its node serves (round records)
    unreachable = FederationError(f"could not reach any initial peer ({', '.join(peers)}) within {timeout:g}s")
    while True:
        remaining = deadline - time.monotonic()
        with lifeline():
            dht = hivemind.DHT(initial_peers=peers or None, start=True, await_ready=False,
                               startup_timeout=max(remaining, 1.0), **kwargs)
        try:
            dht.wait_until_ready(timeout=max(remaining, 0.1))
        except TimeoutError:
            _kill_process_tree(dht)
            if peers:
                raise unreachable from None
            raise FederationError(f"the DHT node did not start within {timeout:g}s") from None
        except BaseException as e:
            _kill_process_tree(dht)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            detail = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            if peers and ("bootstrap" in detail.lower() or time.monotonic() > deadline - 0.5):
                # p2pd refuses to start when no bootstrap peer answers; it may just not be up yet: retry.
                if deadline - time.monotonic() > 1.0:
                    time.sleep(1.0)
                    continue
                raise unreachable from None
            raise FederationError(f"could not start the DHT node: {detail}") from None
        _spawn_reaper(dht.pid)
        return dht


def stop_dht(dht: hivemind.DHT, grace: float = 5.0) -> None:
    """Shut the DHT down; SIGKILL it if it outlives the grace period, so that exit never hangs on joining it.

    A DHT process forked after the CLI installed its SIGTERM handler inherits that handler and survives
    hivemind's own terminate(); when the signal also killed p2pd (a group-wide stop), its shutdown stalls.
    """
    dht.shutdown()
    if dht.is_alive():
        dht.kill()
        dht.join(grace)
    close_idle_loop()


def close_idle_loop() -> None:
    """Close the event loop hivemind's MPFuture made this thread's current one (``asyncio.get_event_loop``).

    Nobody closes it otherwise, and at interpreter exit its self-pipe socket may be collected before it: Python
    then prints an "Exception ignored ... Invalid file descriptor: -1" traceback under our one-line error.
    MPFuture skips a closed loop, so a future resolved later (a straggling callback) is still safe.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:  # in the main thread this makes a loop if there is none: closing that one is harmless
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # another thread without a loop: nothing to close
            return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
        asyncio.set_event_loop(None)


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Full multiaddrs (with /p2p/<id>) that other peers can pass as initial peers; routable ones first."""
    # latest=True asks p2pd again and can hang in hivemind 1.1.12; the startup addresses are what we listen on.
    addrs = [str(a) for a in dht.get_visible_maddrs(latest=False)]
    addrs = [a for a in addrs if not a.startswith(("/ip4/0.0.0.0/", "/ip6/::/"))] or addrs
    return sorted(addrs, key=lambda a: (a.startswith(("/ip4/127.", "/ip6/::1/")), a))


async def _connection_addrs(_dht: hivemind.DHT, node, timeout: float = 2.0) -> list[str]:
    """(Runs inside the DHT process.) The remote multiaddrs of this peer's open libp2p connections.

    Bounded here, in the DHT process: a p2pd that does not answer would otherwise leave the task pending until
    the DHT exits, which hivemind then logs as an error with a traceback (GeneratorExit)."""
    try:
        peers = await asyncio.wait_for(node.p2p.list_peers(), timeout)
    except Exception:  # asyncio.TimeoutError included
        return []
    return [str(a) for info in peers for a in info.addrs]


def connection_kind(dht: hivemind.DHT, client_mode: bool, timeout: float) -> str:
    """How this peer is connected, from its open libp2p connections: "relayed" when any of them runs through a
    circuit relay (/p2p-circuit), else "client" (client mode: outbound connections only), else "direct".
    Returns "client"/"direct" from the configuration alone when p2pd does not answer within ``timeout``."""
    fallback = "client" if client_mode else "direct"
    future = dht.run_coroutine(functools.partial(_connection_addrs, timeout=timeout), return_future=True)
    try:
        addrs = future.result(timeout=timeout)
    except Exception:  # no answer in time (or the DHT is gone): say what the configuration implies
        future.cancel()  # a task left pending in the DHT process is torn down noisily (GeneratorExit) at exit
        return fallback
    return "relayed" if any("/p2p-circuit" in a for a in addrs) else fallback


# ---- lifeline ---------------------------------------------------------------------------------------------

@contextmanager
def lifeline() -> Iterator[None]:
    """Processes forked by this thread inside the block die with their parent (Linux PR_SET_PDEATHSIG, SIGKILL).

    The kernel fires it when the forking *thread* exits, so start the DHT and the averager from a thread that
    lives as long as the peer (the main thread). Other forks (e.g. DataLoader workers) are left alone.
    """
    global _hooks_installed
    if not _hooks_installed and sys.platform.startswith("linux"):
        os.register_at_fork(before=_before_fork, after_in_child=_arm_child)
        _hooks_installed = True
    _armed.depth = getattr(_armed, "depth", 0) + 1
    try:
        yield
    finally:
        _armed.depth -= 1


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _arm_child() -> None:
    # The child is a copy of the forking thread, so it sees that thread's flag.
    if not getattr(_armed, "depth", 0):
        return
    _armed.depth = 0  # the child's own forks are not armed unless it asks
    # Helpers must not inherit the daemon's graceful-stop handler (a SIGTERM sent to them should end them), and
    # they leave the daemon's process group: Ctrl-C in a terminal or `kill -TERM -PGID` reaches the daemon
    # alone, which then leaves the swarm in order (last heartbeat, clock, averager, DHT) instead of finding its
    # DHT and p2pd already dead. p2pd, exec'd by the DHT process, joins the new group with it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _forking_pid:  # the parent died between fork() and prctl(): nobody will signal us
        os._exit(1)


_REAPER = r"""
import os, signal, sys, time
parent, targets = int(sys.argv[1]), [tuple(map(int, t.split(":"))) for t in sys.argv[2:]]
def start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1
while os.getppid() == parent:
    if all(start(p) != t for p, t in targets):
        sys.exit(0)
    time.sleep(0.2)
for p, t in targets:
    if start(p) == t:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
"""


def _spawn_reaper(dht_pid: int) -> None:
    """Watch our process from outside: when it is gone, SIGKILL the DHT process and its p2pd."""
    if not sys.platform.startswith("linux"):
        return
    targets = [f"{p}:{_start_time(p)}" for p in [dht_pid, *_descendants(dht_pid)] if _start_time(p) >= 0]
    # Popen does not run fork hooks, so the reaper gets no death signal: it must outlive us to do its job.
    subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid()), *targets],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_process_tree(proc: hivemind.DHT) -> None:
    """SIGKILL a failed DHT process and everything it spawned (p2pd), and reap it."""
    if proc.pid is None:
        return
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # frozen, it cannot spawn p2pd between our listing and our kill
    except OSError:
        pass
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.join(5)
