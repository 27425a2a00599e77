"""Swarm credentials: the owner's Ed25519 key, admission tokens bound to a libp2p peer id, revocations.

Pure crypto and files (no hivemind), so that config validation can check a token before anything starts.
Text formats (one line each, safe to paste into a chat or a DHT value):

    photon-admit-v1.<base64url JSON {peer_id, issued, expires, owner[, runs]}>.<base64url Ed25519 signature>
    photon-revoke-v1.<base64url JSON {peer_id, issued, until, owner}>.<base64url Ed25519 signature>

The signature covers the prefix and the payload, so a token cannot be replayed as a revocation or vice versa.
A token names the run ids it admits to (``runs``; absent: every run the owner key closes, `admit --any-run`).
A revocation cancels every token of that peer id *issued* before it; the owner can admit the peer again later
with a new token. Ed25519 rather than RSA: 64-byte signatures keep tokens short enough to ride in every
heartbeat record, and verifying one costs microseconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from photon_p2p.paths import output_file

TOKEN_PREFIX, REVOKE_PREFIX = "photon-admit-v1", "photon-revoke-v1"
MAX_TEXT = 1024  # a token is ~300 characters; anything longer is not one of ours
_DURATION = re.compile(r"([-+]?\d+(?:\.\d+)?)([smhdw]?)")  # a sign, so that -5d is named as negative
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CredentialError(ValueError):
    """A key, token or revocation that cannot be used; the message is one line and names the file or field."""


@dataclass(frozen=True)
class Grant:
    """A verified token (kind "admit") or revocation (kind "revoke"); ``until`` is its expiry."""

    kind: str
    peer_id: str
    issued: float
    until: float
    owner: str  # the owner key's fingerprint
    text: str
    runs: tuple[str, ...] = ()  # a token: the run ids it admits to; () = every run of this owner (--any-run)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.until

    def admits_run(self, run_id: str | None) -> bool:
        """Whether this token admits its peer to ``run_id`` (None: no run to check, as `photon-peer status`)."""
        return not self.runs or run_id is None or run_id in self.runs


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '7d', '2w' or plain seconds -> seconds (> 0)."""
    match = _DURATION.fullmatch(str(text).strip())
    if not match:
        raise CredentialError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 7d or 2w")
    if float(match.group(1)) <= 0:
        raise CredentialError(f"invalid duration {text!r}: it must be more than 0, e.g. 90s, 15m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


# ---- keys ------------------------------------------------------------------------------------------------

def fingerprint(public: Ed25519PublicKey) -> str:
    """16 hex digits of sha256 over the raw public key: how logs, banners and status name a swarm owner."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_bytes(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def create_owner_key(path: str | Path) -> tuple[Path, Path, str]:
    """Write a new owner key to ``path`` (private, mode 0600) and ``path.pub``; refuses to overwrite either."""
    priv_path = Path(path).expanduser()
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        output_file(p, "swarm owner key", hint=" (a swarm owner key is never replaced)", error=CredentialError)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(pub_path, "xb") as f:  # "x": a file that appeared meanwhile is not overwritten either
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, fingerprint(key.public_key())


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CredentialError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise CredentialError(f"{what} {p} cannot be read: {e.strerror}") from None


def check_private(path: str | Path, what: str) -> None:
    """Refuse a secret key file that another user owns (one planted in a shared directory would be used silently)
    or that others may read or write (as ssh does): a one-line error that says how to fix it."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        raise CredentialError(f"{what} {p} cannot be read: {e.strerror}") from None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CredentialError(f"{what} {p} belongs to another user (uid {st.st_uid}); refusing a key this user "
                              "did not create")
    if st.st_mode & 0o077:
        raise CredentialError(f"{what} {p} is accessible to other users (mode {st.st_mode & 0o777:o}); run: "
                              f"chmod 600 {p}")


def load_owner_private(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path, "swarm owner key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CredentialError(f"swarm owner key {path} is not a private key (photon-peer swarm-key writes one)") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(f"swarm owner key {path} is not an Ed25519 key (photon-peer swarm-key writes one)")
    check_private(path, "swarm owner key")
    return key


def load_owner_public(path: str | Path) -> Ed25519PublicKey:
    """The owner's public key from its .pub file (or from the private key file itself, on the owner's machine)."""
    data = _read(path, "swarm owner key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise CredentialError(f"swarm owner key {path} is not a PEM public key (use the .pub file that "
                                  "photon-peer swarm-key wrote)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CredentialError(f"swarm owner key {path} is not an Ed25519 key (photon-peer swarm-key writes one)")
    return key


# ---- tokens and revocations ------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(prefix: str, key: Ed25519PrivateKey, payload: dict) -> str:
    body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    signature = key.sign(f"{prefix}.{body}".encode())
    return f"{prefix}.{body}.{_b64(signature)}"


def make_token(key: Ed25519PrivateKey, peer_id: str, valid_for: float, now: float | None = None,
               runs: Sequence[str] = ()) -> str:
    """An admission token for ``peer_id`` (a libp2p peer id) to the runs ``runs`` (empty: every run this owner
    key closes), valid for ``valid_for`` seconds from ``now``."""
    now = time.time() if now is None else now
    check_peer_id(peer_id)
    payload = {"peer_id": peer_id, "issued": round(now, 3), "expires": round(now + valid_for, 3),
               "owner": fingerprint(key.public_key())}
    if runs:
        payload["runs"] = sorted({str(r) for r in runs})
    return _sign(TOKEN_PREFIX, key, payload)


def make_revocation(key: Ed25519PrivateKey, peer_id: str, valid_for: float, now: float | None = None) -> str:
    """Cancels every token of ``peer_id`` issued up to ``now``; peers keep honouring it for ``valid_for`` s."""
    now = time.time() if now is None else now
    check_peer_id(peer_id)
    return _sign(REVOKE_PREFIX, key, {"peer_id": peer_id, "issued": round(now, 3), "until": round(now + valid_for, 3),
                                      "owner": fingerprint(key.public_key())})


def check_peer_id(peer_id: str) -> None:
    # base58btc multihashes ("Qm...", "12D3KooW..."); a cheap shape check so that a typo fails at admit time
    if not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{20,128}", str(peer_id)):
        raise CredentialError(f"{peer_id!r} is not a libp2p peer id (photon-peer peer-id --identity FILE prints one)")


def verify(text: object, public: Ed25519PublicKey, kind: str = "admit") -> Grant:
    """Check a token (kind "admit") or revocation (kind "revoke") against the owner key; expiry is NOT checked."""
    prefix = TOKEN_PREFIX if kind == "admit" else REVOKE_PREFIX
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise CredentialError(f"not a {kind} record")
    text = text.strip()
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != prefix:
        raise CredentialError(f"not a photon_p2p {'admission token' if kind == 'admit' else 'revocation'} "
                              f"(it should start with '{prefix}.')")
    try:
        signature, payload = _unb64(parts[2]), json.loads(_unb64(parts[1]))
    except ValueError:
        raise CredentialError("the token is damaged (not valid base64/JSON)") from None
    try:
        public.verify(signature, f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature:
        owner = payload.get("owner") if isinstance(payload, dict) else None
        raise CredentialError(f"signature does not verify with owner key {fingerprint(public)}"
                              + (f" (it was signed by owner key {owner})" if isinstance(owner, str) else "")) from None
    until = payload.get("expires" if kind == "admit" else "until")
    runs = payload.get("runs", [])
    if not (isinstance(payload.get("peer_id"), str) and isinstance(payload.get("issued"), (int, float))
            and isinstance(until, (int, float))):
        raise CredentialError("the token's payload is incomplete")
    if not (isinstance(runs, list) and all(isinstance(r, str) and r for r in runs)):
        raise CredentialError("the token's run ids are not a list of names")
    return Grant(kind, payload["peer_id"], float(payload["issued"]), float(until), fingerprint(public), text,
                 tuple(runs))


def claimed_owner(text: object) -> str:
    """The owner fingerprint a token *claims* (unverified; for status without the owner key), or ""."""
    try:
        owner = json.loads(_unb64(str(text).split(".")[1])).get("owner", "")
        return owner if isinstance(owner, str) else ""
    except (ValueError, IndexError, AttributeError):
        return ""


def revokes(revocation: Grant, token: Grant) -> bool:
    """Whether ``revocation`` cancels ``token``: same peer, token issued no later than the revocation."""
    return revocation.peer_id == token.peer_id and token.issued <= revocation.issued


def check_token(token_path: str | Path, public: Ed25519PublicKey, peer_id: str, now: float | None = None,
                run_id: str | None = None) -> Grant:
    """This peer's own token, as config validation checks it: readable, signed by the owner, ours, for ``run_id``,
    unexpired."""
    try:
        grant = verify(_read(token_path, "admission token").decode(errors="replace"), public)
    except CredentialError as e:
        msg = str(e)
        raise CredentialError(msg if msg.startswith("admission token") else f"admission token {token_path}: {msg}") \
            from None
    if grant.peer_id != peer_id:
        raise CredentialError(f"admission token {token_path} is for peer {grant.peer_id}, but this peer's identity "
                              f"is {peer_id}: ask the owner for a token for {peer_id}")
    if not grant.admits_run(run_id):
        raise CredentialError(f"admission token {token_path} admits run(s) {', '.join(grant.runs)}, not '{run_id}': "
                              f"ask the owner for one with `photon-peer admit --run-id {run_id}`")
    if grant.expired(now):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(grant.until))
        raise CredentialError(f"admission token {token_path} expired at {when}: ask the swarm owner for a new one")
    return grant


# ---- libp2p identities -------------------------------------------------------------------------------------

def peer_id_of_identity(path: str | Path) -> str:
    """The libp2p peer id of an identity file (as p2pd derives it), without starting anything."""
    import base58
    import multihash
    from hivemind.proto import crypto_pb2  # the identity file is hivemind's protobuf; light next to hivemind.p2p

    data = _read(path, "identity file")
    try:
        proto = crypto_pb2.PrivateKey.FromString(data)
        private = serialization.load_der_private_key(proto.data, password=None)
    except Exception:  # DecodeError, ValueError, UnsupportedAlgorithm: not a key p2pd could use either
        raise CredentialError(f"identity file {path} is not a libp2p private key") from None
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=proto.key_type, data=der).SerializeToString()
    # libp2p: keys of up to 42 bytes are inlined (identity multihash); RSA keys are hashed with sha256
    digest = multihash.encode(encoded, "identity") if len(encoded) <= 42 else \
        multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256")
    return base58.b58encode(digest).decode()


def create_identity(path: str | Path) -> str:
    """Write a new RSA libp2p identity (the kind hivemind writes) to a path that does not exist; its peer id."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.proto import crypto_pb2

    p = Path(path).expanduser()
    if p.exists():
        raise CredentialError(f"identity file {p} already exists")
    if not p.parent.is_dir():
        raise CredentialError(f"directory {p.parent} does not exist")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString())
    return peer_id_of_identity(p)
