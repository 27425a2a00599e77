"""The DHT validates each record once (federation/hivemind_ext/validation.py): passes are remembered, refusals not."""

from __future__ import annotations

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from photon_p2p.federation.hivemind_ext.validation import CachedValidator


class Counting(RecordValidatorBase):
    def __init__(self, refuse: bytes = b"bad") -> None:
        self.calls, self.refuse = 0, refuse

    def validate(self, record: DHTRecord) -> bool:
        self.calls += 1
        return self.refuse not in record.value


def rec(value: bytes, expiration: float = 100.0) -> DHTRecord:
    return DHTRecord(key=b"k", subkey=b"s", value=value, expiration_time=expiration)


def test_a_record_that_passed_is_not_checked_again_until_it_changes():
    inner = Counting()
    v = CachedValidator([inner])
    assert v.validate(rec(b"good")) and v.validate(rec(b"good")) and inner.calls == 1
    assert v.validate(rec(b"good", expiration=103.0)) and inner.calls == 2  # a re-stored record is a new record
    assert v.validate(rec(b"good2")) and inner.calls == 3


def test_a_refused_record_is_checked_in_full_every_time():
    inner = Counting()
    v = CachedValidator([inner])
    assert not v.validate(rec(b"bad")) and not v.validate(rec(b"bad")) and inner.calls == 2


def test_a_new_validator_forgets_what_the_old_ones_passed():
    v = CachedValidator([Counting()])
    assert v.validate(rec(b"strict"))
    v.extend([Counting(refuse=b"strict")])  # admission installed later (a closed swarm)
    assert not v.validate(rec(b"strict"))


def test_the_memory_is_bounded():
    inner = Counting()
    v = CachedValidator([inner], size=2)
    for value in (b"a", b"b", b"c"):
        v.validate(rec(value))
    assert v.validate(rec(b"a")) and inner.calls == 4  # the oldest was forgotten
    assert len(v._passed) == 2
