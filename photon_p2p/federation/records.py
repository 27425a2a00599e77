"""Signed, schema-checked per-peer heartbeat records in the DHT: published by daemons, read by `status`."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import BaseModel, StrictBool, StrictFloat, confloat, conint, conlist, constr, validator

from photon_p2p.federation.hivemind_ext.validation import cache_validation

log = logging.getLogger("photon_p2p.records")

RUNS_KEY = "photon_p2p_runs"  # unsigned hint: which run ids published lately (status names them on a miss)
STALE_BEATS = 2.5  # a record older than this many of its publisher's intervals is stale: a missed beat + slack
# A heartbeat's time and interval are its publisher's word. A record stamped further ahead than FUTURE_SKEW_S
# (honest clocks differ by seconds) is dropped, and staleness is judged by at most MAX_INTERVAL_S beats
# (federation.heartbeat_interval's own limit): either made a ghost look live forever, and a ghost at a high
# round made every peer try a full-model download after every round.
FUTURE_SKEW_S = 60.0
MAX_INTERVAL_S = 600.0
_PUBLIC_KEY_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)
_Str = constr(strict=True, max_length=256)
_Count = conint(ge=0, strict=True)
_NonNeg = confloat(ge=0.0, strict=True)


CLIP_WINDOW = 10  # heartbeats count the clipping a peer observed over its last this many rounds
MAX_CLIPPED = 64  # senders named in one heartbeat's clipped map


class ClipSeen(BaseModel):
    """What one reducer saw of one sender: rounds it clipped/dropped it (of the last CLIP_WINDOW), worst factor."""

    rounds: conint(ge=0, le=CLIP_WINDOW, strict=True)
    factor: confloat(ge=0.0, le=1.0, strict=True)  # smallest share of the sender's contribution kept; 0 = dropped


class PeerRecord(BaseModel):
    """One peer's heartbeat. Strict types: hivemind's SchemaValidator rejects anything that needs coercion."""

    peer_id: constr(strict=True, max_length=128)
    maddrs: conlist(_Str, max_items=16)
    run_id: _Str
    state: constr(strict=True, max_length=32)  # "running", "left" (final record), or what the daemon reports
    round: _Count
    local_step: _Count
    tokens: _Count
    loss: Optional[_NonNeg]
    val_ppl: Optional[_NonNeg]
    tokens_per_s: _NonNeg
    compression: constr(strict=True, max_length=64)
    group_size: _Count
    averaging_s: _NonNeg
    bytes_sent: _Count
    bytes_received: _Count
    client_mode: StrictBool
    version: constr(strict=True, max_length=64)
    started_at: StrictFloat
    time: StrictFloat  # publication time (hivemind.get_dht_time); readers derive "last seen" and staleness
    interval: confloat(gt=0.0, strict=True)  # the publisher's heartbeat period, so readers can judge staleness
    # Swarm consistency: peers at the same round with different fingerprints hold different models (a split).
    fingerprint: constr(strict=True, max_length=64)  # hex sha256 of weights + outer optimizer state; "" = unknown
    participation: confloat(ge=0.0, le=1.0, strict=True)  # share of finished rounds averaged in a group, not solo
    # Robust aggregation (federation/robust.py): senders this peer, as a reducer, clipped or dropped lately.
    clipped: Dict[constr(strict=True, max_length=128), ClipSeen] = {}  # optional: older peers' records validate

    @validator("clipped")
    def _few_clipped(cls, value):  # noqa: N805 (pydantic validators are class methods)
        if len(value) > MAX_CLIPPED:
            raise ValueError(f"at most {MAX_CLIPPED} clipped senders per record")
        return value
    # Closed swarms: the peer's owner-signed admission token (credentials.py); "" in an open swarm. The DHT's
    # AdmissionValidator checks it against the record's signer, so a record cannot borrow another peer's token.
    admission: constr(strict=True, max_length=1024) = ""
    # The silo behind this peer: how many ranks (torchrun) train it and on what ("cpu", "cuda"); older peers: 1, "".
    world_size: conint(ge=1, strict=True) = 1
    device: constr(strict=True, max_length=32) = ""
    # How it reaches the swarm: "direct", "client" (client mode: dials out only, e.g. behind NAT) or "relayed"
    # (a libp2p circuit relay carries some of its connections); "" from peers older than this field.
    connection: constr(strict=True, max_length=16) = ""
    # share of wall-clock time in inner steps (the rest: waiting on the network, evaluating, saving); optional so
    # records of peers that predate it still validate
    utilization: Optional[confloat(ge=0.0, le=1.0, strict=True)] = None
    # What the peer's last round waited for (protocol.Roster): how many peers, itself included, and the round's
    # designated leader; 0 and "" from peers older than these fields
    waited: _Count = 0
    leader: constr(strict=True, max_length=128) = ""
    # "helper": an averaging helper (federation.helper) that trains nothing; its bytes are what it carried for the
    # others. "" for a training peer, and from peers older than this field.
    role: constr(strict=True, max_length=16) = ""


class HeartbeatSchema(BaseModel):
    heartbeat: Dict[BytesWithPublicKey, PeerRecord]  # owner-key subkeys: only that key's holder can write one


class RunsSchema(BaseModel):
    photon_p2p_runs: Dict[constr(strict=True, max_length=128), StrictFloat]


def heartbeat_key(run_id: str) -> str:
    return f"{run_id}_heartbeat"


def load_identity_key(identity_path: str) -> Optional[RSAPrivateKey]:
    """The RSA key of a libp2p identity file as hivemind writes it, or None if absent or not RSA."""
    try:
        proto = crypto_pb2.PrivateKey.FromString(Path(identity_path).read_bytes())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            return None
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": proto.data})  # hivemind's own unpickling path: DER -> key
        return key
    except Exception as e:  # unreadable, corrupt (protobuf DecodeError) or not a DER key: not reusable
        log.warning("cannot reuse identity %s for signing heartbeats (%s); using a per-process key",
                    identity_path, e)
        return None


def peer_id_of_owner(subkey: bytes) -> Optional[str]:
    """The libp2p peer id whose RSA key is embedded in an owner subkey (as PeerID.from_identity derives it)."""
    match = _PUBLIC_KEY_RE.search(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None
    try:
        der = serialization.load_ssh_public_key(match.group(1)).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(multihash.encode(hashlib.sha256(proto).digest(), "sha2-256")).decode()


async def _installed_owner_key(_dht: DHT, node: Any) -> Optional[bytes]:
    # hivemind keeps only the first RSASignatureValidator it is given, so ask the DHT process which one signs.
    validators = getattr(node.protocol.record_validator, "_validators", [])
    return next((v.local_public_key for v in validators if isinstance(v, RSASignatureValidator)), None)


def schema_validators(runs: Sequence[str]) -> list[RecordValidatorBase]:
    """The strict schemas of the heartbeats of ``runs`` and of the run-id hint (a bootstrap node can hold several
    runs' records)."""
    return [*(SchemaValidator(HeartbeatSchema, prefix=run) for run in runs), SchemaValidator(RunsSchema)]


def install_validators(dht: DHT, run_id: Optional[str], identity_path: Optional[str] = None,
                       extra_validators: Sequence[RecordValidatorBase] = ()) -> bytes:
    """Make ``dht`` refuse unsigned or malformed heartbeats for ``run_id``; return the owner subkey it signs with.

    The signing key is the peer's libp2p identity when the DHT was started with one (``identity_path`` or the
    DHT's own), so readers can check that a record's peer id belongs to its signer ("verified"). Without an
    identity file p2pd keeps its key to itself and hivemind's per-process RSA key signs instead: records are
    still owner-protected, but the peer id inside them is only a claim. ``run_id=None`` installs the
    signature check alone (bootstrap nodes: they store records for every run). ``extra_validators`` are
    installed in the same call: a closed swarm's caller passes ``admission.validators_for(owner_public, run_id)``
    (the AdmissionValidator: heartbeats must carry their signer's admission token).
    """
    path = identity_path if identity_path is not None else dht.kwargs.get("identity_path") or ""
    signer = RSASignatureValidator(load_identity_key(path) if path else None)
    validators: list = [signer]
    if run_id is not None:
        validators += schema_validators([run_id])
    validators += extra_validators
    dht.add_validators(validators)
    cache_validation(dht)  # each record's signature and schema checked once, not on every read (hivemind_ext)
    return dht.run_coroutine(_installed_owner_key) or signer.local_public_key


def _finite(value: Any) -> Optional[float]:
    """Loss/perplexity as a non-negative finite float, or None (NaN would fail the validator's equality check)."""
    value = None if value is None or isinstance(value, bool) else float(value)
    return value if value is not None and math.isfinite(value) and value >= 0 else None


_FLOATS = {"tokens_per_s", "averaging_s", "started_at", "time", "interval", "participation"}
_INTS = {"round", "local_step", "tokens", "group_size", "bytes_sent", "bytes_received", "world_size"}


def make_record(snapshot: dict, **known: Any) -> PeerRecord:
    """A PeerRecord from a daemon snapshot, coercing ints/floats to the exact types the strict schema wants."""
    data = {**snapshot, **known}
    unknown = set(data) - set(PeerRecord.__fields__)
    if unknown:
        raise ValueError(f"heartbeat snapshot has unknown fields: {', '.join(sorted(unknown))}")
    data.setdefault("state", "running")
    for name in set(data) & _FLOATS:
        data[name] = float(data[name])
    for name in set(data) & _INTS:
        data[name] = int(data[name])
    for name in set(data) & {"loss", "val_ppl"}:
        data[name] = _finite(data[name])
    data["client_mode"] = bool(data.get("client_mode", False))
    if "fingerprint" in data and data["fingerprint"] is None:
        data["fingerprint"] = ""  # "not computed yet"; any other non-str is a daemon bug the schema rejects
    data["maddrs"] = [str(m) for m in data.get("maddrs", [])][:16]  # the schema caps the list; dialers need one
    return PeerRecord(**data)


class HeartbeatPublisher(threading.Thread):
    """Publishes ``snapshot()`` as this peer's signed record every ``interval`` s and on ``publish_now()``."""

    def __init__(self, dht: DHT, run_id: str, snapshot: Callable[[], dict], interval: float, ttl: float, *,
                 request_timeout: float = 10.0, owner_key: Optional[bytes] = None, admission: str = "",
                 admission_until: float = math.inf) -> None:
        super().__init__(name=f"HeartbeatPublisher({run_id})", daemon=True)
        if ttl <= interval:
            log.warning("record_ttl %.1fs <= heartbeat_interval %.1fs: this peer will flicker in status", ttl, interval)
        self.dht, self.run_id, self.snapshot = dht, run_id, snapshot
        self.interval, self.ttl, self.request_timeout = interval, ttl, request_timeout
        self.stored_at = time.monotonic()  # when a record was last stored (or the publisher began)
        # a closed swarm's token rides in every record, which must not outlive it (the validator checks both)
        self.admission, self.admission_until = admission, admission_until
        self.owner_key = owner_key or install_validators(dht, run_id)  # repeating it is harmless
        self.peer_id = dht.peer_id.to_base58()
        self.started_at = get_dht_time()
        self.maddrs: Optional[list[str]] = None
        self._wake, self._halt = threading.Event(), threading.Event()
        self._lock = threading.Lock()  # one store at a time: the final record must not race a periodic one
        self.last_expiration = -math.inf
        self.published = 0

    def publish_now(self) -> None:
        """Ask for a heartbeat at once (the daemon calls this at the end of every round); never blocks."""
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            self.publish()
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))  # a slow store eats no slack
            self._wake.clear()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop publishing and leave a final ``state="left"`` record so that readers stop counting this peer.

        hivemind keeps the entry with the latest expiration, so a record cannot be shortened or deleted:
        the final one expires when the last periodic one would have.
        """
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout if timeout is not None else self.request_timeout + 1)
        if self.published:
            # Leaving must be quick (a stopping peer promises to be gone within seconds): a short deadline; if
            # the store misses it, readers see the record go stale instead.
            self.publish(state="left", timeout=min(self.request_timeout, 3.0))

    def newest_round(self, timeout: Optional[float] = None) -> Optional[int]:
        """The highest round in other peers' fresh, running records; None if there are none or on a timeout."""
        timeout = self.request_timeout if timeout is None else timeout
        try:
            rows = read_records(self.dht, self.run_id, timeout)
        except Exception as e:  # a lookup that fails just means "no evidence that we are behind"
            log.debug("could not read the swarm's heartbeats: %s", e)
            return None
        return max((r["round"] for r in rows if r["peer_id"] != self.peer_id and is_live(r)), default=None)

    def _record(self, state: Optional[str]) -> PeerRecord:
        snap = dict(self.snapshot())
        if self.maddrs is None and "maddrs" not in snap:
            self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        snap.setdefault("maddrs", self.maddrs)
        snap.setdefault("started_at", self.started_at)
        if state is not None:
            snap["state"] = state
        if self.admission:
            snap["admission"] = self.admission
        return make_record(snap, peer_id=self.peer_id, run_id=self.run_id, time=get_dht_time(),
                           interval=float(self.interval))

    def publish(self, state: Optional[str] = None, timeout: Optional[float] = None) -> bool:
        """Store one record with a deadline; failures are logged, never raised (a heartbeat must not kill training)."""
        timeout = self.request_timeout if timeout is None else timeout
        with self._lock:
            stores: list = []
            try:
                record = self._record(state)
                expiration = record.time + self.ttl
                if state == "left":  # lives as long as the last record would have: it cannot be shortened
                    expiration = max(self.last_expiration, record.time + min(self.ttl, self.interval))
                # the DHT keeps the entry that expires last: a store must never expire before the previous one
                expiration = max(expiration, self.last_expiration + 1e-3)
                expiration = min(expiration, self.admission_until)
                stores = [
                    self.dht.store(heartbeat_key(self.run_id), record.dict(), expiration, subkey=self.owner_key,
                                   return_future=True),
                    self.dht.store(RUNS_KEY, record.time, expiration, subkey=self.run_id, return_future=True),
                ]
                deadline = time.monotonic() + timeout
                ok = stores[0].result(timeout=timeout)
                stores[1].result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                for future in stores:
                    future.cancel()
                # One slow store is a busy DHT (16 peers booting on 2 cores); the record stays visible until its
                # expiration. Worth a warning only once this peer has gone unseen for half its records' lifetime.
                late = time.monotonic() - self.stored_at
                (log.warning if late > self.ttl / 2 else log.info)(
                    "heartbeat not stored within %.1fs (last stored %.0fs ago)", timeout, late)
                return False
            except Exception as e:  # a bad snapshot or a DHT hiccup: log it and try again next interval
                log.warning("heartbeat not published: %s", e)
                return False
            if ok:
                self.last_expiration = max(self.last_expiration, expiration)
                self.published += 1
                self.stored_at = time.monotonic()
            else:
                log.debug("heartbeat store was not accepted by any DHT node")
            return bool(ok)


def _get(dht: DHT, key: str, timeout: float) -> Any:
    future = dht.get(key, latest=True, return_future=True)  # latest: merge every replica's subkeys
    try:
        return future.result(timeout=timeout)
    finally:
        future.cancel()  # a no-op when done; otherwise the DHT process may drop the abandoned lookup


def read_records(dht: DHT, run_id: str, timeout: float) -> list[dict]:
    """Every current record of ``run_id``: PeerRecord fields plus last_seen, expires (s) and verified.

    Malformed entries are dropped silently, and so are records stamped more than FUTURE_SKEW_S ahead. One row per
    peer id: a verified record beats a claimed one (so a
    forger cannot shadow a verified peer), then the newest wins (a restarted peer with a fresh key).
    Raises concurrent.futures.TimeoutError if the DHT does not answer within ``timeout`` seconds.
    """
    found = _get(dht, heartbeat_key(run_id), timeout)
    now = get_dht_time()
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    best: dict[str, dict] = {}
    for subkey, item in entries.items():
        try:
            record = PeerRecord.parse_obj(item.value)
        except Exception:  # anything a foreign or buggy peer may have managed to store
            continue
        if record.run_id != run_id or record.time > now + FUTURE_SKEW_S:
            continue
        row = record.dict()
        row.update(last_seen=max(0.0, now - record.time), expires=max(0.0, item.expiration_time - now),
                   verified=peer_id_of_owner(subkey) == record.peer_id)
        old = best.get(record.peer_id)
        if old is None or (row["verified"], row["time"]) > (old["verified"], old["time"]):
            best[record.peer_id] = row
    return list(best.values())


def is_live(record: dict, stale_after: Optional[float] = None) -> bool:
    """A read record of a running peer that beat recently (within ``stale_after`` s, default STALE_BEATS beats)."""
    limit = stale_after if stale_after is not None else STALE_BEATS * min(record["interval"], MAX_INTERVAL_S)
    return record["state"] != "left" and record["last_seen"] <= limit


def near_miss(run_id: str, runs: Sequence[str]) -> Optional[str]:
    """A run id of ``runs`` that ``run_id`` looks like a slip of (another case, or one or two characters off:
    one for ids under 8 characters), or None. The run-id hint is anyone's to write, so a run id that nobody
    trains yet is only refused when it looks like a typo of one that somebody does: an unrelated one is a new run
    (a shared bootstrap node hosts several), and an outsider cannot keep it from starting by publishing names."""
    def distance(a: str, b: str) -> int:  # edits, a swap of two neighbours counting as one ('tset', 'test')
        d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
                if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                    d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
        return d[-1][-1]
    limit = 1 if len(run_id) < 8 else 2
    close = [r for r in runs if r != run_id and (r.lower() == run_id.lower() or distance(r, run_id) <= limit)]
    return close[0] if close else None


def read_run_ids(dht: DHT, timeout: float) -> List[str]:
    """Run ids that published heartbeats lately (an unsigned hint, newest first); [] on any trouble."""
    try:
        found = _get(dht, RUNS_KEY, timeout)
    except Exception:
        return []
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    runs = [(item.value, run) for run, item in entries.items()
            if isinstance(run, str) and isinstance(item.value, float)]
    return [run for _, run in sorted(runs, reverse=True)]
