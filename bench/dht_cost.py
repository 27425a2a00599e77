#!/usr/bin/env python
"""What one store or read of a dictionary key (the swarm clock's shape) costs the DHT: requests and bytes served
by all nodes together, with and without hivemind's local caching.

Usage:
  flock /tmp/photon-bench.lock python bench/dht_cost.py --nodes 16 32 --out bench/results/scale/dht_cost.json

N hivemind DHT nodes on 127.0.0.1 (each its own process and p2pd, as in a swarm); every node stores one 800-byte
subkey under one key (as every peer stores its clock record), every node reads the key once (as every peer
does), then a store of one subkey and reads are repeated and the nodes' served counters (hivemind_ext/dht_stats)
are summed. ``cache_locally`` on is hivemind's default; off is what network.start_dht now sets.
"""

from __future__ import annotations

import json
import sys
import time

import toolkit as kit

RECORD_BYTES = 800
REPEATS = 5


def measure(n: int, cache: bool) -> dict:
    import hivemind
    from hivemind.utils import get_dht_time

    from photon_p2p.federation.hivemind_ext import dht_stats

    dht_stats.install()
    kwargs = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], cache_locally=cache, cache_on_store=cache)
    dhts = [hivemind.DHT(start=True, **kwargs)]
    try:
        first = [str(a) for a in dhts[0].get_visible_maddrs()]
        dhts += [hivemind.DHT(start=True, initial_peers=first, **kwargs) for _ in range(n - 1)]
        time.sleep(3.0)
        for i, d in enumerate(dhts):
            d.store("clock", b"x" * RECORD_BYTES, get_dht_time() + 120, subkey=f"peer{i}")
        time.sleep(2.0)
        for d in dhts:
            d.get("clock", latest=True)

        def served() -> tuple[int, int]:
            totals = [dht_stats.total(d.run_coroutine(dht_stats.served)) for d in dhts]
            return sum(r for r, _ in totals), sum(b for _, b in totals)

        out = {"nodes": n, "cache_locally": cache, "value_kb": n * RECORD_BYTES / 1e3}
        ops = {"store one subkey": lambda: dhts[3].store("clock", b"y" * RECORD_BYTES, get_dht_time() + 120,
                                                         subkey="peer3"),
               "read, latest=True": lambda: dhts[3].get("clock", latest=True)}
        for name, op in ops.items():
            r0, b0 = served()
            for _ in range(REPEATS):
                op()
            r1, b1 = served()
            out[name] = {"requests": round((r1 - r0) / REPEATS, 1), "kb": round((b1 - b0) / REPEATS / 1e3, 1)}
        return out
    finally:
        for d in dhts:
            d.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = kit.parser(__doc__)
    ap.add_argument("--nodes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--out", help="write the rows here (JSON)")
    a = ap.parse_args(argv)
    if min(a.nodes) < 4:
        ap.error("--nodes: at least 4 (node 3 stores and reads)")
    rows = [measure(n, cache) for n in a.nodes for cache in (True, False)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if a.out:
        kit.write_json(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
