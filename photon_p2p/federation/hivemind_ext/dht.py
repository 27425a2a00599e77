"""A quiet hand-back of coroutine results the caller stopped waiting for: mirrors hivemind/dht/dht.py."""

from __future__ import annotations

from typing import Any

from hivemind.dht.dht import DHT, logger


# hivemind's DHT._run_coroutine sets the caller's future when the coroutine ends. A caller that stopped waiting
# (our deadlines: the averager's served-bytes read, connection_kind) cancels that future, and hivemind then logs
# "Caught an exception when running a coroutine" with two InvalidStateError tracebacks and an "exception was never
# retrieved": 27 such tracebacks in one 32-peer run's logs, none of them a fault. hivemind's own _get/_store check
# ``future.done()`` first; so does this one.
async def _run_coroutine(self: DHT, coro: Any, future: Any) -> None:
    try:
        result = await coro(self, self._node)
    except BaseException as e:
        if not future.done():
            logger.exception("Caught an exception when running a coroutine:")
            future.set_exception(e)
        return
    if not future.done():
        future.set_result(result)


def install() -> None:
    """Use it in DHT processes forked from now on (idempotent; call it before hivemind.DHT forks)."""
    DHT._run_coroutine = _run_coroutine
