"""Exporters: the Prometheus endpoint serves the snapshot at scrape time; TensorBoard gets every metrics record."""

from __future__ import annotations

import importlib.util
import socket
import urllib.error
import urllib.request

import pytest

from conftest import tiny_overrides
from photon_p2p.config import ConfigError, load_config
from photon_p2p.metrics import MetricsLogger
from photon_p2p.observe import GAUGES, record_scalars, start_exporters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def heartbeat(**extra: object) -> dict:
    """The daemon's heartbeat() keys (federation/records.py), as the exporter gets them."""
    return {"round": 3, "local_step": 96, "tokens": 196608, "loss": 4.25, "val_ppl": 71.5, "tokens_per_s": 1234.5,
            "group_size": 3, "averaging_s": 0.8, "bytes_sent": 1_000_000, "bytes_received": 2_000_000,
            "fingerprint": "617498eb" * 8, "participation": 0.75, **extra}


def test_prometheus_endpoint_serves_the_snapshot_on_every_scrape(tmp_path):
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    port = free_port()
    cfg = load_config(["tiny"], [f"observe.prometheus_port={port}", "federation.run_id=obs"])
    state = heartbeat()
    with start_exporters(cfg, lambda: dict(state), tmp_path) as exporters:
        assert exporters.prometheus_port == port
        text = scrape(port)
        for name in set(GAUGES) - {"utilization"}:
            assert f"photon_{name}{{" in text, name
        assert "photon_utilization" not in text  # absent from the snapshot: not made up
        assert 'photon_round{peer="tiny",run_id="obs"} 3.0' in text
        assert "photon_bytes_received" in text and "2e+06" in text
        state.update(round=4, utilization=0.5, val_ppl=-1.0)  # -1: no evaluation yet
        text = scrape(port)
        assert 'photon_round{peer="tiny",run_id="obs"} 4.0' in text  # read at scrape time, never stale
        assert "photon_utilization{" in text and "photon_val_ppl{" not in text
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # closed


def test_prometheus_survives_a_failing_snapshot_and_a_busy_port(tmp_path):
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    port = free_port()
    cfg = load_config(["tiny"], [f"observe.prometheus_port={port}"])

    def not_ready() -> dict:
        raise AttributeError("the daemon has no swarm yet")

    with start_exporters(cfg, not_ready, tmp_path):
        assert "photon_round" not in scrape(port)  # an empty answer, not an error page
        with pytest.raises(ConfigError, match=f"observe.prometheus_port {port}: cannot serve"):
            start_exporters(cfg, heartbeat, tmp_path)


def test_gauges_are_heartbeat_fields():
    from photon_p2p.federation.records import PeerRecord

    assert set(GAUGES) - {"utilization"} <= set(PeerRecord.__fields__)  # utilization: exported when present


def test_nothing_starts_when_off(tmp_path):
    cfg = load_config(["tiny"])
    with start_exporters(cfg, heartbeat, tmp_path) as exporters:
        assert exporters.prometheus_port == 0 and exporters.tensorboard_dir is None


def test_record_scalars_flattens_numbers_only():
    record = {"kind": "round", "time": 1.0, "round": 2, "loss": 3.5, "solo": False, "reason": "", "fingerprint": "ab",
              "phases": {"matchmaking": 0.5, "allreduce": 0.25}, "val_ppl": float("nan")}
    assert dict(record_scalars(record)) == {"round/round": 2.0, "round/loss": 3.5,
                                            "round/phases/matchmaking": 0.5, "round/phases/allreduce": 0.25}


def test_tensorboard_sink_writes_every_logged_record(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'photon_p2p[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(["tiny"], [f"observe.tensorboard_dir={tmp_path / 'tb'}", "name=silo-a"])
    metrics = MetricsLogger(tmp_path / "run")
    metrics.log("step", step=0, loss=9.0)  # before the exporter: only in the JSONL
    with start_exporters(cfg, heartbeat, tmp_path / "run") as exporters:
        assert exporters.tensorboard_dir == tmp_path / "tb" / "silo-a"  # one TensorBoard run per silo
        for step in (10, 20):
            metrics.log("step", step=step, tokens=step * 100, loss=5.0 - step / 10, lr=1e-3)
        metrics.log("round", round=1, step=20, solo=False, fingerprint="ab", phases={"allreduce": 0.3})
    metrics.log("step", step=30, loss=1.0)  # after close: the sink is gone, logging still works
    files = list((tmp_path / "tb" / "silo-a").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/tokens", "step/lr", "round/round", "round/phases/allreduce"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("step/loss")] == [(10, 4.0), (20, 3.0)]


def test_missing_optional_packages_are_config_errors(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "prometheus_client") else real(name, *a))
    with pytest.raises(ConfigError, match=r"tensorboard .* \(pip install 'photon_p2p\[tensorboard\]'\)"):
        load_config(["tiny"], ["observe.tensorboard_dir=tb"])
    with pytest.raises(ConfigError, match="prometheus_client is not installed"):
        load_config(["tiny"], ["observe.prometheus_port=9100"])


def test_solo_training_feeds_tensorboard(tmp_path, kjv_data):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'photon_p2p[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from photon_p2p.train.solo import run_solo

    overrides = {"data.path": str(kjv_data), "train.max_steps": 10, "train.eval_every": 10,
                 "observe.tensorboard_dir": str(tmp_path / "tb")}
    cfg = load_config(["tiny"], tiny_overrides(tmp_path / "run", **overrides))
    run_solo(cfg, progress=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "tiny"))
    acc.Reload()
    assert {"step/loss", "step/tokens_per_s", "eval/val_ppl"} <= set(acc.Tags()["scalars"])
