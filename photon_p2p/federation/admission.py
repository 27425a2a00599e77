"""Closed swarms in the DHT: admission tokens and revocations published there, the admitted set, a record validator.

Two DHT keys per owner key (named by its fingerprint, not by run, so `photon-peer revoke` needs no run id):
- ``photon_admitted_<fp>``: subkey = peer id, value = that peer's admission token. Every admitted peer publishes
  its own (re-stored as it beats); anyone can store a valid token, only the owner can make one.
- ``photon_revoked_<fp>``: subkey = peer id, value = an owner-signed revocation. `photon-peer revoke` stores it;
  every peer that reads one stores it again now and then, so it outlives the nodes that first held it.

The admitted set = peers with a valid, unexpired token minus those revoked. Peers re-read it at every matchmaking
step (the averager process) and every round (the daemon), so a revocation takes effect within one round.

``AdmissionValidator`` (in the DHT process) refuses tokens and revocations that do not verify, and heartbeats whose
embedded token is not the signer's own. It is stateless on purpose: hivemind validates what it *reads* too, and
drops a whole dictionary for one bad entry, so a rule that changes over time (e.g. "not revoked") would make a
reader drop its peers' records after a revocation. Revocation is enforced where peers read the set instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Iterable, Optional

from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from photon_p2p.credentials import CredentialError, Grant, fingerprint, public_from_bytes, revokes, verify
from photon_p2p.federation import FederationError
from photon_p2p.federation.records import heartbeat_key, peer_id_of_owner

log = logging.getLogger("photon_p2p.admission")
REPUBLISH_S = 60.0  # how often a peer stores again the revocations it has seen (keeps them alive in the DHT)


def admitted_key(owner_fp: str) -> str:
    return f"photon_admitted_{owner_fp}"


def revoked_key(owner_fp: str) -> str:
    return f"photon_revoked_{owner_fp}"


def _entries(found: Any) -> dict:
    value = getattr(found, "value", None)
    return value if isinstance(value, dict) else {}


def _peer_of_subkey(subkey: Any) -> str:
    if isinstance(subkey, bytes):  # a peer id as bytes, the way hivemind declares averagers
        try:
            from hivemind.p2p import PeerID

            return PeerID(subkey).to_base58()
        except Exception:
            return ""
    return subkey if isinstance(subkey, str) else ""


class AdmissionView:
    """The admitted set as of the last read: tokens (verified) and revocations (verified), cached with a time."""

    def __init__(self, owner_public: bytes, run_id: Optional[str] = None) -> None:
        self.owner_public, self.run_id = owner_public, run_id  # run_id: only tokens to this run admit (None: any)
        self._public = public_from_bytes(owner_public)
        self.fingerprint = fingerprint(self._public)
        self.tokens: dict[str, Grant] = {}
        self.revocations: dict[str, Grant] = {}
        self.refreshed_at = -math.inf  # time.monotonic() of the last successful read

    def update(self, tokens: dict, revocations: dict, now: Optional[float] = None) -> None:
        """Merge a read of both keys: newest token per peer; every revocation is kept until it expires."""
        now = time.time() if now is None else now
        for subkey, item in revocations.items():
            grant = self._grant(getattr(item, "value", None), "revoke")
            if grant is not None and grant.peer_id == _peer_of_subkey(subkey):
                old = self.revocations.get(grant.peer_id)
                if old is None or grant.issued > old.issued:
                    self.revocations[grant.peer_id] = grant
        fresh: dict[str, Grant] = {}
        for subkey, item in tokens.items():
            grant = self._grant(getattr(item, "value", None), "admit")
            if grant is not None and grant.peer_id == _peer_of_subkey(subkey) and not grant.expired(now):
                if grant.peer_id not in fresh or grant.issued > fresh[grant.peer_id].issued:
                    fresh[grant.peer_id] = grant
        self.tokens = fresh  # a token no longer published (its peer left) is forgotten
        self.revocations = {p: r for p, r in self.revocations.items() if not r.expired(now)}

    def add_token(self, text: str) -> Optional[Grant]:
        grant = self._grant(text, "admit")
        if grant is not None and not grant.expired():
            self.tokens[grant.peer_id] = grant
        return grant

    def _grant(self, text: Any, kind: str) -> Optional[Grant]:
        try:
            return verify(text, self._public, kind)
        except CredentialError:
            return None

    def revoked(self, peer_id: str) -> Optional[Grant]:
        """The revocation that cancels ``peer_id``'s current token, if any."""
        token, revocation = self.tokens.get(peer_id), self.revocations.get(peer_id)
        return revocation if token is not None and revocation is not None and revokes(revocation, token) else None

    def allows(self, peer_id: str, now: Optional[float] = None) -> bool:
        token = self.tokens.get(str(peer_id))
        return token is not None and not token.expired(now) and token.admits_run(self.run_id) and \
            self.revoked(str(peer_id)) is None

    def admitted(self) -> list[str]:
        return sorted(p for p in self.tokens if self.allows(p))


class AdmissionValidator(RecordValidatorBase):
    """Refuses, in the DHT: tokens and revocations that the owner did not sign, and heartbeats of ``run_id`` that do
    not carry a token of their signer (the peer id of the RSA key in the record's subkey), or outlive that token."""

    def __init__(self, owner_public: bytes, run_id: Optional[str]) -> None:
        self.owner_public = owner_public
        fp = fingerprint(public_from_bytes(owner_public))
        self._admitted = DHTID.generate(source=admitted_key(fp)).to_bytes()
        self._revoked = DHTID.generate(source=revoked_key(fp)).to_bytes()
        self._heartbeat = DHTID.generate(source=heartbeat_key(run_id)).to_bytes() if run_id else None
        self._run_id = run_id
        self._public = None

    def __getstate__(self) -> dict:  # sent to the DHT process: keys as bytes only
        return {k: v for k, v in self.__dict__.items() if k != "_public"} | {"_public": None}

    def _key(self):
        if self._public is None:
            self._public = public_from_bytes(self.owner_public)
        return self._public

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in (self._admitted, self._revoked, self._heartbeat):
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            if record.key == self._heartbeat:
                text = value.get("admission", "") if isinstance(value, dict) else ""
                grant = verify(text, self._key(), "admit")
                return grant.peer_id == peer_id_of_owner(subkey) and grant.admits_run(self._run_id) and \
                    record.expiration_time <= grant.until + 1.0
            kind = "admit" if record.key == self._admitted else "revoke"
            grant = verify(value, self._key(), kind)
            # Neither a token nor a revocation may outlive its own expiry in the DHT: the DHT keeps the entry that
            # expires last, so a revoked peer that re-stored an old revocation with a far-future expiration kept
            # the owner's next one (for a later token) from ever being stored.
            return grant.peer_id == _peer_of_subkey(subkey) and record.expiration_time <= grant.until + 1.0
        except Exception:  # undecodable bytes or a token that does not verify
            return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # the same owner and run installed twice (a publisher re-installing): keep one
        return isinstance(other, AdmissionValidator) and other.__getstate__() == self.__getstate__()


class SwarmAdmission:
    """This peer's side of a closed swarm, in the daemon's process: publish its token, read the admitted set."""

    def __init__(self, dht: DHT, owner_public: bytes, token: str, peer_id: str, timeout: float,
                 record_ttl: float, run_id: Optional[str] = None) -> None:
        self.dht, self.peer_id, self.timeout, self.ttl = dht, peer_id, float(timeout), float(record_ttl)
        self.view = AdmissionView(owner_public, run_id)
        self.token = token.strip()
        grant = self.view.add_token(self.token)
        if grant is None or grant.peer_id != peer_id or not grant.admits_run(run_id):
            raise FederationError("this peer's admission token is not valid for its peer id, run and owner key")
        self.grant = grant
        self._republished = -math.inf

    @property
    def fingerprint(self) -> str:
        return self.view.fingerprint

    def publish(self) -> bool:
        """Store this peer's token (expiring with the record TTL, never after the token itself)."""
        expiration = min(get_dht_time() + max(self.ttl, 30.0), self.grant.until)
        try:
            return bool(self.dht.store(admitted_key(self.fingerprint), self.token, expiration, subkey=self.peer_id,
                                       return_future=True).result(timeout=self.timeout))
        except Exception as e:  # a store that fails is retried on the next refresh
            log.warning("admission token not published: %s", e)
            return False

    def refresh(self) -> AdmissionView:
        """Read tokens and revocations with a deadline (on a timeout the cached view stays), publish ours again."""
        self.publish()
        fp = self.fingerprint
        futures = [self.dht.get(key, latest=True, return_future=True) for key in (admitted_key(fp), revoked_key(fp))]
        try:
            deadline = time.monotonic() + self.timeout
            found = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except Exception as e:
            for f in futures:
                f.cancel()
            log.warning("could not read the admitted peers within %.1fs (%s); using the last list", self.timeout, e)
            return self.view
        self.view.update(_entries(found[0]), _entries(found[1]))
        self.view.add_token(self.token)  # we know our own token even when the store was slow
        self.view.refreshed_at = time.monotonic()
        if time.monotonic() - self._republished > REPUBLISH_S:
            self._republished = time.monotonic()
            self._republish(self.view.revocations.values())
        return self.view

    def _republish(self, revocations: Iterable[Grant]) -> None:
        for grant in revocations:  # fire and forget: any peer may store an owner-signed revocation
            self.dht.store(revoked_key(self.fingerprint), grant.text, grant.until, subkey=grant.peer_id,
                           return_future=True)

    def check_self(self) -> None:
        """Stop this peer (one line) when its own admission is revoked or has expired."""
        revocation = self.view.revoked(self.peer_id)
        if revocation is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(revocation.issued))
            raise FederationError(f"the swarm owner revoked this peer's admission at {when}; it leaves the swarm")
        if self.grant.expired():
            raise FederationError("this peer's admission token has expired; ask the swarm owner for a new one")

    def allows(self, peer_id: str) -> bool:
        return self.view.allows(peer_id)


async def read_view_async(dht: DHT, view: AdmissionView, timeout: float) -> bool:
    """Refresh ``view`` from the DHT inside an event loop (the averager process); False on a timeout."""
    fp = view.fingerprint
    try:
        found = await asyncio.wait_for(asyncio.gather(
            dht.get(admitted_key(fp), latest=True, return_future=True),
            dht.get(revoked_key(fp), latest=True, return_future=True)), timeout)
    except Exception as e:  # timeout or a DHT hiccup: keep the last view
        log.debug("admission refresh failed: %r", e)
        return False
    view.update(_entries(found[0]), _entries(found[1]))
    view.refreshed_at = time.monotonic()
    return True


def publish_revocation(dht: DHT, text: str, owner_public: bytes, timeout: float) -> Grant:
    """Store an owner-signed revocation (photon-peer revoke) and read it back; raises FederationError if not stored."""
    view = AdmissionView(owner_public)
    grant = verify(text, public_from_bytes(owner_public), "revoke")
    key = revoked_key(view.fingerprint)
    ok = dht.store(key, grant.text, grant.until, subkey=grant.peer_id, return_future=True).result(timeout=timeout)
    found = dht.get(key, latest=True, return_future=True).result(timeout=timeout)
    view.update({}, _entries(found))
    if not ok or grant.peer_id not in view.revocations:
        raise FederationError("no DHT node accepted the revocation (are the initial peers part of the swarm?)")
    return grant


def revoke_via(net: Any, owner_key: Any, peer_id: str, valid_for: float) -> tuple[str, Grant, Optional[Grant]]:
    """`photon-peer revoke`: join the swarm's DHT as a client, publish a revocation of ``peer_id`` that lasts
    ``valid_for`` s and at least as long as the peer's newest published token (one that expired first silently
    let the peer back in), leave. (owner fingerprint, the revocation, the token it outlasts or None)."""
    import dataclasses

    from photon_p2p.credentials import make_revocation, public_bytes
    from photon_p2p.federation.network import start_dht, stop_dht

    client = dataclasses.replace(net, host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[], identity_path="",
                                 client_mode=True, use_auto_relay=False)
    dht = start_dht(client, client_mode=True)
    try:
        owner = public_bytes(owner_key.public_key())
        dht.add_validators(validators_for(owner, None))
        try:
            token = read_view(dht, owner, float(net.request_timeout)).tokens.get(peer_id)
        except Exception as e:  # a timeout: the revocation would not know how long to last
            raise FederationError(f"could not read the swarm's tokens within {net.request_timeout:g}s ({e!r})") \
                from None
        now = time.time()
        if token is not None:
            valid_for = max(valid_for, token.until - now + 60.0)
        grant = publish_revocation(dht, make_revocation(owner_key, peer_id, valid_for, now), owner,
                                   timeout=float(net.request_timeout))
        return fingerprint(owner_key.public_key()), grant, token
    finally:
        stop_dht(dht)


def read_view(dht: DHT, owner_public: bytes, timeout: float, run_id: Optional[str] = None) -> AdmissionView:
    """The admitted set (to ``run_id``, or to any run) as a reader (status) sees it; raises
    concurrent.futures.TimeoutError past ``timeout``."""
    view = AdmissionView(owner_public, run_id)
    fp = view.fingerprint
    futures = [dht.get(key, latest=True, return_future=True) for key in (admitted_key(fp), revoked_key(fp))]
    try:
        deadline = time.monotonic() + timeout
        found = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
    finally:
        for f in futures:
            f.cancel()
    view.update(_entries(found[0]), _entries(found[1]))
    return view


def validators_for(owner_public: Optional[bytes], run_id: Optional[str]) -> list[RecordValidatorBase]:
    return [AdmissionValidator(owner_public, run_id)] if owner_public else []


__all__ = ["AdmissionView", "AdmissionValidator", "SwarmAdmission", "admitted_key", "revoked_key",
           "read_view_async", "publish_revocation", "validators_for", "revoke_via", "read_view"]
