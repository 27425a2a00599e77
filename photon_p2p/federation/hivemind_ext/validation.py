"""A DHT node that validates each record once: mirrors hivemind/dht/validation.py's CompositeValidator."""

# Every DHT find answers with the whole dictionary under a key (every peer's clock record, every heartbeat), and
# hivemind validates each of its records again on every answer: an RSA signature and a pydantic schema per record.
# A store first finds the key's nearest nodes, so it pays the same. At 8 simulated peers this was about 45 % of
# each DHT process's CPU, most of it records seen a moment before (a record changes once per keepalive; it is
# read by every peer every few seconds); the cost per read grows with the swarm.
#
# Our validators are pure functions of the record (signature, schema, admission token inside the value; none
# reads the clock or a revocation list), so a record that passed once passes again: only passes are remembered,
# a refused record is checked in full every time (a peer sending bad records pays no less), and the memory is
# cleared whenever validators are added.

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hivemind.dht.validation import CompositeValidator, DHTRecord

CACHED_RECORDS = 8192  # records remembered as valid (about one per peer and key; a record is under 1 KB)


class CachedValidator(CompositeValidator):
    """hivemind's CompositeValidator that remembers the records it has passed (module comment)."""

    def __init__(self, validators=(), size: int = CACHED_RECORDS) -> None:
        self._passed: OrderedDict[DHTRecord, None] = OrderedDict()
        self._size = int(size)
        super().__init__(validators)

    def extend(self, validators) -> None:
        super().extend(validators)
        self._passed.clear()  # a new validator may refuse what the old ones passed

    def validate(self, record: DHTRecord) -> bool:
        if record in self._passed:
            self._passed.move_to_end(record)
            return True
        if not super().validate(record):
            return False
        self._passed[record] = None
        if len(self._passed) > self._size:
            self._passed.popitem(last=False)
        return True


async def _install(_dht: Any, node: Any) -> bool:
    current = node.protocol.record_validator
    if isinstance(current, CachedValidator) or not isinstance(current, CompositeValidator):
        return False
    node.protocol.record_validator = CachedValidator(current._validators)
    return True


def cache_validation(dht: Any) -> bool:
    """Make ``dht``'s node (in its own process) validate each record once; True if installed now."""
    return bool(dht.run_coroutine(_install))
