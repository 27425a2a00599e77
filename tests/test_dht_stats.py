"""The requests a peer's DHT node serves are counted in its DHT process (hivemind_ext/dht_stats.py)."""

from __future__ import annotations

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.utils import get_dht_time

from photon_p2p.federation.hivemind_ext import dht_stats


def test_install_is_idempotent_and_keeps_what_hivemind_registers_handlers_by():
    dht_stats.install()
    wrapped = DHTProtocol.rpc_find
    dht_stats.install()
    assert DHTProtocol.rpc_find is wrapped and wrapped._photon_counted  # not wrapped twice

    class Probe(DHTProtocol):  # a fresh class: hivemind collects each servicer class's handlers once
        pass

    Probe._rpc_handlers = None
    Probe._collect_rpc_handlers()
    handlers = {h.method_name: (h.request_type.__name__, h.response_type.__name__) for h in Probe._rpc_handlers}
    assert handlers == {"rpc_ping": ("PingRequest", "PingResponse"), "rpc_store": ("StoreRequest", "StoreResponse"),
                        "rpc_find": ("FindRequest", "FindResponse")}


@pytest.mark.timeout(60)
def test_a_dht_node_counts_the_requests_it_serves_per_kind():
    from photon_p2p.config import NetworkConfig
    from photon_p2p.federation.network import start_dht, stop_dht

    net = NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    a = start_dht(net)  # installs the counters before the DHT process forks
    b = None
    try:
        b = start_dht(net, initial_peers=[str(m) for m in a.get_visible_maddrs()])
        assert b.store("k", b"v", get_dht_time() + 60)
        assert b.get("k", latest=True).value == b"v"
        counts = a.run_coroutine(dht_stats.served)
        assert set(counts) == {"ping", "store", "find"}
        assert counts["ping"]["requests"] > 0 and counts["find"]["requests"] > 0  # b's bootstrap, b's get
        assert counts["store"]["requests"] > 0  # b's store: a is among the key's nearest nodes (two in all)
        for kind in counts.values():
            assert kind["bytes"] > 10 * kind["requests"] > 0  # each carries at least a node id
        requests, size = dht_stats.total(counts)
        assert requests == sum(c["requests"] for c in counts.values()) and size > 0
        assert dht_stats.total(a.run_coroutine(dht_stats.served, return_future=True).result(timeout=5))[0] >= requests
        assert dht_stats.SERVED["find"]["requests"] == 0  # counted in the DHT processes, not here
    finally:
        for dht in (b, a):
            if dht is not None:
                stop_dht(dht)


def test_round_records_carry_what_the_dht_node_served_since_the_last_record_that_did():
    from types import SimpleNamespace

    from photon_p2p.ledger import RoundLedger
    from photon_p2p.peer_report import roster_fields

    def counts(find, store):  # what dht_stats.served returns: {kind: {"requests", "bytes"}} since the node started
        return {"ping": {"requests": 0, "bytes": 0}, "find": {"requests": find[0], "bytes": find[1]},
                "store": {"requests": store[0], "bytes": store[1]}}

    answers = [counts((4, 800), (1, 100)), None, counts((10, 1800), (2, 200))]  # the second read missed its deadline
    d = SimpleNamespace(swarm=SimpleNamespace(dht_reads=0, dht_served=lambda: answers.pop(0)), ledger=RoundLedger())
    assert roster_fields(d) == {"dht_reads": 0, "dht_served": 5, "dht_served_bytes": 900,
                                "dht_served_kinds": {"ping": [0, 0], "find": [4, 800], "store": [1, 100]}}
    assert roster_fields(d) == {"dht_reads": 0}  # omitted, never waited for
    assert roster_fields(d) == {"dht_reads": 0, "dht_served": 7, "dht_served_bytes": 1100,
                                "dht_served_kinds": {"ping": [0, 0], "find": [6, 1000], "store": [1, 100]}}
    d.swarm = SimpleNamespace(dht_reads=2)  # a fake swarm without a DHT node
    assert roster_fields(d) == {"dht_reads": 2}
