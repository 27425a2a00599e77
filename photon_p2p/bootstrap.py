"""`photon-peer bootstrap`: a DHT-only node that trains nothing, the stable entry point of a deployment."""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional, Sequence, TextIO

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


def run_bootstrap(net: NetworkConfig, stop: threading.Event, out: Optional[TextIO] = None,
                  runs: Sequence[str] = (), owner_public: Optional[bytes] = None) -> int:
    """Serve the DHT until ``stop`` is set (SIGINT/SIGTERM in the CLI), then shut down cleanly; returns 0.
    ``runs``: run ids whose heartbeats this node checks against their schema; ``owner_public``: a closed swarm's
    owner key (raw Ed25519 bytes): tokens, revocations and those runs' heartbeats must carry the owner's word."""
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.admission import validators_for
    from photon_p2p.federation.network import parse_multiaddrs, start_dht, stop_dht
    from photon_p2p.federation.records import install_validators, schema_validators

    out = out or sys.stdout
    if net.client_mode:
        raise FederationError("a bootstrap node cannot run in client mode: it must accept connections")
    initial = parse_multiaddrs(net.initial_peers, "--initial-peers")
    dht = start_dht(net, initial_peers=initial, client_mode=False)
    try:
        # It stores records like any DHT node: make it refuse forged, unsigned owner records of every run, and
        # (issue 24, item 12) what the peers of the runs it is told about would refuse: a malformed heartbeat or
        # run-id hint, and in a closed swarm a token, revocation or heartbeat without the owner's signature.
        extra = schema_validators(runs) if runs else []
        if owner_public is not None:
            for run in runs or [None]:
                extra += validators_for(owner_public, run)
        install_validators(dht, run_id=None, extra_validators=extra)
        print(banner(dht.peer_id.to_base58(), _addresses(dht)), file=out, flush=True)
        checks = f"heartbeats of run(s) {', '.join(runs)} checked against their schema" if runs else \
            "record signatures only (--run-id RUN: also each run's heartbeat schema)"
        if owner_public is not None:
            from photon_p2p.credentials import fingerprint, public_from_bytes

            checks += f"; closed swarm, owner key {fingerprint(public_from_bytes(owner_public))}"
        print(f"bootstrap node validates: {checks}", file=out, flush=True)
        while not stop.wait(_POLL_S):
            if not dht.is_alive():
                raise FederationError("the DHT process of this bootstrap node died unexpectedly")
        print("bootstrap node: stopping", file=out, flush=True)
        return 0
    finally:
        stop_dht(dht)

