"""Tests for the data pipeline: tokenizer, prepare(), the memory-mapped loader/sampler and the embedded corpus."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from photon_p2p.data import DataError
from photon_p2p.data.embedded import CORPUS_DIR, SOURCES, ensure_default_dataset
from photon_p2p.data.loader import BatchSampler, TokenDataset, eval_batches, read_manifest
from photon_p2p.data.prepare import prepare
from photon_p2p.data.tokenizer import BUNDLED_TOKENIZER, eos_id, load_tokenizer, tokenizer_sha256


@pytest.fixture(scope="module")
def kjv_text() -> str:
    return lzma.open(CORPUS_DIR / "kjv.txt.xz", "rt", encoding="utf-8").read()


@pytest.fixture(scope="module")
def paragraphs(kjv_text: str) -> list[str]:
    """Chapter-sized paragraphs of real text, to use as jsonl/parquet documents."""
    paras = [p.strip() for p in kjv_text.split("\n\n") if len(p.strip()) > 200]
    return paras[:60]


def _check_sizes(data_dir: Path, manifest: dict) -> None:
    for split in ("train", "val"):
        for shard in manifest[split]:
            assert (data_dir / shard["file"]).stat().st_size == shard["tokens"] * 2


def _write_synthetic(data_dir: Path, shard_sizes: list[int], val_sizes: list[int] = ()) -> None:
    """A hand-made data dir whose shards hold consecutive integers (shard i starts at 10000 * i)."""
    data_dir.mkdir(parents=True)
    manifest = {"format": 1, "dtype": "uint16", "vocab_size": 65536, "tokenizer": "tokenizer.json",
                "eos_id": 0, "train": [], "val": []}
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        for i, n in enumerate(sizes):
            name = f"{split}_{i:03d}.bin"
            (np.arange(n, dtype="<u2") + 10000 * i).tofile(data_dir / name)
            manifest[split].append({"file": name, "tokens": n, "sha256": ""})
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


# --- tokenizer ---------------------------------------------------------------------------------------


def test_bundled_tokenizer_round_trip() -> None:
    tok = load_tokenizer(None)
    assert tok.get_vocab_size() == 8192
    assert eos_id(tok) == 0 and tok.token_to_id("<|endoftext|>") == 0
    text = "In the beginning God created the heaven and the earth.\n\n  Thou art naïve — 🙂 x=1;\ttab"
    ids = tok.encode(text).ids
    assert len(ids) < len(text.encode())  # BPE actually merges
    assert tok.decode(ids) == text  # byte-level: lossless, even for characters never seen in training
    assert load_tokenizer("").get_vocab_size() == 8192
    assert len(tokenizer_sha256(None)) == 64 and tokenizer_sha256(None) == tokenizer_sha256(BUNDLED_TOKENIZER)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)


# --- prepare -----------------------------------------------------------------------------------------


def test_prepare_txt_jsonl_parquet(tmp_path: Path, kjv_text: str, paragraphs: list[str]) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "bible.txt").write_text(kjv_text[:300_000])  # ~5 documents of ~64 KB
    with open(src / "nested" / "docs.jsonl", "w") as f:
        for p in paragraphs[:30]:
            f.write(json.dumps({"text": p, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": paragraphs[30:], "n": list(range(len(paragraphs) - 30))}),
                   tmp_path / "docs.parquet")
    out = tmp_path / "prepared"
    manifest = prepare([str(src), str(tmp_path / "docs.parquet")], out, progress=False)

    assert manifest == read_manifest(out)
    assert manifest["format"] == 1 and manifest["dtype"] == "uint16" and manifest["vocab_size"] == 8192
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(out / "tokenizer.json") == tokenizer_sha256(None)
    _check_sizes(out, manifest)
    assert sum(s["tokens"] for s in manifest["val"]) > 0
    assert manifest["documents"]["val"] >= 2  # each input keeps at least one document for validation
    assert not list(out.glob(".tmp-*"))

    # Lossless: the stream is the documents in order, each followed by eos.
    tok = load_tokenizer(out / "tokenizer.json")
    train = TokenDataset(out).shards[0]
    eos_positions = np.flatnonzero(np.asarray(train) == manifest["eos_id"])
    assert eos_positions.size == manifest["documents"]["train"]
    first_doc = tok.decode(train[: eos_positions[0]].tolist())
    assert first_doc == kjv_text[: len(first_doc)].strip("\n") and len(first_doc) > 30_000
    # The last parquet row is in val, so the train stream ends with an earlier parquet row.
    last = tok.decode(train[eos_positions[-2] + 1 : eos_positions[-1]].tolist())
    assert last in paragraphs[30:-1]


def test_prepare_single_document_splits_tokens_and_shards(tmp_path: Path, kjv_text: str) -> None:
    small = tmp_path / "small.txt.gz"
    with gzip.open(small, "wt") as f:
        f.write(kjv_text[:20_000])  # one document
    manifest = prepare([str(small)], tmp_path / "out", val_fraction=0.1, shard_tokens=1000, progress=False)
    train, val = manifest["num_tokens"]["train"], manifest["num_tokens"]["val"]
    assert val > 0 and abs(val / (train + val) - 0.1) < 0.01
    assert len(manifest["train"]) == -(-train // 1000) and all(s["tokens"] <= 1000 for s in manifest["train"])
    _check_sizes(tmp_path / "out", manifest)
    TokenDataset(tmp_path / "out").verify_checksums()

    # Re-preparing with bigger shards replaces the old ones and leaves no stale shard behind.
    manifest = prepare([str(small)], tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["val"] == [] and len(manifest["train"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000.bin"]


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "not_utf8", "no_text_field", "parquet_column",
                                  "no_files"])
def test_prepare_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / {"missing": "absent.txt", "empty": "empty.txt", "binary": "blob.txt",
                       "not_utf8": "latin.txt", "no_text_field": "docs.jsonl",
                       "parquet_column": "docs.parquet", "no_files": "folder"}[case]
    if case == "empty":
        path.write_text("\n \n\n")
    elif case == "binary":
        path.write_bytes(b"hello\x00\x01\x02" * 100)
    elif case == "not_utf8":
        path.write_bytes("café crème ".encode("latin-1") * 100)
    elif case == "no_text_field":
        path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "oops"}) + "\n")
    elif case == "parquet_column":
        pq.write_table(pa.table({"body": ["a", "b"]}), path)
    elif case == "no_files":
        path.mkdir()
        (path / "notes.md").write_text("not a supported type")
    with pytest.raises(DataError) as e:
        prepare([str(path)], tmp_path / "out", progress=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- loader ------------------------------------------------------------------------------------------


def test_sampler_determinism_and_resume(tmp_path: Path) -> None:
    _write_synthetic(tmp_path / "d", [5000, 3000])
    ds = TokenDataset(tmp_path / "d")
    assert ds.num_tokens == 8000 and ds.vocab_size == 65536
    a = BatchSampler(ds, seq_len=16, batch_size=4, seed=7, peer="alice")
    b = BatchSampler(ds, seq_len=16, batch_size=4, seed=7, peer="alice")
    c = BatchSampler(ds, seq_len=16, batch_size=4, seed=7, peer="bob")
    run = [next(a) for _ in range(6)]
    for (x1, y1), (x2, y2) in zip(run, [next(b) for _ in range(6)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(run[0][0], next(c)[0])
    assert not torch.equal(run[0][0], run[1][0])
    assert a.state_dict() == {"cursor": 6}

    resumed = BatchSampler(ds, seq_len=16, batch_size=4, seed=7, peer="alice")
    resumed.load_state_dict({"cursor": 3})
    for x, y in run[3:]:
        x2, y2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(BatchSampler(ds, 16, 4, seed=7, peer=0).batch(0)[0],
                       BatchSampler(ds, 16, 4, seed=7, peer="0").batch(0)[0])


def test_sampler_windows_are_contiguous_and_within_one_shard(tmp_path: Path) -> None:
    _write_synthetic(tmp_path / "d", [300, 40, 10], val_sizes=[100])
    ds = TokenDataset(tmp_path / "d")
    sampler = BatchSampler(ds, seq_len=32, batch_size=64, seed=0)
    seen_second_shard = False
    for _ in range(20):
        x, y = next(sampler)
        assert x.shape == y.shape == (64, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        window = torch.cat([x, y[:, -1:]], dim=1)
        assert bool((window.diff(dim=1) == 1).all())  # consecutive: never straddles a shard boundary
        assert bool((window[:, 0] < 20000).all())  # the 10-token shard can never hold a 33-token window
        seen_second_shard |= bool((window[:, 0] >= 10000).any())
    assert seen_second_shard

    val = TokenDataset(tmp_path / "d", "val")
    first = [x for x, _ in eval_batches(val, 32, 8, 3)]
    again = [x for x, _ in eval_batches(val, 32, 8, 3)]
    assert len(first) == 3 and all(torch.equal(p, q) for p, q in zip(first, again))
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(val, seq_len=100, batch_size=1, seed=0)


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest"):
        TokenDataset(tmp_path)
    _write_synthetic(tmp_path / "d", [1000])
    shard = tmp_path / "d" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:1500])  # truncated copy
    with pytest.raises(DataError) as e:
        TokenDataset(tmp_path / "d")
    assert str(shard) in str(e.value) and "truncated" in str(e.value)
    (tmp_path / "d" / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="corrupt"):
        TokenDataset(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(DataError, match="format"):
        TokenDataset(tmp_path / "d")


def test_verify_checksums_detects_corruption(tmp_path: Path, kjv_text: str) -> None:
    (tmp_path / "a.txt").write_text(kjv_text[:50_000])
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", progress=False)
    ds = TokenDataset(tmp_path / "out")
    ds.verify_checksums()
    shard = tmp_path / "out" / "train_000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        TokenDataset(tmp_path / "out").verify_checksums()


# --- embedded default corpus -------------------------------------------------------------------------


def test_embedded_default_dataset_prepares_and_reuses(tmp_path: Path) -> None:
    assert sum((CORPUS_DIR / f"{s}.txt.xz").stat().st_size for s in SOURCES) < 1_500_000
    run = tmp_path / "run"
    data_dir = ensure_default_dataset(run, progress=False)
    assert data_dir == run / "data-shakespeare-kjv-brown"
    manifest = read_manifest(data_dir)
    assert [Path(s).name for s in manifest["sources"]] == ["shakespeare.txt", "kjv.txt", "brown.txt"]
    assert manifest["num_tokens"]["train"] > 500_000 and manifest["documents"]["val"] >= 3
    _check_sizes(data_dir, manifest)
    mtime = (data_dir / "manifest.json").stat().st_mtime_ns
    assert ensure_default_dataset(run, progress=False) == data_dir
    assert (data_dir / "manifest.json").stat().st_mtime_ns == mtime  # reused, not re-tokenized

    kjv_dir = ensure_default_dataset(run, sources=["kjv"], progress=False)
    assert kjv_dir == run / "data-kjv" and read_manifest(kjv_dir)["num_tokens"]["train"] > 200_000
    (kjv_dir / "val_000.bin").write_bytes(b"\x00\x00")  # damaged: must be re-prepared, not reused
    assert ensure_default_dataset(run, sources=["kjv"], progress=False) == kjv_dir
    TokenDataset(kjv_dir, "val").verify_checksums()

    with pytest.raises(DataError, match="shakespeare, kjv, brown"):
        ensure_default_dataset(run, sources=["wikipedia"])


def test_package_never_reads_the_maintainer_corpus() -> None:
    pkg = Path(__file__).resolve().parent.parent / "photon_p2p"
    for py in pkg.rglob("*.py"):
        assert "shared/corpus" not in py.read_text(), py
