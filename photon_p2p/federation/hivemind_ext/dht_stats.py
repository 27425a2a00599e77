"""What this peer's DHT node serves to others: requests and bytes per kind (mirrors hivemind/dht/protocol.py)."""

# hivemind's DHT runs in a forked child process (hivemind.DHT is a ForkProcess); the node's DHTProtocol registers
# its rpc_ping / rpc_store / rpc_find as p2p handlers when it is created there. ``install`` wraps those three
# methods on the class, so it must run before ``hivemind.DHT(...)`` forks (network.start_dht calls it): the child
# inherits the patched class and counts into its own copy of ``SERVED``. ``served`` is for
# ``dht.run_coroutine(served)``, which runs it inside the DHT process and returns the counters to the caller.
#
# Counted: each request another node sent this one, and request.ByteSize() + response.ByteSize() (the protobufs
# on the wire, without p2p framing). Not counted: the rpc_ping that rpc_store and rpc_find call on themselves
# for their sender (adding it to the routing table), which is no request served.

from __future__ import annotations

import contextvars
import functools
from typing import Any

from hivemind.dht.protocol import DHTProtocol

KINDS = ("ping", "store", "find")
# In the DHT process: {kind: {"requests": n, "bytes": b}} since it started. Zero in every other process.
SERVED: dict[str, dict[str, int]] = {kind: {"requests": 0, "bytes": 0} for kind in KINDS}
# In the DHT process: {key id (hex): [requests, bytes]} served per DHT key (find results and stored values): which
# key is the hot spot. Key ids are hashes; ``label`` names the ones a peer knows.
BY_KEY: dict[str, list[int]] = {}
_serving = contextvars.ContextVar("photon_dht_serving", default=False)  # inside a handler (and tasks it starts)


def _counting(kind: str, handler: Any) -> Any:
    # functools.wraps keeps what ServicerBase._collect_rpc_handlers reads: the name, the annotations (resolved in
    # hivemind's module through __wrapped__), and our explicit (self, request, context) signature.
    @functools.wraps(handler)
    async def rpc(self, request, context):
        if _serving.get():  # rpc_store / rpc_find pinging on behalf of their sender: not a request served
            return await handler(self, request, context)
        token, response = _serving.set(True), None
        try:
            response = await handler(self, request, context)
            return response
        finally:
            _serving.reset(token)
            counts = SERVED[kind]
            counts["requests"] += 1
            counts["bytes"] += request.ByteSize() + (response.ByteSize() if response is not None else 0)
            if kind == "find" and response is not None:
                for key, result in zip(request.keys, response.results):
                    _add(key, result.ByteSize())
            elif kind == "store":
                for key, value in zip(request.keys, request.values):
                    _add(key, len(value))

    rpc._photon_counted = True
    return rpc


def _add(key: bytes, size: int) -> None:
    entry = BY_KEY.setdefault(bytes(key).hex(), [0, 0])
    entry[0] += 1
    entry[1] += size


def install() -> None:
    """Count the requests DHT nodes created from now on serve (idempotent; call it before hivemind.DHT forks)."""
    for kind in KINDS:
        name = f"rpc_{kind}"
        handler = getattr(DHTProtocol, name)
        if not getattr(handler, "_photon_counted", False):
            setattr(DHTProtocol, name, _counting(kind, handler))


async def served(dht: Any, node: Any) -> dict[str, dict[str, int]]:
    """A copy of the DHT process's counters: ``dht.run_coroutine(served)`` (see the comment above)."""
    return {kind: dict(counts) for kind, counts in SERVED.items()}


async def served_by_key(dht: Any, node: Any) -> dict[str, list[int]]:
    """A copy of the DHT process's per-key counters: ``dht.run_coroutine(served_by_key)``."""
    return {key: list(entry) for key, entry in BY_KEY.items()}


def label(by_key: dict[str, list[int]], names: list[str], top: int = 6) -> dict[str, list[int]]:
    """The ``top`` keys by bytes, each named by the first of ``names`` (DHT key strings) that hashes to it,
    others "other"; every key beyond ``top`` is summed into "rest"."""
    from hivemind.dht.routing import DHTID

    known = {DHTID.generate(source=name).to_bytes().hex(): name for name in names}
    ranked = sorted(by_key.items(), key=lambda kv: -kv[1][1])
    out: dict[str, list[int]] = {}
    for key, (requests, size) in ranked[:top]:
        name = known.get(key, f"other:{key[:8]}")
        out[name] = [requests, size]
    rest = ranked[top:]
    if rest:
        out["rest"] = [sum(r for _, (r, _) in rest), sum(b for _, (_, b) in rest)]
    return out


def total(counts: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(requests, bytes) over every kind of ``served``'s counters."""
    return (sum(c["requests"] for c in counts.values()), sum(c["bytes"] for c in counts.values()))
