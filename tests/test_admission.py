"""Closed swarms, fast: tokens, expiry, revocation, the admitted set and the DHT record validator (no processes)."""

from __future__ import annotations

import math
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey

from photon_p2p.credentials import (
    TOKEN_PREFIX,
    CredentialError,
    _sign,
    check_token,
    create_identity,
    create_owner_key,
    load_owner_private,
    load_owner_public,
    make_revocation,
    make_token,
    parse_duration,
    peer_id_of_identity,
    public_bytes,
    verify,
)
from photon_p2p.federation.admission import AdmissionValidator, AdmissionView, admitted_key, revoked_key
from photon_p2p.federation.hivemind_ext.progress_tracker import admitted_progress
from photon_p2p.federation.records import peer_id_of_owner

PEER = "QmY2WkkiQCiuHX1Dzj48DojGrdPXoq71jogh5huJGDAp6f"
OTHER = "QmWbQ4aHkz7RZ5hG5eKVmRfpK3Wq2pVx8ZQfFvNc1bAzTr"


@pytest.fixture
def owner(tmp_path):
    create_owner_key(tmp_path / "owner.key")
    return load_owner_private(tmp_path / "owner.key")


def entries(**texts: str) -> dict:
    return {peer: ValueWithExpiration(text, time.time() + 60) for peer, text in texts.items()}


def test_token_round_trip_and_tamper(owner, tmp_path):
    token = make_token(owner, PEER, 3600)
    grant = verify(token, owner.public_key())
    assert grant.peer_id == PEER and grant.until - grant.issued == pytest.approx(3600) and not grant.expired()
    assert load_owner_public(tmp_path / "owner.key.pub").public_bytes_raw() == owner.public_key().public_bytes_raw()
    prefix, body, sig = token.split(".")
    forged = make_token(owner, OTHER, 3600).split(".")[1]  # a valid payload for another peer, our signature
    with pytest.raises(CredentialError, match="does not verify"):
        verify(f"{prefix}.{forged}.{sig}", owner.public_key())
    with pytest.raises(CredentialError, match="should start with"):
        verify(token.replace("admit", "revoke", 1), owner.public_key())
    with pytest.raises(CredentialError, match="should start with"):  # a token is not a revocation
        verify(token, owner.public_key(), "revoke")


def test_token_of_another_owner_names_both_keys(owner, tmp_path):
    create_owner_key(tmp_path / "other.key")
    other = load_owner_private(tmp_path / "other.key")
    with pytest.raises(CredentialError, match="signed by owner key"):
        verify(make_token(other, PEER, 60), owner.public_key())


def test_check_token_expiry_and_peer_binding(owner, tmp_path):
    path = tmp_path / "t"
    path.write_text(make_token(owner, PEER, 60, now=time.time() - 120) + "\n")
    with pytest.raises(CredentialError, match="expired at"):
        check_token(path, owner.public_key(), PEER)
    path.write_text(make_token(owner, PEER, 60))
    with pytest.raises(CredentialError, match=f"is for peer {PEER}, but this peer's identity is {OTHER}"):
        check_token(path, owner.public_key(), OTHER)
    assert check_token(path, owner.public_key(), PEER).peer_id == PEER
    with pytest.raises(CredentialError, match="does not exist"):
        check_token(tmp_path / "missing", owner.public_key(), PEER)


def test_owner_key_files(tmp_path):
    priv, pub, fp = create_owner_key(tmp_path / "k")
    assert priv.stat().st_mode & 0o777 == 0o600 and pub.name == "k.pub" and len(fp) == 16
    with pytest.raises(CredentialError, match="refusing to overwrite"):
        create_owner_key(tmp_path / "k")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(CredentialError, match="not a PEM public key"):
        load_owner_public(tmp_path / "junk")
    with pytest.raises(CredentialError, match="not a private key"):
        load_owner_private(pub)


def test_durations():
    assert [parse_duration(t) for t in ("90s", "15m", "12h", "7d", "2w", "30")] == \
        [90, 900, 43200, 604800, 1209600, 30]
    for bad in ("", "7x", "-1d", "0"):
        with pytest.raises(CredentialError):
            parse_duration(bad)


def test_identity_peer_id_matches_hivemind(tmp_path):
    from hivemind.p2p import PeerID

    peer_id = create_identity(tmp_path / "id.key")
    assert peer_id == peer_id_of_identity(tmp_path / "id.key")
    assert peer_id == PeerID.from_identity((tmp_path / "id.key").read_bytes()).to_base58()


def test_view_revocation_cancels_older_tokens_only(owner):
    view = AdmissionView(public_bytes(owner.public_key()))
    old = make_token(owner, PEER, 3600, now=time.time() - 10)
    view.update(entries(**{PEER: old, OTHER: make_token(owner, OTHER, 3600)}), {})
    assert view.admitted() == sorted([PEER, OTHER])
    view.update(entries(**{PEER: old}), entries(**{PEER: make_revocation(owner, PEER, 3600)}))
    assert not view.allows(PEER) and view.revoked(PEER) is not None
    assert not view.allows(OTHER)  # its token is no longer published: it left
    view.update(entries(**{PEER: make_token(owner, PEER, 3600, now=time.time() + 1)}), {})  # admitted again later
    assert view.allows(PEER)  # the revocation is remembered, but it predates the new token


def test_view_ignores_bad_entries(owner, tmp_path):
    create_owner_key(tmp_path / "other.key")
    stranger = load_owner_private(tmp_path / "other.key")
    view = AdmissionView(public_bytes(owner.public_key()))
    view.update(entries(**{PEER: make_token(stranger, PEER, 60),  # not our owner
                           OTHER: make_token(owner, PEER, 60)}),  # published under another peer's subkey
                entries(**{OTHER: make_revocation(stranger, OTHER, 60)}))
    assert view.admitted() == [] and view.revocations == {}
    view.update(entries(**{PEER: make_token(owner, PEER, 60, now=time.time() - 120)}), {})  # expired
    assert not view.allows(PEER)


def _record(key: str, subkey, value, expiration: float) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                     MSGPackSerializer.dumps(value), expiration)


def test_validator_tokens_revocations_and_heartbeats(owner):
    pub = public_bytes(owner.public_key())
    validator = AdmissionValidator(pub, "run")
    fp = AdmissionView(pub).fingerprint
    token = make_token(owner, PEER, 600)
    until = verify(token, owner.public_key()).until
    assert validator.validate(_record(admitted_key(fp), PEER, token, until - 1))
    assert not validator.validate(_record(admitted_key(fp), OTHER, token, until - 1))  # someone else's subkey
    assert not validator.validate(_record(admitted_key(fp), PEER, token, until + 60))  # outliving the token
    assert not validator.validate(_record(admitted_key(fp), PEER, "photon-admit-v1.garbage.x", until - 1))
    assert validator.validate(_record(revoked_key(fp), PEER, make_revocation(owner, PEER, 60), time.time() + 30))
    # issue 24, item 8: an old revocation re-stored with a far-future expiration kept the owner's next one out
    assert not validator.validate(_record(revoked_key(fp), PEER, make_revocation(owner, PEER, 60), time.time() + 1e6))
    assert not validator.validate(_record(revoked_key(fp), PEER, token, time.time() + 30))
    assert validator.validate(_record("unrelated", "x", "anything", time.time() + 30))

    signer = RSASignatureValidator(RSAPrivateKey())
    subkey = signer.local_public_key  # how heartbeats are keyed: the signer's RSA key
    peer = peer_id_of_owner(subkey)
    heartbeat = {"peer_id": peer, "admission": make_token(owner, peer, 600)}
    assert validator.validate(_record("run_heartbeat", subkey, heartbeat, time.time() + 60))
    assert not validator.validate(_record("run_heartbeat", subkey, {"peer_id": peer}, time.time() + 60))  # none
    assert not validator.validate(_record("run_heartbeat", subkey, {"admission": token}, time.time() + 60))  # not its
    assert validator.validate(_record("other-run_heartbeat", subkey, {"peer_id": peer}, time.time() + 60))
    # issue 24, item 15: a token to another run signs no heartbeat of this one
    other_run = {"peer_id": peer, "admission": make_token(owner, peer, 600, runs=["other-run"])}
    assert not validator.validate(_record("run_heartbeat", subkey, other_run, time.time() + 60))
    both = {"peer_id": peer, "admission": make_token(owner, peer, 600, runs=["other-run", "run"])}
    assert validator.validate(_record("run_heartbeat", subkey, both, time.time() + 60))
    assert validator.merge_with(AdmissionValidator(pub, "run")) and not validator.merge_with(signer)


def test_a_token_admits_only_to_the_runs_it_names(owner):
    # issue 24, item 15: one owner key closes several runs; a peer admitted to one is not admitted to the others
    pub = public_bytes(owner.public_key())
    tokens = entries(**{PEER: make_token(owner, PEER, 600, runs=["run-a"]), OTHER: make_token(owner, OTHER, 600)})
    for run, admitted in (("run-a", [OTHER, PEER]), ("run-b", [OTHER]), (None, [OTHER, PEER])):
        view = AdmissionView(pub, run)
        view.update(tokens, {})
        assert view.admitted() == sorted(admitted), run
    with pytest.raises(CredentialError, match="run ids"):  # a run list that is not a list of names
        verify(_sign(TOKEN_PREFIX, owner, {"peer_id": PEER, "issued": 1.0, "expires": 2.0, "runs": "run-a"}),
               owner.public_key())


def test_clock_records_of_outsiders_do_not_count():
    from hivemind.optim.progress_tracker import LocalTrainingProgress

    signers = [RSASignatureValidator(RSAPrivateKey()) for _ in range(3)]
    peers = [peer_id_of_owner(s.local_public_key) for s in signers]

    def progress(peer: str) -> dict:
        from hivemind.p2p import PeerID

        return LocalTrainingProgress(peer_id=PeerID.from_base58(peer).to_bytes(), epoch=1, samples_accumulated=5,
                                     samples_per_second=1.0, time=time.time(), client_mode=False).dict()

    metadata = {s.local_public_key: ValueWithExpiration(progress(p), time.time() + 60) for s, p in zip(signers, peers)}
    metadata[b"forged"] = ValueWithExpiration(progress(peers[0]), time.time() + 60)  # claims peer 0, not signed by it
    kept = admitted_progress(metadata, lambda p: p != peers[2])
    assert set(kept) == {signers[0].local_public_key, signers[1].local_public_key}
    assert admitted_progress(metadata, None) is metadata  # an open swarm: everything counts


class KeyedDHT:
    """Just enough of hivemind.DHT for SwarmAdmission: dictionary values per key, immediate futures."""

    def __init__(self) -> None:
        self.data: dict = {}

    @staticmethod
    def _done(value):
        import concurrent.futures

        future = concurrent.futures.Future()
        future.set_result(value)
        return future

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        self.data.setdefault(key, {})[subkey] = ValueWithExpiration(value, expiration_time)
        return self._done(True)

    def get(self, key, latest=False, return_future=False):
        entries = self.data.get(key)
        return self._done(ValueWithExpiration(dict(entries), time.time() + 60) if entries else None)


def test_swarm_admission_publishes_reads_and_stops_a_revoked_peer(owner):
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.admission import SwarmAdmission

    dht, pub = KeyedDHT(), public_bytes(owner.public_key())
    fp = AdmissionView(pub).fingerprint
    with pytest.raises(FederationError, match="not valid for its peer id"):
        SwarmAdmission(dht, pub, make_token(owner, OTHER, 600), PEER, 1.0, 90.0)
    me = SwarmAdmission(dht, pub, make_token(owner, PEER, 600, now=time.time() - 5), PEER, 1.0, 90.0)
    dht.store(admitted_key(fp), make_token(owner, OTHER, 600), time.time() + 60, subkey=OTHER)
    view = me.refresh()
    assert PEER in dht.data[admitted_key(fp)] and dht.data[admitted_key(fp)][PEER].expiration_time <= me.grant.until
    assert view.admitted() == sorted([PEER, OTHER])
    me.check_self()  # admitted: nothing to say
    dht.store(revoked_key(fp), make_revocation(owner, PEER, 600), time.time() + 600, subkey=PEER)
    me.refresh()
    assert not me.allows(PEER) and me.allows(OTHER)
    del dht.data[revoked_key(fp)][PEER]  # the node that held the revocation leaves: peers keep it and store it again
    me._republished = -math.inf  # (once a minute)
    me.refresh()
    assert PEER in dht.data[revoked_key(fp)] and not me.allows(PEER)
    with pytest.raises(FederationError, match="revoked this peer's admission"):
        me.check_self()
    expired = SwarmAdmission(KeyedDHT(), pub, make_token(owner, PEER, 600), PEER, 1.0, 90.0)
    object.__setattr__(expired, "grant", verify(make_token(owner, PEER, 1, now=time.time() - 10), owner.public_key()))
    with pytest.raises(FederationError, match="has expired"):
        expired.check_self()


def test_key_files_must_be_private_and_a_missing_identity_is_created_private(tmp_path):
    # issue 24, item 14: hivemind wrote a missing identity under the umask (often 0644), and a pre-planted or
    # world-readable key was used silently
    import os
    import stat

    from photon_p2p.federation import FederationError
    from photon_p2p.federation.network import use_identity

    path = tmp_path / "sub" / "id.key"
    assert use_identity(str(path)) == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    use_identity(str(path))  # reused as it is
    os.chmod(path, 0o644)
    with pytest.raises(FederationError, match=r"accessible to other users \(mode 644\); run: chmod 600"):
        use_identity(str(path))
    create_owner_key(tmp_path / "owner.key")
    os.chmod(tmp_path / "owner.key", 0o640)
    with pytest.raises(CredentialError, match="swarm owner key .* accessible to other users"):
        load_owner_private(tmp_path / "owner.key")
