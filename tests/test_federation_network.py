"""Joining the swarm: bootstrap failures end in a FederationError on time, and a killed peer leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from peer_helpers import spawn  # noqa: F401  (fixture)
from deadlines import within


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_fails_within_bootstrap_timeout(spawn):
    peer = spawn({"mode": "bootstrap", "bootstrap_timeout": 3.0})
    done = peer.expect("done", within(40))
    assert done["error"] is not None and done["error"].startswith("could not reach any initial peer (/ip4/127.0.0.1/")
    assert "within 3s" in done["error"]
    assert done["elapsed"] < 3.0 + 5.0
    assert done["children"] == []  # no DHT process, no p2pd left running


@pytest.mark.timeout(90)
def test_sigkill_of_main_process_takes_dht_p2pd_and_averager_down(spawn):
    peer = spawn({"shapes": [[10]]})
    peer.expect("ready", within(60))
    descendants = psutil.Process(peer.pid).children(recursive=True)
    names = sorted(p.name() for p in descendants)
    assert "p2pd" in names and names.count("python") >= 2  # DHT process, averager process (+ the reaper)
    os.kill(peer.pid, signal.SIGKILL)  # only the main process, not its group
    deadline = time.monotonic() + within(10)
    while time.monotonic() < deadline and any(_alive(p) for p in descendants):
        time.sleep(0.1)
    assert [f"{p.pid}:{p.name()}" for p in descendants if _alive(p)] == []


def test_stopping_closes_the_loop_hivemind_left_open():
    """hivemind's MPFuture makes the main thread's event loop and nobody closed it: collected at exit after its
    self-pipe socket, it printed an 'Exception ignored' traceback under the CLI's one-line errors."""
    import subprocess
    import sys

    script = (
        "from hivemind.utils.mpfuture import MPFuture\n"
        "from photon_p2p.federation.network import close_idle_loop\n"
        "f = MPFuture(); loop = f._loop\n"
        "assert loop is not None and not loop.is_closed()\n"
        "close_idle_loop()\n"
        "assert loop.is_closed()\n"
        "f.set_result(7); assert f.result() == 7  # a future resolved afterwards skips the closed loop\n"
        "close_idle_loop()  # idempotent\n"
        "import threading; t = threading.Thread(target=close_idle_loop); t.start(); t.join()  # no loop there\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=within(60))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
