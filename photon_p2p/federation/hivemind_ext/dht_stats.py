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

    rpc._photon_counted = True
    return rpc


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


def total(counts: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(requests, bytes) over every kind of ``served``'s counters."""
    return (sum(c["requests"] for c in counts.values()), sum(c["bytes"] for c in counts.values()))
