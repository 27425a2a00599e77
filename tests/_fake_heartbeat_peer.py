"""Test helper: a fake peer (or forger) that publishes heartbeats without training, plus process helpers.

As a script: ``python _fake_heartbeat_peer.py CONFIG_JSON``; it writes READY_FILE (JSON: peer_id, maddrs,
owner_key) once its first heartbeat is stored, then sleeps until killed. ``"forge": VICTIM_OWNER_KEY`` makes it
try to overwrite that peer's record instead, print a JSON verdict and exit.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time
from deadlines import within

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def spawn(args: list[str], procs: list[subprocess.Popen], **kwargs) -> subprocess.Popen:
    """A fresh interpreter in its own session, so that killing its process group also kills its DHT and p2pd."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, start_new_session=True, text=True,
                            **kwargs)
    procs.append(proc)
    return proc


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(procs: list[subprocess.Popen]) -> None:
    """Kill every process group we started (children first die with them) and collect the exit statuses."""
    for proc in procs:
        kill_group(proc)
    for proc in procs:
        try:
            proc.wait(timeout=within(10))
        except subprocess.TimeoutExpired:
            pass


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"helper exited with {proc.returncode} before writing {path.name}")
        time.sleep(0.1)
    raise TimeoutError(f"helper did not write {path.name} within {timeout}s")


def group_alive(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


class SignAnything(RSASignatureValidator):
    """An attacker's validator: appends its own signature to every record, whoever owns the subkey."""

    def sign_value(self, record):
        signature = self._private_key.sign(self._serialize_record(record))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)


class FakeDHT:
    """Just enough of hivemind.DHT for the publisher and reader, with controllable stores and lookups."""

    def __init__(self) -> None:
        self.stored: list[tuple] = []
        self.entries: dict = {}
        self.hang = False
        self.peer_id = PeerID.from_base58("QmTest")
        self.kwargs: dict = {}

    def _future(self, value: object) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.hang:
            future.set_result(value)
        return future

    def store(self, key, value, expiration_time, subkey=None, return_future=False):
        self.stored.append((key, subkey, value, expiration_time))
        return self._future(True)

    def get(self, key, latest=False, return_future=False):
        return self._future(ValueWithExpiration(self.entries, get_dht_time() + 60) if self.entries else None)

    def get_visible_maddrs(self, latest=False):
        return ["/ip4/127.0.0.1/tcp/1/p2p/QmTest"]


RUN = "status-test"
# What `photon-peer bootstrap` does, minus argparse: SIGINT/SIGTERM set the stop event.
BOOTSTRAP = """
import signal, sys, threading
from photon_p2p.bootstrap import run_bootstrap
from photon_p2p.config import NetworkConfig
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
signal.signal(signal.SIGINT, lambda *a: stop.set())
sys.exit(run_bootstrap(NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), stop))
"""


def fingerprint(name: object) -> str:
    """A model fingerprint as the daemon publishes it (hex sha256), made up from ``name``."""
    return hashlib.sha256(str(name).encode()).hexdigest()


def values(i: int) -> dict:
    # Peer i is at round 10 + i, so each holds its own model; participation 100%, 75%, 50%, 25%, 100%, ...
    return {"round": 10 + i, "local_step": 100 * (10 + i), "tokens": 1000 * (i + 1), "loss": 3.0 + i,
            "val_ppl": 20.0 + i, "tokens_per_s": 100.0 * (i + 1), "compression": "fp16", "group_size": 3,
            "averaging_s": 0.5, "bytes_sent": 10 * i, "bytes_received": 20 * i, "client_mode": False,
            "version": "0.1.0", "fingerprint": fingerprint(f"round {10 + i}"), "participation": 1.0 - 0.25 * (i % 4),
            "clipped": {}}


def start_bootstrap(procs: list) -> tuple[subprocess.Popen, str]:
    proc = spawn(["-c", BOOTSTRAP], procs, stdout=subprocess.PIPE)
    deadline = time.monotonic() + within(30)
    for line in proc.stdout:  # the banner prints each full address on its own line
        if line.startswith("/ip4/"):
            return proc, line.strip()
        assert time.monotonic() < deadline, "bootstrap banner did not appear"
    raise RuntimeError(f"bootstrap exited with {proc.wait()}")


def start_peer(procs: list, tmp: Path, name: str, addr: str, vals: dict, ttl: float = 4.0,
               **extra: str) -> subprocess.Popen:
    """``extra``: owner_pub and token (files) make it a closed swarm's peer."""
    cfg = {"initial_peers": [addr], "run_id": RUN, "values": vals, "interval": 1.0, "ttl": ttl,
           "ready_file": str(tmp / f"{name}.json"), "identity": str(tmp / f"{name}.key"), **extra}
    return spawn([str(Path(__file__)), json.dumps(cfg)], procs)


def _forge(dht, cfg: dict) -> dict:
    """Try to write under the victim's owner subkey: unsigned, then signed with the wrong key."""
    from photon_p2p.federation.records import heartbeat_key, make_record

    victim = cfg["forge"].encode()
    claim = dict(peer_id=cfg["victim_peer_id"], run_id=cfg["run_id"], maddrs=[], interval=1.0, started_at=0.0,
                 version="forged")
    forged = make_record({**cfg["values"], "tokens": 666, "round": 666}, time=get_dht_time(), **claim).dict()
    key, far = heartbeat_key(cfg["run_id"]), get_dht_time() + 600
    verdict = {"unsigned": dht.store(key, forged, far, subkey=victim)}
    signer = SignAnything()
    dht.add_validators([signer])
    verdict["wrong_signature"] = dht.store(key, forged, far + 1, subkey=victim)
    # Under its own key the forger may write, but only well-formed records, and it cannot prove the claim.
    verdict["malformed_own"] = dht.store(key, {**forged, "round": "666"}, far + 2, subkey=signer.local_public_key)
    verdict["claim_own"] = dht.store(key, forged, far + 3, subkey=signer.local_public_key)
    return verdict


def main(cfg: dict) -> None:
    from photon_p2p.config import NetworkConfig
    from photon_p2p.federation.network import start_dht
    from photon_p2p.federation.records import HeartbeatPublisher, install_validators

    net = NetworkConfig(initial_peers=cfg["initial_peers"], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        identity_path=cfg.get("identity", ""), bootstrap_timeout=20)
    dht = start_dht(net)
    if "forge" in cfg:
        print(json.dumps(_forge(dht, cfg)), flush=True)
        dht.shutdown()
        return
    owner_public, token, validators = None, "", []
    if cfg.get("owner_pub"):  # a closed swarm's peer: its token in every record, and published for the swarm
        from photon_p2p.credentials import load_owner_public, public_bytes
        from photon_p2p.federation.admission import SwarmAdmission, validators_for

        owner_public, token = public_bytes(load_owner_public(cfg["owner_pub"])), Path(cfg["token"]).read_text()
        SwarmAdmission(dht, owner_public, token, dht.peer_id.to_base58(), 5.0, 600.0).publish()
        validators = validators_for(owner_public, cfg["run_id"])
    owner = install_validators(dht, cfg["run_id"], extra_validators=validators)
    snap = dict(cfg["values"])
    publisher = HeartbeatPublisher(dht, cfg["run_id"], lambda: snap, cfg["interval"], cfg["ttl"],
                                   request_timeout=5.0, owner_key=owner, admission=token.strip())
    deadline = time.monotonic() + within(30)
    while not publisher.publish():  # the first store can race the DHT's first contact with the swarm
        if time.monotonic() > deadline:
            sys.exit("fake peer: could not publish a heartbeat within 30s")
        time.sleep(0.2)
    publisher.start()
    ready = {"peer_id": dht.peer_id.to_base58(), "maddrs": publisher.maddrs, "owner_key": owner.decode()}
    Path(cfg["ready_file"] + ".tmp").write_text(json.dumps(ready))
    os.replace(cfg["ready_file"] + ".tmp", cfg["ready_file"])
    while True:  # until the test kills our process group
        time.sleep(3600)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
