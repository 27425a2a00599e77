"""Optional exporters: a Prometheus endpoint for a peer's live state and a TensorBoard sink for metrics.jsonl."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from photon_p2p.config import Config, ConfigError
from photon_p2p.metrics import add_sink

log = logging.getLogger("photon_p2p.observe")
PREFIX = "photon_"
# snapshot key (the daemon's heartbeat record) -> help text. Absent keys are not exported (utilization is optional).
GAUGES: dict[str, str] = {
    "round": "the round of this peer's global model",
    "tokens_per_s": "training tokens per second over the last logging interval",
    "loss": "latest local training loss",
    "val_ppl": "latest validation perplexity of the global model",
    "bytes_sent": "bytes sent by averaging since this peer started",
    "bytes_received": "bytes received by averaging since this peer started",
    "group_size": "peers in this peer's latest averaging group",
    "participation": "fraction of finished rounds this peer averaged in a group",
    "utilization": "fraction of wall-clock time spent training",
}
# In heartbeat records -1 stands for "not known yet" (no eval so far, a non-finite loss): exported as absent.
_SENTINEL_NEGATIVE = ("loss", "val_ppl")


def _number(snap: dict[str, Any], key: str) -> float | None:
    value = snap.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if key in _SENTINEL_NEGATIVE and value < 0:
        return None
    return float(value)


class SnapshotCollector:
    """A prometheus_client collector that reads ``snapshot()`` at scrape time, so values are never stale and the
    training loop does no exporter work at all."""

    def __init__(self, snapshot: Callable[[], dict], labels: dict[str, str]) -> None:
        self.snapshot, self.labels = snapshot, labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            snap = self.snapshot()
        except Exception as e:  # e.g. scraped before the peer has a model: an empty answer, not an HTTP 500
            log.debug("snapshot for /metrics failed: %s", e)
            return
        for key, help_text in GAUGES.items():
            value = _number(snap, key)
            if value is None:
                continue
            gauge = GaugeMetricFamily(PREFIX + key, help_text, labels=list(self.labels))
            gauge.add_metric(list(self.labels.values()), value)
            yield gauge


def record_scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite numeric field of a metrics record; dicts one level deep (round phases)."""
    kind = record.get("kind", "record")
    for key, value in record.items():
        if key in ("kind", "time"):
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue  # flags and text (reason, fingerprint) stay in the JSONL
            yield f"{kind}/{key}" + (f"/{sub}" if sub else ""), float(v)


class Exporters:
    """What ``start_exporters`` started; ``close()`` stops all of it (idempotent), also as a context manager."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []
        self.prometheus_port = 0  # the port /metrics is served on (0 = not serving)
        self.tensorboard_dir: Path | None = None

    def close(self) -> None:
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as e:  # closing one exporter must not keep the others open
                log.warning("closing an exporter failed: %s", e)

    def __enter__(self) -> Exporters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_prometheus(self, port: int, snapshot: Callable[[], dict], labels: dict[str, str]) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError("observe.prometheus_port is set but prometheus_client is not installed "
                              "(pip install prometheus_client)") from None
        # A registry of our own (not the process-global one): no default process metrics, no clash between two
        # exporters in one process (tests), and auto_describe off so registering does not call snapshot() yet.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snapshot, labels))
        try:
            server, thread = start_http_server(port, registry=registry)
        except OSError as e:
            raise ConfigError(f"observe.prometheus_port {port}: cannot serve metrics there ({e.strerror})") from None
        self.prometheus_port = int(server.server_address[1])

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        self._closers.append(stop)

    def _start_tensorboard(self, log_dir: Path, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("observe.tensorboard_dir is set but the tensorboard package is not installed "
                              "(pip install 'photon_p2p[tensorboard]')") from None
        writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)
        self.tensorboard_dir = log_dir

        def sink(record: dict[str, Any]) -> None:
            step = record.get("step", record.get("round"))
            step = step if isinstance(step, int) and not isinstance(step, bool) else None
            for tag, value in record_scalars(record):
                writer.add_scalar(tag, value, global_step=step, walltime=record.get("time"))

        self._closers.append(writer.close)
        self._closers.append(add_sink(run_dir, sink))  # closed first: no record reaches a closed writer


def start_exporters(cfg: Config, snapshot: Callable[[], dict], run_dir: str | Path) -> Exporters:
    """Start what ``cfg.observe`` asks for: Prometheus gauges read from ``snapshot()`` (the daemon's heartbeat
    dict) on every scrape of ``observe.prometheus_port``, and TensorBoard scalars of every record logged to
    ``run_dir``'s metrics.jsonl, under ``observe.tensorboard_dir/<name>`` (one TensorBoard run per silo).
    Nothing is started when both are off; call ``close()`` when the run ends."""
    exporters = Exporters()
    o = cfg.observe
    try:
        if o.prometheus_port:
            exporters._start_prometheus(o.prometheus_port, snapshot,
                                        {"run_id": cfg.federation.run_id, "peer": cfg.name})
        if o.tensorboard_dir:
            exporters._start_tensorboard(Path(o.tensorboard_dir).expanduser() / cfg.name, run_dir)
    except BaseException:
        exporters.close()
        raise
    return exporters
