"""`photon-peer status`: a read-only view of a swarm's heartbeat records, as a table or one JSON document."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Optional, TextIO

from photon_p2p.config import NetworkConfig
from photon_p2p.status_view import admission_line, render_table  # noqa: F401 (re-exported)

_ORDER = {"live": 0, "stale": 1, "left": 2}
_CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen: --watch redraws in place on a terminal


def _median(values: list[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _consistency(live: list[dict], newest: int) -> dict[str, Any]:
    """Whether the live peers hold one model: ``models``, ``split``, ``model_groups``, ``behind_peers``.

    Only peers at the newest round are compared: a peer behind it holds an older model by construction and
    catches up from the swarm, so it is counted as behind, not as a split. An empty fingerprint (a peer that has
    not computed one yet) is listed in ``model_groups`` but is not counted as a model of its own.
    """
    groups: dict[tuple[int, str], list[str]] = {}
    for r in live:
        groups.setdefault((r["round"], r["fingerprint"]), []).append(r["peer_id"])
    # Newest round first, then the biggest group (the swarm's majority model); ties by fingerprint, stable output.
    ordered = sorted(groups.items(), key=lambda g: (-g[0][0], -len(g[1]), g[0][1]))
    models = sum(1 for (rnd, fp) in groups if rnd == newest and fp)
    return {
        "models": models,
        "split": models > 1,
        "model_groups": [{"fingerprint": fp, "round": rnd, "peers": sorted(peers)} for (rnd, fp), peers in ordered],
        "behind_peers": sum(r["round"] < newest for r in live),
    }


def _most(values: list) -> Any:
    """The most common value (ties to the largest), or None."""
    values = [v for v in values if v]
    return max(set(values), key=lambda v: (values.count(v), v)) if values else None


def _last_round(live: list[dict]) -> dict[str, Any]:
    """What the live peers' heartbeats say of their last rounds: the group most of them averaged in (``group``),
    the roster size they waited for (``waited``), the leader they named, and who ``missed`` it: a live peer whose
    last round was a group of one while its roster waited for others (or, from a peer older than rosters, while
    others were live). A peer yet to finish a round (group 0) missed nothing."""
    missed = sorted(r["peer_id"] for r in live if r["group_size"] == 1
                    and (r.get("waited", 0) > 1 or (not r.get("waited") and len(live) > 1)))
    return {"group": _most([r["group_size"] for r in live if r["group_size"] > 1]) or 0,
            "waited": _most([r.get("waited", 0) for r in live]) or 0,
            "leader": _most([r.get("leader", "") for r in live]) or "", "missed": missed}


CLIP_FLAG_ROUNDS = 3  # a peer clipped in this many of a reporter's last rounds gets a warning line


def _clipping(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per sender: what the *other* peers' heartbeats say their reducers did to it (robust aggregation).

    ``rounds``: the most rounds (of a reporter's window) in which one reporter clipped or dropped it; ``factor``:
    the smallest share of its contribution any reporter kept; ``reporters``: who reported it. A reporter is one
    reducer of one part: several independent reporters are stronger evidence than one (which may itself lie)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "live":
            continue
        for peer, c in (r.get("clipped") or {}).items():
            if peer == r["peer_id"]:
                continue
            s = seen.setdefault(peer, {"rounds": 0, "factor": 1.0, "reporters": []})
            s["rounds"] = max(s["rounds"], int(c["rounds"]))
            s["factor"] = min(s["factor"], float(c["factor"]))
            s["reporters"].append(r["peer_id"])
    for s in seen.values():
        s["reporters"].sort()
    return seen
def _admission(rows: list[dict], dht: Any, owner_public: Optional[bytes], timeout: float,
               run_id: Optional[str] = None) -> tuple[list, dict]:
    """Closed swarm (``owner_public``): only rows of peers admitted to ``run_id``, and what status says about
    admission."""
    from photon_p2p.credentials import claimed_owner

    if owner_public is None:
        claimed = sorted({claimed_owner(r.get("admission", "")) for r in rows} - {""})
        return rows, {"closed": False, "claimed_owners": claimed}
    from photon_p2p.federation.admission import read_view

    view = read_view(dht, owner_public, timeout, run_id)
    for r in rows:  # a record carries its peer's token: a peer whose token store was slow still counts
        view.add_token(r.get("admission", ""))
    kept = [r for r in rows if r["verified"] and view.allows(r["peer_id"])]
    return kept, {"closed": True, "owner": view.fingerprint, "admitted": len(view.admitted()),
                  "hidden": len(rows) - len(kept), "revoked": sorted(view.revocations)}



def collect_status(dht: Any, run_id: str, timeout: float, stale_after: Optional[float] = None,
                   reached: str = "", owner_public: Optional[bytes] = None) -> dict:
    """Swarm summary and one row per peer (live first, then by round) from the DHT records of ``run_id``.

    A peer is stale when its last heartbeat is older than ``stale_after`` seconds; by default 2.5 of its own
    heartbeat intervals (one missed beat and a slow store are not yet a failure). The summary also says whether
    the live peers at the newest round hold one model (``models``, ``split``, ``model_groups``; see _consistency).
    """
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.records import is_live, read_records, read_run_ids

    try:
        rows = read_records(dht, run_id, timeout)
    except concurrent.futures.TimeoutError:
        raise FederationError(f"the swarm did not answer a DHT lookup within {timeout:g}s") from None
    try:
        rows, admission = _admission(rows, dht, owner_public, timeout, run_id)
    except concurrent.futures.TimeoutError:
        raise FederationError(f"the swarm did not answer a DHT lookup within {timeout:g}s") from None
    for r in rows:
        r["status"] = "left" if r["state"] == "left" else "live" if is_live(r, stale_after) else "stale"
    live = [r for r in rows if r["status"] == "live"]
    newest = max((r["round"] for r in live or rows), default=0)
    for r in rows:
        r["lag"] = max(0, newest - r["round"])
    rows.sort(key=lambda r: (_ORDER[r["status"]], -r["round"], r["peer_id"]))
    clipping = _clipping(rows)
    for r in rows:
        r["clipped_by_others"] = clipping.get(r["peer_id"])
    summary = {
        "live_peers": len(live),
        "stale_peers": sum(r["status"] == "stale" for r in rows),
        "left_peers": sum(r["status"] == "left" for r in rows),
        "global_round": newest,
        "total_tokens": sum(r["tokens"] for r in rows),
        "tokens_per_s": sum(r["tokens_per_s"] for r in live),
        "median_loss": _median([r["loss"] for r in live]),
        "median_val_ppl": _median([r["val_ppl"] for r in live]),
        "median_participation": _median([r["participation"] for r in live]),
        "median_utilization": _median([r.get("utilization") for r in live]),
        **_consistency(live, newest),
        "clipped_peers": sorted(p for p, c in clipping.items() if c["rounds"] >= CLIP_FLAG_ROUNDS),
        "last_round": _last_round(live),
    }
    status = {"run_id": run_id, "time": time.time(), "reached": reached, "summary": summary, "peers": rows,
              "admission": admission}
    if not rows:
        where = f" (the node at {reached} is reachable)" if reached else ""
        status["message"] = f"no peers have published heartbeats for run '{run_id}'{where}"
        others = [r for r in read_run_ids(dht, timeout) if r != run_id]
        status["runs_seen"] = others
        if others:
            status["message"] += "; runs seen in this swarm: " + ", ".join(others[:10])
    elif not live:
        status["message"] = f"no live peers in run '{run_id}': every record is stale or from a peer that left"
    return status



def run_status(net: NetworkConfig, run_id: str, *, as_json: bool = False, watch: float = 0.0,
               stale_after: Optional[float] = None, out: Optional[TextIO] = None,
               owner_public: Optional[bytes] = None, wide: bool = False) -> int:
    """Join the DHT as a client (never part of the swarm), print the status (every ``watch`` s), leave."""
    from photon_p2p.federation import FederationError
    from photon_p2p.federation.network import parse_multiaddrs, start_dht, stop_dht
    from photon_p2p.federation.records import install_validators

    out = out or sys.stdout
    initial = parse_multiaddrs(net.initial_peers, "--initial-peers")
    if not initial:
        raise FederationError("status needs --initial-peers MADDR: the address any peer or bootstrap node prints")
    if not 0 <= watch < float("inf"):  # nan fails this too
        raise FederationError(f"--watch must be a finite number of seconds >= 0, got {watch:g}")
    # A reader listens on loopback only and never reuses a peer's identity (p2pd would refuse a taken one).
    reader = dataclasses.replace(net, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                 announce_maddrs=[], identity_path="", client_mode=True, use_auto_relay=False)
    dht = start_dht(reader, initial_peers=initial, client_mode=True)
    try:
        install_validators(dht, run_id)
        while True:
            try:
                status = collect_status(dht, run_id, net.request_timeout, stale_after, reached=", ".join(initial),
                                        owner_public=owner_public)
                text = json.dumps(status, indent=None if watch else 2) if as_json else render_table(status, wide)
            except FederationError as e:
                if not watch:
                    raise
                text = f"photon-peer: error: {e} (retrying in {watch:g}s)"
            if watch and not as_json:
                # A terminal redraws in place; a pipe or log file gets one block per refresh.
                text = (_CLEAR + text + f"\n\nrefreshing every {watch:g}s; Ctrl-C to quit") if out.isatty() \
                    else f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}\n"
            print(text, file=out, flush=True)
            if not watch:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        if not watch:
            raise
        return 0  # Ctrl-C is how --watch ends
    finally:
        stop_dht(dht)
