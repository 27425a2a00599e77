#!/usr/bin/env python
"""Can p2pd's circuit relay carry an averaging round between two volunteers behind different NATs?

In the netns testbed (bench/nat_net.py): a reachable node that relays (hivemind's p2pd, relay service on) and two
volunteers, each behind its own MASQUERADE NAT, that reserve a slot on it as their static relay (p2pd's
``-trustedRelays`` with ``-relayDiscovery=0``, hivemind's ``use_auto_relay``) and announce ``<relay>/p2p-circuit``.
Each volunteer then calls the other by peer id: a unary RPC (hivemind's persistent control connection), and a
streaming RPC of ``--messages`` messages of ``--message-kb`` kB (how hivemind moves a state download and an
all-reduce's parts). Records what each side received and the relay's own log of the bytes it relayed.
Needs root, iproute2 and iptables; prints "skipped: ..." and exits 0 otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import toolkit as kit
from nat_net import NatTestbed, nat_unsupported_reason
from netns import skipped

# One node of the probe, run in its namespace: "relay", or "vol0"/"vol1" (each calls the other).
NODE = r'''
import asyncio, functools, json, os, sys, time
import hivemind
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import averaging_pb2, dht_pb2
role, relay, n_msgs, msg_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def serve(_dht, node):
    async def ping(req, ctx: P2PContext):
        return dht_pb2.PingResponse(dht_time=1.0)
    async def many(req, ctx: P2PContext):
        for i in range(n_msgs):
            yield averaging_pb2.DownloadData(metadata=str(i).encode(),
                                             tensor_part=dict(buffer=bytes([i % 256]) * msg_bytes))
    await node.p2p.add_protobuf_handler("probe.ping", ping, dht_pb2.PingRequest)
    await node.p2p.add_protobuf_handler("probe.many", many, averaging_pb2.DownloadRequest, stream_output=True)

async def call(_dht, node, other=""):
    peer, out = PeerID.from_base58(other), {}
    try:
        await node.p2p.call_protobuf_handler(peer, "probe.ping", dht_pb2.PingRequest(), dht_pb2.PingResponse)
        out["unary"] = "ok"
    except Exception as e:
        out["unary"] = repr(e)[:200]
    got, t0 = [], time.time()
    try:
        stream = await node.p2p.iterate_protobuf_handler(peer, "probe.many", averaging_pb2.DownloadRequest(),
                                                         averaging_pb2.DownloadData)
        async for m in stream:
            got.append(len(m.tensor_part.buffer))
    except Exception as e:
        out["stream_error"] = repr(e)[:200]
    out.update(stream_messages=len(got), stream_bytes=sum(got), stream_s=round(time.time() - t0, 2))
    out["connections"] = [[str(c.peer_id), [str(a) for a in c.addrs]] for c in await node.p2p._client.list_peers()]
    return out

if role != "relay":  # static relay: reserve at once (with discovery, go-libp2p waits for 4 candidates or 3 min)
    _make = P2P.__dict__["_make_process_args"]
    P2P._make_process_args = staticmethod(lambda *a, **k: _make.__func__(*a, **{**k, "relayDiscovery": 0}))
    dht = hivemind.DHT(initial_peers=[relay], host_maddrs=["/ip4/0.0.0.0/tcp/0"], start=True, use_relay=True,
                       use_auto_relay=True, force_reachability="private", trusted_relays=[relay],
                       announce_maddrs=[f"{relay}/p2p-circuit"])
else:
    dht = hivemind.DHT(host_maddrs=["/ip4/0.0.0.0/tcp/4001"], start=True)
print(json.dumps({"role": role, "peer_id": str(dht.peer_id)}), flush=True)
if role == "relay":
    time.sleep(float(os.environ.get("PROBE_RELAY_S", "90")))
    sys.exit(0)
dht.run_coroutine(serve)
dht.store(role, str(dht.peer_id), hivemind.utils.get_dht_time() + 300)
other, t0 = None, time.time()
while other is None and time.time() - t0 < 30:
    found = dht.get("vol1" if role == "vol0" else "vol0", latest=True)
    other = found.value if found is not None else None
    time.sleep(0.5)
time.sleep(2)
print(json.dumps({"role": role, **(dht.run_coroutine(functools.partial(call, other=other)) if other else
                                  {"error": "the other volunteer's id never appeared in the DHT"})}), flush=True)
time.sleep(5)
'''


def main() -> int:
    ap = kit.parser(__doc__, out="bench/results/nat/relay_probe.json")
    ap.add_argument("--messages", type=int, default=64)
    ap.add_argument("--message-kb", type=int, default=64)
    ap.add_argument("--logs", default="runs/relay-probe", help="each node's log (p2pd's relay log at debug)")
    args = ap.parse_args()
    if skipped(nat_unsupported_reason()):
        return 0
    logs = Path(args.logs)
    # the relay logs what it relayed (p2pd's lines reach the node's log through hivemind's logger, at debug)
    env = dict(os.environ, GOLOG_LOG_LEVEL="info,relay=debug,autorelay=debug", HIVEMIND_LOGLEVEL="DEBUG")
    sizes = [str(args.messages), str(args.message_kb * 1024)]
    with NatTestbed(public=1, nats=2, rate_mbit=100) as tb:
        relay_proc = tb.popen(tb.public(0), [sys.executable, "-c", NODE, "relay", "-", *sizes],
                              log=logs / "relay.log", env=env)
        first = kit.wait_line(logs / "relay.log", relay_proc, lambda ln: ln.startswith("{"), 60.0)
        if first is None:
            raise SystemExit(f"the relay node did not start (see {logs / 'relay.log'})")
        relay_id = json.loads(first)["peer_id"]
        relay = f"/ip4/{tb.addr(tb.public(0))}/tcp/4001/p2p/{relay_id}"
        vols = [tb.popen(tb.volunteer(k), [sys.executable, "-c", NODE, f"vol{k}", relay, *sizes],
                         log=logs / f"vol{k}.log", env=env) for k in range(2)]
        for v in vols:
            try:
                v.wait(timeout=120)
            except subprocess.TimeoutExpired:
                v.kill()
    relay_log = (logs / "relay.log").read_text(errors="replace")
    result = {"command": kit.command(), "messages": args.messages, "message_bytes": args.message_kb * 1024,
              "volunteers": [_last_record(logs / f"vol{k}.log") for k in range(2)],
              "relay_copies_bytes": [int(n) for n in re.findall(r"relayed (\d+) bytes", relay_log)],
              "relay_resets": relay_log.count("relay copy error: stream reset")}
    kit.write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


def _last_record(log: Path) -> dict:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"no result (see {log})"}


if __name__ == "__main__":
    sys.exit(main())
