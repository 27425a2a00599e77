"""What a peer says about itself: its banner, its heartbeat record and its per-round log line and metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from photon_p2p import __version__
from photon_p2p.config import Config
from photon_p2p.federation.averaging import RoundResult

if TYPE_CHECKING:  # the daemon imports this module; only its types are needed here
    from photon_p2p.daemon import InFlight, PeerDaemon


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else -1.0


def heartbeat_record(d: PeerDaemon) -> dict[str, Any]:
    """The heartbeat snapshot (see federation/records.py PeerRecord): round, model fingerprint, group, ..."""
    res = d.last_result
    return {
        "round": d.round, "local_step": d.trainer.step, "tokens": d.trainer.tokens,
        "loss": _finite(d.trainer.last_loss), "val_ppl": _finite(d.last_eval.get("val_ppl", math.nan)),
        "tokens_per_s": float(d.tokens_per_s), "compression": d.cfg.federation.compression,
        "group_size": res.group_size if res else 0, "averaging_s": float(res.seconds) if res else 0.0,
        "bytes_sent": int(d.bytes_sent), "bytes_received": int(d.bytes_received),
        "client_mode": bool(d.cfg.network.client_mode), "version": __version__,
        "started_at": float(d.started_at), "maddrs": d.swarm.maddrs,
        "fingerprint": d.fingerprint(), "participation": d.grouped / max(1, d.finished),
        "utilization": round(d.utilization(), 4),
    }


def log_round(d: PeerDaemon, r: RoundResult, job: InFlight, evaluated: dict[str, float]) -> None:
    """One metrics record and one log line per finished round: what this peer now believes.

    ``compute_s`` is the averaged round's local phase; ``wait_s`` the time the trainer sat idle on its average
    (all of it without overlap; only what training could not hide with federation.overlap)."""
    fields = {"round": d.round, "averaged_round": job.round, "step": d.trainer.step,
              "tokens": d.trainer.tokens, "loss": d.trainer.last_loss, "solo": r.solo,
              "group_size": r.group_size, "peers": r.peers, "averaging_s": r.seconds,
              "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received, "reason": r.reason,
              "partial": r.partial, "phases": r.phases, "healed": r.healed, "transport": r.transport,
              "group_models": len(set(r.fingerprints.values()) - {""}), "compute_s": job.compute_s,
              "wait_s": job.wait_s, "utilization": d.utilization(), "fingerprint": d.fingerprint(),
              "participation": d.grouped / max(1, d.finished), **evaluated}
    d.metrics.log("round", **fields)
    if evaluated:
        d.metrics.log("eval", step=d.trainer.step, tokens=d.trainer.tokens, round=d.round, **evaluated)
    how = "solo (" + r.reason + ")" if r.solo else f"group of {r.group_size} via {r.transport or 'hivemind'}"
    if r.healed:
        how += f" (healed a split: {fields['group_models']} models in the group averaged weights)"
    if r.reason and not r.solo:
        how += f" ({r.reason})"
    ppl = f", val ppl {evaluated['val_ppl']:.2f}" if evaluated else ""
    print(f"round {d.round}: {how}, model {d.fingerprint()[:8]}, loss {d.trainer.last_loss:.4f}{ppl}, "
          f"averaging {r.seconds:.2f}s, sent {r.bytes_sent / 1e6:.2f} MB, received {r.bytes_received / 1e6:.2f} MB",
          flush=True)


def banner(cfg: Config, swarm: Any) -> str:
    lines = ["=" * 78, f"photon-peer {__version__}  run '{cfg.federation.run_id}'  peer {swarm.peer_id}",
             "To join this swarm from another silo, run:"]
    lines += [f"  photon-peer run --config CONFIG --initial-peers {m}" for m in swarm.maddrs[:3]]
    if cfg.network.client_mode:
        lines.append("(client mode: this peer cannot be used as a bootstrap address)")
    lines.append("=" * 78)
    return "\n".join(lines)
