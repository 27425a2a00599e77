"""`photon-peer bootstrap`: a DHT-only node that trains nothing, the stable entry point of a deployment."""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional, TextIO

from photon_p2p import __version__
from photon_p2p.config import NetworkConfig

_POLL_S = 1.0  # how often the wait loop checks that the DHT process is still alive


def banner(peer_id: str, maddrs: list[str]) -> str:
    """The addresses to paste into --initial-peers, one per line so that scripts can pick them up."""
    rule = "=" * 78
    lines = [rule, f"photon-peer {__version__} bootstrap node {peer_id} is up (it trains nothing)",
             "Peers join with:  photon-peer run --initial-peers MADDR   (any of these MADDRs)",
             "Check a swarm:    photon-peer status --initial-peers MADDR", ""]
    lines += maddrs or ["(no visible addresses: check --host-maddrs / --announce-maddrs)"]
    return "\n".join(lines + [rule])


def _addresses(dht: Any) -> list[str]:
    """Full multiaddrs, routable ones first.

    Uses the addresses p2pd reported at startup (latest=False): asking p2pd again (latest=True) goes through a
    hivemind task that is occasionally garbage-collected mid-await, which hangs the caller forever.
    """
    addrs = [str(a) for a in dht.get_visible_maddrs(latest=False)]
    return sorted(addrs, key=lambda a: (a.startswith(("/ip4/127.", "/ip6/::1/")), a))


def run_bootstrap(net: NetworkConfig, stop: threading.Event, out: Optional[TextIO] = None) -> int:
    """Serve the DHT until ``stop`` is set (SIGINT/SIGTERM in the CLI), then shut down cleanly; returns 0."""
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.network import parse_multiaddrs, start_dht, stop_dht
    from photon_p2p.federation.records import install_validators

    out = out or sys.stdout
    if net.client_mode:
        raise FederationError("a bootstrap node cannot run in client mode: it must accept connections")
    initial = parse_multiaddrs(net.initial_peers, "--initial-peers")
    dht = start_dht(net, initial_peers=initial, client_mode=False)
    try:
        # It stores records like any DHT node: make it refuse forged, unsigned owner records of every run.
        install_validators(dht, run_id=None)
        print(banner(dht.peer_id.to_base58(), _addresses(dht)), file=out, flush=True)
        while not stop.wait(_POLL_S):
            if not dht.is_alive():
                raise FederationError("the DHT process of this bootstrap node died unexpectedly")
        print("bootstrap node: stopping", file=out, flush=True)
        return 0
    finally:
        stop_dht(dht)

