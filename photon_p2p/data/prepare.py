"""Tokenize text/jsonl/parquet inputs into flat uint16/uint32 train/val shards plus a manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from tokenizers import Tokenizer

from photon_p2p.data import DataError
from photon_p2p.data.sources import BATCH_DOCS, count_documents, input_groups, iter_documents
from photon_p2p.data.tokenizer import eos_id, load_tokenizer, resolve_tokenizer_path, tokenizer_sha256
from photon_p2p.paths import writable_dir
from photon_p2p.progress import Progress

MANIFEST_FORMAT = 1
BATCH_CHARS = 8 * 1024 * 1024  # text handed to one encode_batch call: big enough to use every core


def _val_allocation(counts: list[int], val_fraction: float) -> list[int]:
    """Validation documents per file of one input: the last val_fraction of the input's documents (at
    least one when it has two or more), spread over its files by cumulative rounding so that a directory
    of many small files does not lose a whole document per file (which could make val ~50%)."""
    total = sum(counts)
    if val_fraction <= 0 or total < 2:
        return [0] * len(counts)
    target = min(total - 1, max(1, int(total * val_fraction + 0.5)))
    out, cum, prev = [], 0, 0
    for n in counts:
        cum += n
        upto = (2 * target * cum + total) // (2 * total)  # round(target * cum / total), exactly
        out.append(upto - prev)
        prev = upto
    return out


class _ShardWriter:
    """Appends tokens to ``<split>_000.bin, <split>_001.bin, ...`` of at most ``shard_tokens`` each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.directory, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.shards: list[dict] = []
        self._f: IO[bytes] | None = None
        self._sha = hashlib.sha256()
        self._n = 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._f is None:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
                self._f, self._sha, self._n = open(self.directory / name, "wb"), hashlib.sha256(), 0
            part, tokens = tokens[: self.shard_tokens - self._n], tokens[self.shard_tokens - self._n :]
            data = part.astype(self.dtype, copy=False).tobytes()
            self._f.write(data)
            self._sha.update(data)
            self._n += part.size
            if self._n >= self.shard_tokens:
                self.close()

    def close(self) -> list[dict]:
        """Finish the open shard (if any); the shard entries for the manifest."""
        if self._f is not None:
            self._f.close()
            self.shards[-1].update(tokens=self._n, sha256=self._sha.hexdigest())
            self._f = None
        return self.shards


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _plan(groups: list[list[Path]], val_fraction: float) -> list[tuple[Path, int, int, bool]]:
    """(file, documents, validation documents, split-the-token-stream) for every file, in order.
    Counting first also rejects missing/binary/empty/malformed files before any tokenizing work."""
    plan = []
    for group in groups:
        counts = [count_documents(f) for f in group]
        for f, n in zip(group, counts):
            if n == 0:
                raise DataError(f"empty input (no text): {f}")
        # An input that is one document (e.g. a short .txt) cannot be split by documents: split its tokens.
        split_stream = val_fraction > 0 and sum(counts) == 1
        plan += [(f, n, k, split_stream) for f, n, k in zip(group, counts, _val_allocation(counts, val_fraction))]
    return plan


def _tokenize(plan: list[tuple[Path, int, int, bool]], tok: Tokenizer, eos: int, val_fraction: float,
              writers: dict[str, _ShardWriter], progress: bool) -> dict[str, int]:
    """Encode every document (batched: encode_batch uses all cores), append eos, route to train/val."""
    docs = {"train": 0, "val": 0}
    dtype = writers["train"].dtype
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) needs tokenizers>=0.20
    total = sum(p[1] for p in plan)
    # Off a terminal: about ten lines for the whole preparation, not one per batch.
    with Progress(total, "tokenizing", unit="doc", enabled=progress, every=max(1, total // 10)) as bar:
        for f, n, n_val, split_stream in plan:
            index, file_tokens = 0, 0
            for batch in _batches(iter_documents(f)):
                parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
                for text, enc in zip(batch, encode(batch, add_special_tokens=False)):
                    split = "val" if index >= n - n_val else "train"  # the file's last n_val documents
                    index += 1
                    if not text:
                        continue
                    ids = np.array(enc.ids + [eos], dtype=dtype)
                    file_tokens += ids.size - 1
                    if split_stream:
                        cut = ids.size - min(ids.size - 1, max(1, int(ids.size * val_fraction + 0.5)))
                        parts["train"].append(ids[:cut])
                        parts["val"].append(ids[cut:])
                    else:
                        parts[split].append(ids)
                    docs[split] += 1
                for split, arrays in parts.items():
                    if arrays:
                        writers[split].write(np.concatenate(arrays))
                bar.update(len(batch))
            if file_tokens == 0:
                raise DataError(f"empty input (no text): {f}")
    return docs


def prepare(inputs: list[str], out_dir: str | Path, tokenizer: str | None = None, val_fraction: float = 0.01,
            shard_tokens: int = 50_000_000, progress: bool = True) -> dict:
    """Tokenize ``inputs`` (files or directories) into shards in ``out_dir``; return the manifest written there."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = writable_dir(out_dir, "output dir", DataError)  # before the inputs are read (that can take hours)
    groups = input_groups(inputs)
    tok_path = resolve_tokenizer_path(tokenizer)
    tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    plan = _plan(groups, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))  # same filesystem, so os.replace is atomic
    try:
        writers = {s: _ShardWriter(tmp, s, shard_tokens, dtype) for s in ("train", "val")}
        docs = _tokenize(plan, tok, eos_id(tok), val_fraction, writers, progress)
        shards = {s: w.close() for s, w in writers.items()}
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        manifest = {
            "format": MANIFEST_FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
            "tokenizer_sha256": tokenizer_sha256(tok_path), "tokenizer": "tokenizer.json", "eos_id": eos_id(tok),
            "train": shards["train"], "val": shards["val"],
            "sources": [str(Path(p).expanduser().resolve()) for p in inputs], "val_fraction": val_fraction,
            "num_tokens": {s: sum(x["tokens"] for x in shards[s]) for s in shards}, "documents": docs,
        }
        _commit(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _commit(tmp: Path, out: Path, manifest: dict) -> None:
    """Move the finished files from ``tmp`` into ``out``; the manifest goes last, so a reader never sees
    a manifest that points at shards from a different (or half-finished) preparation."""
    (out / "manifest.json").unlink(missing_ok=True)
    names = ["tokenizer.json"] + [s["file"] for s in manifest["train"] + manifest["val"]]
    for name in names:
        os.replace(tmp / name, out / name)
    for stale in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        if stale.name not in names:  # left over from an earlier, larger preparation
            stale.unlink()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp / "manifest.json", out / "manifest.json")
