"""What a peer says about itself: its banner, its heartbeat record and its per-round log line and metrics."""

from __future__ import annotations

import math
from typing import Any, Protocol

from photon_p2p import __version__
from photon_p2p.config import Config
from photon_p2p.federation.averaging import RoundResult
from photon_p2p.federation.protocol import round_leader
from photon_p2p.federation.records import MAX_CLIPPED
from photon_p2p.ledger import InFlight, RoundLedger


class Reporter(Protocol):
    """What a report reads of a peer (the daemon is one): its config, books, trainer, swarm and global state."""

    cfg: Config
    ledger: RoundLedger
    trainer: Any
    swarm: Any
    state: Any
    metrics: Any

    @property
    def round(self) -> int: ...
    def fingerprint(self) -> str: ...


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else -1.0


def heartbeat_record(d: Reporter) -> dict[str, Any]:
    """The heartbeat snapshot (see federation/records.py PeerRecord): round, model fingerprint, group, ..."""
    res = d.ledger.last_result
    return {
        "round": d.round, "local_step": d.trainer.step, "tokens": d.trainer.tokens,
        "loss": _finite(d.trainer.last_loss), "val_ppl": _finite(d.ledger.last_eval.get("val_ppl", math.nan)),
        "tokens_per_s": float(d.ledger.tokens_per_s), "compression": d.cfg.federation.compression,
        "group_size": res.group_size if res else 0, "averaging_s": float(res.seconds) if res else 0.0,
        "bytes_sent": int(d.ledger.bytes_sent), "bytes_received": int(d.ledger.bytes_received),
        "client_mode": bool(d.cfg.network.client_mode), "connection": str(d.swarm.connection),
        "role": "helper" if d.cfg.federation.helper else "",
        "version": __version__,
        "started_at": float(d.ledger.started_at), "maddrs": d.swarm.maddrs,
        "fingerprint": d.fingerprint(), "participation": d.ledger.participation,
        "clipped": clip_summary(d.ledger.clip_history),
        "world_size": d.trainer.world_size, "device": d.trainer.device.type,
        "utilization": round(d.ledger.utilization(), 4), **roster_belief(d.swarm),
    }


def roster_belief(swarm: Any) -> dict[str, Any]:
    """Whom this peer's last round waited for and which peer it asked to lead (heartbeat and status)."""
    chosen = getattr(swarm, "last_roster", None)
    return {"waited": len(chosen.waited), "leader": round_leader(chosen)} if chosen is not None else {}


def roster_fields(d: Reporter) -> dict[str, Any]:
    """Whom the round waited for, as this peer read the clock (protocol.Roster), the DHT reads it issued since the
    last round record, and the requests (and their bytes) its DHT node served other nodes since the last round
    record that carried them (absent when the DHT process did not answer in time: HivemindSwarm.dht_served)."""
    chosen, reads = getattr(d.swarm, "last_roster", None), getattr(d.swarm, "dht_reads", 0)
    fields: dict[str, Any] = {"dht_reads": reads - d.ledger.reads_mark}
    d.ledger.reads_mark = reads
    read_served = getattr(d.swarm, "dht_served", None)
    served = read_served() if read_served is not None else None
    if served is not None:
        before = d.ledger.served_mark
        kinds = {k: [c[f] - before.get(k, {}).get(f, 0) for f in ("requests", "bytes")] for k, c in served.items()}
        fields.update(dht_served=sum(r for r, _ in kinds.values()), dht_served_bytes=sum(b for _, b in kinds.values()),
                      dht_served_kinds=kinds)  # {kind: [requests, bytes]}: which of ping / store / find dominates
        d.ledger.served_mark = served
    if chosen is not None:
        fields.update(roster=chosen.members, waited=chosen.waited, late=chosen.late, silent=chosen.silent)
    return fields


def clip_summary(history: Any) -> dict[str, dict[str, Any]]:
    """{sender: {"rounds": n, "factor": f}} over the rounds in ``history`` (each a RoundResult.clipped map): in how
    many of them this peer, as a reducer, clipped or dropped that sender, and the smallest factor it applied."""
    out: dict[str, dict[str, Any]] = {}
    for clipped in history:
        for peer, factor in clipped.items():
            seen = out.setdefault(str(peer), {"rounds": 0, "factor": 1.0})
            seen["rounds"] += 1
            seen["factor"] = float(min(seen["factor"], max(0.0, min(1.0, float(factor)))))
    worst = sorted(out, key=lambda p: (-out[p]["rounds"], out[p]["factor"], p))[:MAX_CLIPPED]
    return {p: out[p] for p in worst}


def clip_text(clipped: dict[str, float]) -> str:
    """'clipped ..abc x0.0001, dropped ..def' for the round line ("" when nobody was bounded); dropped: a chunk
    with a non-finite value, or one past what its sender declared (federation/robust.py)."""
    parts = [f"dropped {_tail(p)}" if f == 0 else f"clipped {_tail(p)} x{f:.2g}"
             for p, f in sorted(clipped.items(), key=lambda kv: (kv[1], kv[0]))]
    return ", ".join(parts)


def _tail(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else ".." + peer_id[-12:]


def log_round(d: Reporter, r: RoundResult, job: InFlight, evaluated: dict[str, float], outcome: Any = None) -> None:
    """One metrics record and one log line per finished round: what this peer now believes.

    ``compute_s`` is the averaged round's local phase; ``wait_s`` the time the trainer sat idle on its average
    (all of it without overlap; only what training could not hide with federation.overlap)."""
    fields = {"round": d.round, "averaged_round": job.round, "step": d.trainer.step,
              "tokens": d.trainer.tokens, "loss": d.trainer.last_loss, "solo": r.solo,
              "group_size": r.group_size, "members": r.members, "peers": r.peers, "averaging_s": r.seconds,
              "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received, "reason": r.reason,
              "partial": r.partial, "phases": r.phases, "healed": r.healed, "transport": r.transport,
              "group_models": len(set(r.fingerprints.values()) - {""}), "compute_s": job.compute_s,
              "wait_s": job.wait_s, "utilization": d.ledger.utilization(), "fingerprint": d.fingerprint(),
              "outer_lr": d.state.last_outer_lr,
              "participation": d.ledger.participation, "clipped": r.clipped, "rejected": r.rejected,
              "outcome": getattr(outcome, "value", outcome or ""), **roster_fields(d), **evaluated}
    if not r.solo:
        d.ledger.clip_history.append(dict(r.clipped))  # a deque of the last CLIP_WINDOW grouped rounds
    d.metrics.log("round", **fields)
    if evaluated:
        d.metrics.log("eval", step=d.trainer.step, tokens=d.trainer.tokens, round=d.round, **evaluated)
    how = "solo (" + r.reason + ")" if r.solo else f"group of {r.group_size} via {r.transport or 'hivemind'}"
    if r.healed:
        how += f" (healed a split: {fields['group_models']} models in the group averaged weights)"
    if r.reason and not r.solo:
        how += f" ({r.reason})"
    if r.clipped:
        how += f" (robust: {clip_text(r.clipped)})"
    ppl = f", val ppl {evaluated['val_ppl']:.2f}" if evaluated else ""
    print(f"round {d.round}: {how}, model {d.fingerprint()[:8]}, loss {d.trainer.last_loss:.4f}{ppl}, "
          f"averaging {r.seconds:.2f}s, sent {r.bytes_sent / 1e6:.2f} MB, received {r.bytes_received / 1e6:.2f} MB",
          flush=True)


def banner(cfg: Config, swarm: Any, trainer: Any = None) -> str:
    helper = ["averaging helper: trains nothing; joins every round with weight 0, leads it, reduces its parts and "
              "serves the state (volunteers behind NAT need one reachable peer)"] if cfg.federation.helper else []
    lines = ["=" * 78, f"photon-peer {__version__}  run '{cfg.federation.run_id}'  peer {swarm.peer_id}",
             *(helper or ([silo_line(trainer)] if trainer is not None else [])),
             "To join this swarm from another silo, run:"]
    lines += [f"  photon-peer run --config CONFIG --initial-peers {m}" for m in swarm.maddrs[:3]]
    if cfg.network.client_mode:
        lines.append("(client mode: this peer cannot be used as a bootstrap address)")
    admission = getattr(swarm, "admission_line", None)
    lines.append(admission() if admission is not None else
                 "OPEN swarm: anyone who can reach a peer can join (set federation.swarm_owner_key to close it)")
    lines.append("=" * 78)
    return "\n".join(lines)


def silo_line(trainer: Any) -> str:
    """What trains behind this peer: ranks, device and how the model is spread over them."""
    n = trainer.world_size
    how = {"ddp": "data parallel (DDP)", "fsdp": "sharded (FSDP2)"}.get(trainer.parallel, "one process")
    return (f"silo: {n} rank{'s' * (n != 1)} on {trainer.device.type}, {how}, "
            f"{trainer.tokens_per_step:,} tokens per step (its averaging weight per step)")
