"""How `photon-peer status` prints a swarm: the summary first, then a table that fits 80 columns (or all of it)."""

from __future__ import annotations

import textwrap
from typing import Optional

WIDTH = 80  # the summary wraps here, and the default table fits it at 32 peers and more


def printable(text: str, lines: bool = True) -> str:
    """``text`` with control characters escaped: run ids, addresses, states and devices come from other peers'
    records, and an escape sequence in one would drive the reader's terminal (``lines``: keep line breaks; a
    table cell keeps none, or a record could print rows of its own)."""
    return "".join(c if c.isprintable() or (lines and c == "\n") else repr(c)[1:-1] for c in text)


def admission_line(a: dict) -> str:
    """One line on who may join: the open-swarm warning, or the owner key and how many peers it admits."""
    if a.get("closed"):
        line = f"closed swarm, owner key {a['owner']}, {a['admitted']} admitted"
        return line + (f" ({a['hidden']} record(s) of non-admitted or revoked peers hidden)" if a["hidden"] else "")
    if a.get("claimed_owners"):
        return (f"records claim a closed swarm (owner key {', '.join(a['claimed_owners'])}); pass "
                "--swarm-owner-key to verify them and hide non-admitted peers")
    return "OPEN swarm: anyone who can reach a peer can join"



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


def short_id(peer_id: str) -> str:
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
    names = ", ".join(short_id(p) for p in peers[:_MAX_NAMED])
    return names + (f", +{len(peers) - _MAX_NAMED} more" if len(peers) > _MAX_NAMED else "")


def model_line(s: dict) -> str:
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
    if row.get("role") == "helper":
        return "helper"  # trains nothing (federation.helper)
    n, device = row.get("world_size", 1), row.get("device", "")
    return f"{n}x{device}" if device else str(n)


def last_round_line(s: dict) -> str:
    """What the live peers' last rounds were: the group they averaged in, over the roster they waited for, the
    leader they named, and who missed it ("" for summaries without these fields)."""
    last = s.get("last_round")
    if not last or not last.get("group"):
        return ""
    line = f"last round: group of {last['group']}"
    if last.get("waited"):
        line += f" of {last['waited']} waited for"
    if last.get("leader"):
        line += f", leader {short_id(last['leader'])}"
    missed = last.get("missed", [])
    return line + (f"; missed by {_named(missed)}" if missed else "; nobody missed it")


def _summary(status: dict) -> list[str]:
    s = status["summary"]
    head = (f"run '{status['run_id']}': round {s['global_round']}, {s['live_peers']} live "
            f"peer{'s' * (s['live_peers'] != 1)}")
    if s["stale_peers"] or s["left_peers"]:
        head += f" ({s['stale_peers']} stale, {s['left_peers']} left)"
    totals = (f"{_count(s['total_tokens'])} tokens, {s['tokens_per_s']:,.0f} tokens/s, median loss "
              f"{_num(s['median_loss'], '.4f')}, val ppl {_num(s['median_val_ppl'], '.2f')}, participation "
              f"{_pct(s.get('median_participation'))}, utilization {_pct(s.get('median_utilization'))}")
    lines = [head, model_line(s), last_round_line(s), totals]
    if "admission" in status:
        lines.append(admission_line(status["admission"]))
    if status.get("message"):
        lines.append(status["message"])
    for r in status["peers"]:
        if r.get("role") == "helper":
            lines.append(f"helper {short_id(r['peer_id'])} (trains nothing, leads and reduces rounds of volunteers "
                         f"behind NAT): carried {_count(r['bytes_sent'])}B out, {_count(r['bytes_received'])}B in")
    for r in status["peers"]:
        c = r.get("clipped_by_others")
        if r["peer_id"] in s.get("clipped_peers", []) and c:
            lines.append(f"CLIPPED: peer {short_id(r['peer_id'])} was clipped or dropped by {len(c['reporters'])} "
                         f"reducer(s) in up to {c['rounds']} of their last rounds (smallest share kept "
                         f"{c['factor']:.2g}): its updates are far from the others'; check it")
    return [textwrap.fill(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False) for line in lines if line]


def _compact(r: dict) -> tuple[str, ...]:
    return (short_id(r["peer_id"]) + ("" if r["verified"] else "?"), r["status"], str(r["round"]),
            _short_model(r["fingerprint"]), _group(r), f"{r['participation']:.0%}", f"{r['tokens_per_s']:,.0f}",
            _num(r["loss"], ".4f"), _ago(r["last_seen"]))


def _wide(r: dict) -> tuple[str, ...]:
    c = r.get("clipped_by_others")
    return (short_id(r["peer_id"]) + ("" if r["verified"] else "?"), _address(r), r["status"], str(r["round"]),
            str(r["lag"]), _short_model(r["fingerprint"]), f"{r['participation']:.0%}",
            f"{c['rounds']}x{len(c['reporters'])}" if c else "-", _group(r), _pct(r.get("utilization")),
            _count(r["tokens"]), f"{r['tokens_per_s']:,.0f}", _num(r["loss"], ".4f"), _num(r["val_ppl"], ".2f"),
            _silo(r), _ago(r["last_seen"]) + " ago")


COMPACT = ("PEER", "STATE", "ROUND", "MODEL", "GROUP", "PART", "TOK/S", "LOSS", "SEEN")
WIDE = ("PEER", "ADDRESS", "STATE", "ROUND", "LAG", "MODEL", "PART", "CLIPPED", "GROUP", "UTIL", "TOKENS", "TOK/S",
        "LOSS", "VAL PPL", "SILO", "LAST SEEN")


def render_table(status: dict, wide: bool = False) -> str:
    """The summary, then one row per peer: the columns that fit 80 columns, or every column with ``wide``
    (address, lag, clipping, utilization, tokens, validation perplexity, silo)."""
    rows = status["peers"]
    if not rows:
        text = status.get("message", f"no peers in run '{status['run_id']}'")
        closed = status.get("admission", {}).get("closed")  # an open swarm without peers: nothing to add
        return printable(text + ("\n" + admission_line(status["admission"]) if closed else ""))
    table = [WIDE if wide else COMPACT] + [tuple(printable(c, lines=False) for c in (_wide if wide else _compact)(r)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [printable(line) for line in _summary(status)] + [""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if not all(r["verified"] for r in rows):
        lines.append("? = peer id not proven by the record's key (the peer runs without --identity)")
    if not wide:
        lines.append("GROUP: last group / roster waited for.  --wide: addresses, lag, tokens, silos")
    return "\n".join(lines)
