"""Metrics: one JSON object per line (steps, evals, rounds) and a PNG plot of loss and perplexity."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

METRICS_NAME = "metrics.jsonl"


class MetricsLogger:
    """Appends records to RUN_DIR/metrics.jsonl; each record carries its kind and a wall-clock time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": round(time.time(), 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


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

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    plotted = 0
    for run_dir in run_dirs:
        records = list(read_metrics(run_dir))
        steps = [r for r in records if r["kind"] == "step"]
        evals = [r for r in records if r["kind"] == "eval" and math.isfinite(r.get("val_ppl", math.nan))]
        label = Path(run_dir).name
        if steps:
            ax_loss.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label=label)
            plotted += 1
        if evals:
            ax_ppl.plot([r["tokens"] for r in evals], [r["val_ppl"] for r in evals], marker="o", label=label)
    if not plotted:
        plt.close(fig)
        raise ValueError("no step records to plot in " + ", ".join(map(str, run_dirs)))
    ax_loss.set(xlabel="tokens (this peer)", ylabel="training loss", title="Training loss")
    ax_ppl.set(xlabel="tokens (this peer)", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
