"""Metrics: one JSON object per line (steps, evals, rounds) and a PNG plot of loss and perplexity."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from photon_p2p.paths import output_file

METRICS_NAME = "metrics.jsonl"
Sink = Callable[[dict], None]
log = logging.getLogger("photon_p2p.metrics")
# Extra listeners per run directory (observe.py's TensorBoard writer). Keyed by directory so that the daemon and
# the solo trainer keep creating their own MetricsLogger and need not know who else listens.
_SINKS: dict[Path, list[Sink]] = {}
_SINKS_LOCK = threading.Lock()


class MetricsError(ValueError):
    """A run has no metrics of the kind asked for (e.g. nothing to plot yet); the message is one line."""


def add_sink(run_dir: str | Path, sink: Sink) -> Callable[[], None]:
    """Call ``sink(record)`` for every record any MetricsLogger of ``run_dir`` logs; returns its remover."""
    key = Path(run_dir).resolve()
    with _SINKS_LOCK:
        _SINKS.setdefault(key, []).append(sink)

    def remove() -> None:
        with _SINKS_LOCK:
            sinks = _SINKS.get(key, [])
            if sink in sinks:
                sinks.remove(sink)
            if not sinks:
                _SINKS.pop(key, None)

    return remove


class MetricsLogger:
    """Appends records to RUN_DIR/metrics.jsonl; each record carries its kind and a wall-clock time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = self.path.parent.resolve()

    def log(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": round(time.time(), 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        with _SINKS_LOCK:
            sinks = list(_SINKS.get(self._key, ()))
        for sink in sinks:
            try:
                sink(record)
            except Exception as e:  # an exporter's failure must never stop training; the JSONL has the record
                log.warning("metrics sink %r failed: %s", sink, e)


def read_metrics(run_dir: str | Path) -> Iterator[dict]:
    """Records of a run; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}")
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def plot_run(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Training loss and validation perplexity against tokens, one line per run directory."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on silos or CI
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # The format is the suffix: matplotlib writes a suffix-less name as NAME.png (so "wrote NAME" was wrong) and
    # rejects an unknown one only after the plot, with a traceback. A file with an image suffix is an earlier
    # plot: replacing it is what was asked.
    out = output_file(out, "plot output", replace=True, make_parents=True, error=MetricsError)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        raise MetricsError(f"plot output {out} must end in an image suffix, e.g. .png ({', '.join(sorted(formats))})")

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    plotted = 0
    for run_dir in run_dirs:
        records = list(read_metrics(run_dir))
        steps = [r for r in records if r["kind"] == "step"]
        evals = [r for r in records if r["kind"] == "eval" and math.isfinite(r.get("val_ppl", math.nan))]
        label = Path(run_dir).name
        if steps:
            # markers on short runs: a line through one or two points is invisible
            ax_loss.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label=label,
                         marker="o" if len(steps) < 20 else None, markersize=3)
            plotted += 1
        if evals:
            ax_ppl.plot([r["tokens"] for r in evals], [r["val_ppl"] for r in evals], marker="o", label=label)
    if not plotted:
        plt.close(fig)
        raise MetricsError("no step records to plot in " + ", ".join(map(str, run_dirs)))
    ax_loss.set(xlabel="tokens (this peer)", ylabel="training loss", title="Training loss")
    ax_ppl.set(xlabel="tokens (this peer)", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def silo_summary(run_dir: str | Path) -> dict[str, Any]:
    """One silo of a federated run, from its metrics: rounds it averaged in (of those it finished), its
    participation, last validation perplexity, and the round and model fingerprint of its last round record."""
    try:
        records = list(read_metrics(run_dir))
    except FileNotFoundError:
        records = []
    rounds = [r for r in records if r.get("kind") == "round"]
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("val_ppl"), (int, float))]
    last = rounds[-1] if rounds else {}
    return {"silo": Path(run_dir).name, "rounds": len(rounds), "averaged": sum(not r.get("solo") for r in rounds),
            "participation": last.get("participation"), "val_ppl": evals[-1]["val_ppl"] if evals else None,
            "round": last.get("round"), "fingerprint": last.get("fingerprint")}


def one_model(silos: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether every silo ended on one model (the same fingerprint in its last round record, at the same round),
    and the sentence that says so."""
    ended = [s for s in silos if s["fingerprint"]]
    if not silos or len(ended) < len(silos):
        missing = [s["silo"] for s in silos if not s["fingerprint"]]
        return False, f"no round recorded by {', '.join(missing) or 'any silo'}: cannot tell whether they agree"
    at = sorted({s["round"] for s in ended})
    if len(at) > 1:
        return False, f"silos ended at different rounds ({', '.join(map(str, at))}): they do not hold one model"
    models = sorted({s["fingerprint"] for s in ended})
    if len(models) == 1:
        return True, f"one model: all {len(ended)} silos hold {models[0][:8]} at round {at[0]}"
    holders = [f"{m[:8]} ({', '.join(s['silo'] for s in ended if s['fingerprint'] == m)})" for m in models]
    return False, f"{len(models)} different models at round {at[0]}: {', '.join(holders)}"


def format_swarm_summary(silos: list[dict[str, Any]]) -> str:
    """A short table of ``silo_summary`` rows and the one-model verdict."""
    lines = [f"{'silo':<12} {'averaged':>9} {'participation':>13} {'val ppl':>9}  model"]
    for s in silos:
        part = f"{s['participation']:.2f}" if isinstance(s["participation"], (int, float)) else "-"
        ppl = f"{s['val_ppl']:.2f}" if isinstance(s["val_ppl"], (int, float)) else "-"
        model = f"{s['fingerprint'][:8]} (round {s['round']})" if s["fingerprint"] else "-"
        averaged = f"{s['averaged']}/{s['rounds']}"
        lines.append(f"{s['silo']:<12} {averaged:>9} {part:>13} {ppl:>9}  {model}")
    lines.append(one_model(silos)[1])
    return "\n".join(lines)
