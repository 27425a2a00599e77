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
def _admission(rows: list[dict], dht: Any, owner_public: Optional[bytes], timeout: float) -> tuple[list, dict]:
    """Closed swarm (``owner_public``): only rows of admitted peers, and what status says about admission."""
    from photon_p2p.credentials import claimed_owner

    if owner_public is None:
        claimed = sorted({claimed_owner(r.get("admission", "")) for r in rows} - {""})
        return rows, {"closed": False, "claimed_owners": claimed}
    from photon_p2p.federation.admission import read_view

    view = read_view(dht, owner_public, timeout)
    for r in rows:  # a record carries its peer's token: a peer whose token store was slow still counts
        view.add_token(r.get("admission", ""))
    kept = [r for r in rows if r["verified"] and view.allows(r["peer_id"])]
    return kept, {"closed": True, "owner": view.fingerprint, "admitted": len(view.admitted()),
                  "hidden": len(rows) - len(kept), "revoked": sorted(view.revocations)}


def admission_line(a: dict) -> str:
    """One line on who may join: the open-swarm warning, or the owner key and how many peers it admits."""
    if a.get("closed"):
        line = f"closed swarm, owner key {a['owner']}, {a['admitted']} admitted"
        return line + (f" ({a['hidden']} record(s) of non-admitted or revoked peers hidden)" if a["hidden"] else "")
    if a.get("claimed_owners"):
        return (f"records claim a closed swarm (owner key {', '.join(a['claimed_owners'])}); pass "
                "--swarm-owner-key to verify them and hide non-admitted peers")
    return "OPEN swarm: anyone who can reach a peer can join"


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
        rows, admission = _admission(rows, dht, owner_public, timeout)
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


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0%}"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _address(row: dict) -> str:
    if row["client_mode"]:
        return "(client mode)"  # it accepts no connections: its listen address would mislead
    if not row["maddrs"]:
        return "-"
    relayed = "(relayed) " if row.get("connection") == "relayed" else ""  # reached through a circuit relay
    return relayed + row["maddrs"][0].split("/p2p/")[0]  # the peer id has its own column


def _short_id(peer_id: str) -> str:
    # Peer ids share long prefixes (Qm..., 12D3KooW...): the tail is what tells them apart.
    return peer_id if len(peer_id) <= 14 else ".." + peer_id[-12:]


def _group(r: dict) -> str:
    """'3/3': the peer's last group size over the peers its round waited for (older peers: the size alone)."""
    return f"{r['group_size']}/{r['waited']}" if r.get("waited") else str(r["group_size"])


def _short_model(fingerprint: str) -> str:
    # 8 hex digits (32 bits) tell a handful of models apart at a glance; JSON output keeps the full hash.
    return fingerprint[:8] if fingerprint else "-"


_MAX_NAMED = 5  # peers named per model in the SPLIT line; a big swarm would otherwise print a wall of ids


def _named(peers: list[str]) -> str:
    names = ", ".join(_short_id(p) for p in peers[:_MAX_NAMED])
    return names + (f", +{len(peers) - _MAX_NAMED} more" if len(peers) > _MAX_NAMED else "")


def _model_line(s: dict) -> str:
    """One line on whether the live peers at the newest round hold the same model ("" when there is nothing to say).

    Summaries without the consistency fields (an older status document) get no line.
    """
    rnd = s["global_round"]
    at_newest = [g for g in s.get("model_groups", []) if g["round"] == rnd]
    known = [g for g in at_newest if g["fingerprint"]]
    if not known:  # no live peer at the newest round, or none reports a fingerprint yet
        return ""
    unknown = sum(len(g["peers"]) for g in at_newest if not g["fingerprint"])
    no_fp = f"{unknown} report{'s' * (unknown == 1)} no fingerprint" if unknown else ""
    if s["split"]:
        models = ", ".join(f"{_short_model(g['fingerprint'])} (peers {_named(g['peers'])})" for g in known)
        return (f"SPLIT: live peers at round {rnd} hold {len(known)} different models: {models}"
                f"{'; ' + no_fp if no_fp else ''}; they re-merge when they next meet in a group")
    [group] = known
    holders = len(group["peers"])
    line = f"one model: {_short_model(group['fingerprint'])} held by "
    if unknown:
        line += f"{holders} of {holders + unknown} live peers ({no_fp})"
    else:
        line += f"all {holders} live peers" if holders > 1 else "the only live peer"
    line += f" at round {rnd}"
    behind = s.get("behind_peers", 0)
    return line + (f", {behind} behind" if behind else "")


def _silo(row: dict) -> str:
    """Ranks x device of the silo behind a peer, e.g. "2xcuda" (just "1" for peers older than these fields)."""
    n, device = row.get("world_size", 1), row.get("device", "")
    return f"{n}x{device}" if device else str(n)


def render_table(status: dict) -> str:
    """Plain-text swarm summary and peer table (what `photon-peer status` prints)."""
    s, rows = status["summary"], status["peers"]
    if not rows:
        text = status.get("message", f"no peers in run '{status['run_id']}'")
        closed = status.get("admission", {}).get("closed")  # an open swarm without peers: nothing to add
        return text + ("\n" + admission_line(status["admission"]) if closed else "")
    head = (f"run '{status['run_id']}': {s['live_peers']} live peer{'s' * (s['live_peers'] != 1)}, "
            f"global round {s['global_round']}, {_count(s['total_tokens'])} tokens, "
            f"{s['tokens_per_s']:,.0f} tokens/s, median loss {_num(s['median_loss'], '.4f')}, "
            f"median val ppl {_num(s['median_val_ppl'], '.2f')}")
    if s["stale_peers"] or s["left_peers"]:
        head += f" ({s['stale_peers']} stale, {s['left_peers']} left)"
    lines = [head]
    model_line = _model_line(s)
    if model_line:
        lines.append(model_line)
    if "admission" in status:
        lines.append(admission_line(status["admission"]))
    if status.get("message"):
        lines.append(status["message"])
    for r in rows:
        c = r.get("clipped_by_others")
        if r["peer_id"] in s.get("clipped_peers", []) and c:
            lines.append(f"CLIPPED: peer {_short_id(r['peer_id'])} was clipped or dropped by {len(c['reporters'])} "
                         f"reducer(s) in up to {c['rounds']} of their last rounds (smallest share kept "
                         f"{c['factor']:.2g}): its updates are far from the others'; check it")
    table = [("PEER", "ADDRESS", "STATE", "ROUND", "LAG", "MODEL", "PART", "CLIPPED", "GROUP", "UTIL", "TOKENS",
              "TOK/S", "LOSS", "VAL PPL", "SILO", "LAST SEEN")]
    for r in rows:
        c = r.get("clipped_by_others")
        table.append((_short_id(r["peer_id"]) + ("" if r["verified"] else "?"), _address(r), r["status"],
                      str(r["round"]), str(r["lag"]), _short_model(r["fingerprint"]), f"{r['participation']:.0%}",
                      f"{c['rounds']}x{len(c['reporters'])}" if c else "-", _group(r), _pct(r.get("utilization")),
                      _count(r["tokens"]), f"{r['tokens_per_s']:,.0f}", _num(r["loss"], ".4f"),
                      _num(r["val_ppl"], ".2f"), _silo(r), _ago(r["last_seen"]) + " ago"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if not all(r["verified"] for r in rows):
        lines.append("? = peer id not proven by the record's signing key (the peer runs without --identity)")
    return "\n".join(lines)


def run_status(net: NetworkConfig, run_id: str, *, as_json: bool = False, watch: float = 0.0,
               stale_after: Optional[float] = None, out: Optional[TextIO] = None,
               owner_public: Optional[bytes] = None) -> int:
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
                text = json.dumps(status, indent=None if watch else 2) if as_json else render_table(status)
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
