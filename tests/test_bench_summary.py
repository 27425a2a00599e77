"""BENCHMARKS.md's summary is what bench/claims.yaml renders from the raw files, and the checker catches drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, load_bench


STALE = "BENCHMARKS.md: row claim-low-bandwidth differs from the registry's rendering"


@pytest.fixture(scope="module")
def report():
    return load_bench("report")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The registry, BENCHMARKS.md and the raw files in a scratch root (the tests change only these copies)."""
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results", ignore=shutil.ignore_patterns("*.png"))
    shutil.copy(REPO / "bench" / "claims.yaml", tmp_path / "bench" / "claims.yaml")
    shutil.copy(REPO / "BENCHMARKS.md", tmp_path / "BENCHMARKS.md")
    return tmp_path


def test_the_committed_summary_is_what_the_registry_renders(report):
    assert report.check_summary() == []
    assert report.main(["--summary", "--check"]) == 0


def test_every_row_has_its_raw_files_and_every_value_reads(report):
    entries = yaml.safe_load((REPO / "bench" / "claims.yaml").read_text())
    for entry in entries:
        raws = entry["raw"] if isinstance(entry["raw"], list) else [entry["raw"]]
        assert raws and all(r.startswith("bench/results/") and (REPO / r).is_file() for r in raws), entry["id"]
    block, problems = report.render_summary()
    assert problems == []
    assert all(f'<a id="claim-{e["id"]}"></a>' in block for e in entries)


def test_a_missing_raw_file_fails_the_check_and_blocks_the_rewrite(report, scratch):
    (scratch / "bench" / "results" / "low_bandwidth.json").unlink()
    problems = report.check_summary(scratch)
    assert "claim low-bandwidth: raw file bench/results/low_bandwidth.json is missing" in problems
    before = (scratch / "BENCHMARKS.md").read_text()
    assert report.write_summary(scratch) and (scratch / "BENCHMARKS.md").read_text() == before


def test_a_figure_that_disagrees_with_its_raw_file_fails_the_check(report, scratch):
    raw = scratch / "bench" / "results" / "low_bandwidth.json"
    result = json.loads(raw.read_text())
    photon_20 = next(r for r in result["runs"] if r["system"] == "photon_p2p" and r["rate_mbit"] == 20.0)
    photon_20["ddp_over_photon_time"] = 9.9
    raw.write_text(json.dumps(result))
    assert report.check_summary(scratch) == [STALE]
    # Rewriting the table from the registry makes it current again, with the raw file's new figure.
    assert report.write_summary(scratch) == [] and report.check_summary(scratch) == []
    assert "**9.90×** at 20 Mbit/s" in (scratch / "BENCHMARKS.md").read_text()


def test_a_figure_typed_into_benchmarks_md_fails_the_check(report, scratch):
    path = scratch / "BENCHMARKS.md"
    text = path.read_text()
    assert text.count("**1.45×** at 100 Mbit/s") == 1
    path.write_text(text.replace("**1.45×** at 100 Mbit/s", "**1.50×** at 100 Mbit/s"))
    assert report.check_summary(scratch) == [STALE]


def test_a_value_that_cannot_be_read_fails_the_check(report, scratch):
    path = scratch / "bench" / "claims.yaml"
    path.write_text(path.read_text().replace("rate_mbit=20.0].ddp", "rate_mbit=21.0].ddp"))
    problems = report.check_summary(scratch)
    assert problems[0].startswith("claim low-bandwidth: value r20: ")


def test_paths_select_keys_indexes_matching_items_and_every_item(report):
    entry = {"id": "x", "raw": "bench/results/stop_latency_group.json"}
    read = lambda path: report._read(REPO, entry, {"json": path})  # noqa: E731
    assert read("args.peers") == 4
    assert read("trials.0.exits.2.peer") == "p2"
    assert read("trials.1.exits.[peer=p3].exit_s") == 9.6
    assert len(read("trials.*.exits.*.rc")) == 12
    assert read("trials.0.exits.*[rc=0].peer") == ["p0", "p1", "p2", "p3"]
