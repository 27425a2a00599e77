"""Closed-swarm commands as a user runs them: swarm-key, peer-id, admit; and `run` refusing bad credentials (rc 2)."""

from __future__ import annotations

import hashlib
import time

import pytest

from photon_p2p.credentials import create_identity, create_owner_key, load_owner_private, make_token, verify
from test_cli_errors import assert_one_line_error, run_cli


ADMIT = ("admit", "--run-id", "photon")  # tokens name their run (the default run id here)


def test_swarm_key_peer_id_and_admit(tmp_path):
    r = run_cli("swarm-key", "-o", str(tmp_path / "owner.key"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "owner.key").stat().st_mode & 0o777 == 0o600 and (tmp_path / "owner.key.pub").is_file()
    assert_one_line_error(run_cli("swarm-key", "-o", str(tmp_path / "owner.key")), "refusing to overwrite")

    r = run_cli("peer-id", "--identity", str(tmp_path / "a.id"))  # created on first use
    assert r.returncode == 0 and "created identity" in r.stderr, r.stderr
    peer_id = r.stdout.strip()
    again = run_cli("peer-id", "--identity", str(tmp_path / "a.id"))
    assert again.returncode == 0 and again.stdout.strip() == peer_id and not again.stderr.strip()

    r = run_cli(*ADMIT, "--peer-id", peer_id, "--expires", "7d", "--key", str(tmp_path / "owner.key"),
                "-o", str(tmp_path / "a.token"))
    assert r.returncode == 0 and peer_id in r.stdout, r.stderr
    grant = verify((tmp_path / "a.token").read_text(), load_owner_private(tmp_path / "owner.key").public_key())
    assert grant.peer_id == peer_id and grant.until - grant.issued == pytest.approx(7 * 86400)
    assert grant.runs == ("photon",) and grant.admits_run("photon") and not grant.admits_run("other-run")
    # issue 24, item 15: a token names its run(s), or says --any-run; never silently every run of the key
    assert_one_line_error(run_cli("admit", "--peer-id", peer_id, "--key", str(tmp_path / "owner.key"),
                                  "-o", str(tmp_path / "x")), "--run-id RUN", "--any-run")
    assert_one_line_error(run_cli("admit", "--peer-id", peer_id, "--run-id", "a.b", "--key",
                                  str(tmp_path / "owner.key"), "-o", str(tmp_path / "x")), "--run-id (config key")
    r = run_cli("admit", "--peer-id", peer_id, "--any-run", "--key", str(tmp_path / "owner.key"),
                "-o", str(tmp_path / "any.token"))
    assert r.returncode == 0 and "every run" in r.stdout, r.stderr
    assert verify((tmp_path / "any.token").read_text(),
                  load_owner_private(tmp_path / "owner.key").public_key()).admits_run("other-run")

    assert_one_line_error(run_cli(*ADMIT, "--peer-id", "not-a-peer-id!", "--key", str(tmp_path / "owner.key"),
                                  "-o", str(tmp_path / "x")), "is not a libp2p peer id")
    assert_one_line_error(run_cli(*ADMIT, "--peer-id", peer_id, "--expires", "7 parsecs",
                                  "--key", str(tmp_path / "owner.key"), "-o", str(tmp_path / "x")), "invalid duration")
    assert_one_line_error(run_cli(*ADMIT, "--peer-id", peer_id, "--key", str(tmp_path / "owner.key.pub"),
                                  "-o", str(tmp_path / "x")), "is not a private key")
    assert not (tmp_path / "x").exists()
    # -o onto a file that exists (the owner key, an identity, an old token) loses nothing without --force
    for victim in ("owner.key", "a.id", "a.token"):
        before = hashlib.sha256((tmp_path / victim).read_bytes()).hexdigest()
        assert_one_line_error(run_cli(*ADMIT, "--peer-id", peer_id, "--key", str(tmp_path / "owner.key"),
                                      "-o", str(tmp_path / victim)), "refusing to overwrite")
        assert hashlib.sha256((tmp_path / victim).read_bytes()).hexdigest() == before, victim
    assert_one_line_error(run_cli(*ADMIT, "--peer-id", peer_id, "--key", str(tmp_path / "owner.key"),
                                  "-o", str(tmp_path)), "is a directory")
    r = run_cli(*ADMIT, "--peer-id", peer_id, "--expires", "1d", "--key", str(tmp_path / "owner.key"),
                "-o", str(tmp_path / "a.token"), "--force")  # renewing a token in place is asked for
    assert r.returncode == 0, r.stderr
    grant = verify((tmp_path / "a.token").read_text(), load_owner_private(tmp_path / "owner.key").public_key())
    assert grant.until - grant.issued == pytest.approx(86400)
    assert_one_line_error(run_cli("peer-id", "--identity", str(tmp_path / "owner.key")), "is not a private key")


@pytest.fixture
def closed(tmp_path):
    """An owner key, an identity and a valid token for it; a bad variant of each."""
    create_owner_key(tmp_path / "owner.key")
    owner = load_owner_private(tmp_path / "owner.key")
    peer_id = create_identity(tmp_path / "a.id")
    other_id = create_identity(tmp_path / "b.id")
    (tmp_path / "a.token").write_text(make_token(owner, peer_id, 3600))
    (tmp_path / "old.token").write_text(make_token(owner, peer_id, 60, now=time.time() - 3600))
    (tmp_path / "b.token").write_text(make_token(owner, other_id, 3600))
    (tmp_path / "other-run.token").write_text(make_token(owner, peer_id, 3600, runs=["other-run"]))
    return tmp_path, peer_id, other_id


def test_run_refuses_bad_credentials_before_starting(closed):
    d, peer_id, other_id = closed
    key, ident, run = str(d / "owner.key.pub"), str(d / "a.id"), str(d / "run")
    cases = [
        (["--swarm-owner-key", str(d / "nope.pub"), "--identity", ident, "--token", str(d / "a.token")],
         ["swarm owner key", "does not exist"]),
        (["--swarm-owner-key", str(d / "a.token"), "--identity", ident, "--token", str(d / "a.token")],
         ["not a PEM public key"]),
        (["--swarm-owner-key", key, "--token", str(d / "a.token")], ["needs network.identity_path / --identity"]),
        (["--swarm-owner-key", key, "--identity", str(d / "new.id"), "--token", str(d / "a.token")],
         ["does not exist", "photon-peer peer-id --identity"]),
        (["--swarm-owner-key", key, "--identity", ident], ["--token", f"admit --peer-id {peer_id} --run-id photon"]),
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "missing.token")],
         ["admission token", "does not exist"]),
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "old.token")], ["expired at"]),
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "b.token")],
         [f"is for peer {other_id}", f"identity is {peer_id}"]),
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "other-run.token")],
         ["admits run(s) other-run, not 'photon'", "admit --run-id photon"]),
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "owner.key.pub")],
         ["should start with 'photon-admit-v1.'"]),
        (["--identity", ident, "--token", str(d / "a.token")], ["swarm_owner_key (--swarm-owner-key) is not"]),
        # issue 24, item 6: gloo's rendezvous and traffic are unauthenticated, so a closed swarm refuses it
        (["--swarm-owner-key", key, "--identity", ident, "--token", str(d / "a.token"),
          "--set", "federation.transport=gloo", "--set", "federation.compression=none"],
         ["transport 'gloo' is not allowed in a closed swarm"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run_cli("run", "--run-dir", run, *args), *needles)
        assert not (d / "run").exists()  # rejected before anything was prepared or started


def test_revoke_needs_a_reachable_swarm_and_a_private_key(closed):
    d, peer_id, _ = closed
    assert_one_line_error(run_cli("revoke", "--peer-id", peer_id, "--key", str(d / "owner.key.pub"),
                                  "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/" + peer_id), "is not a private key")
    assert_one_line_error(run_cli("revoke", "--peer-id", peer_id, "--key", str(d / "owner.key"),
                                  "--initial-peers", "/ip4/127.0.0.1/tcp/1"), "/p2p/<peer id>")
