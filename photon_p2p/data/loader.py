"""Memory-mapped token shards and deterministic, resumable random-window batch sampling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from photon_p2p.data import DataError
from photon_p2p.data.prepare import MANIFEST_FORMAT
from photon_p2p.paths import existing_dir

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_manifest(data_dir: str | Path) -> dict:
    """The parsed manifest.json of a prepared data dir; DataError if it is missing, corrupt or unknown."""
    path = existing_dir(data_dir, "data dir", DataError) / "manifest.json"
    if not path.is_file():
        raise DataError(f"not a prepared data dir (no manifest.json): {Path(data_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"unsupported manifest format {fmt!r} (expected {MANIFEST_FORMAT}): {path}")
    for key in ("dtype", "vocab_size", "train", "val", "tokenizer"):
        if key not in manifest:
            raise DataError(f"corrupt manifest (no '{key}'): {path}")
    if manifest["dtype"] not in _DTYPES:
        raise DataError(f"unsupported token dtype {manifest['dtype']!r}: {path}")
    return manifest


class TokenDataset:
    """One split of a prepared data dir: its shards memory-mapped (never read whole), sizes checked."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise DataError(f"unknown split {split!r} (expected 'train' or 'val')")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.data_dir)
        self.dtype = _DTYPES[self.manifest["dtype"]]
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest.get("eos_id", 0))
        self.tokenizer_path: Path = self.data_dir / self.manifest["tokenizer"]
        self.shard_entries: list[dict] = list(self.manifest[split])
        self.shards: list[np.ndarray] = []
        for entry in self.shard_entries:
            path = self.data_dir / entry["file"]
            expected = int(entry["tokens"]) * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"missing shard listed in manifest: {path}")
            size = path.stat().st_size
            if size != expected:
                # Typically a copy or download that was cut short; training on it would silently skew data.
                raise DataError(f"shard {path} is {size} bytes but the manifest says {entry['tokens']} tokens "
                                f"({expected} bytes): truncated or corrupt, re-run prepare-data")
            if expected:
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.num_tokens: int = sum(len(s) for s in self.shards)

    def __len__(self) -> int:
        return self.num_tokens

    def verify_checksums(self) -> None:
        """Re-hash every shard against the manifest's sha256 (reads all data: slow, optional)."""
        for entry in self.shard_entries:
            path = self.data_dir / entry["file"]
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if entry.get("sha256") and h.hexdigest() != entry["sha256"]:
                raise DataError(f"checksum mismatch for shard {path}: data is corrupt, re-run prepare-data")


def hash32(peer: str | int) -> int:
    """A stable 32-bit id for a peer name (Python's hash() is salted per process, so unusable here)."""
    return int.from_bytes(hashlib.sha256(str(peer).encode()).digest()[:4], "little")


class BatchSampler:
    """Random (x, y) windows of seq_len+1 tokens; batch k depends only on (seed, peer, k), so resuming
    needs just the integer cursor and different peers draw different data from the same shards."""

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int,
                 peer: str | int = 0, rank: int = 0, world: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        # One of ``world`` ranks of a silo: batch k is rows [rank*b, (rank+1)*b) of the silo's batch k of world*b
        # windows, so the silo's data is the same whatever its number of ranks (only this rank's rows are read).
        self.rank, self.world = rank, world
        self.seed = seed % 2**64  # SeedSequence wants non-negative entropy
        self.peer = peer
        self._peer_hash = hash32(peer)
        self.cursor = 0
        # Windows never straddle shards (the bytes are not contiguous): only shards holding a whole
        # window take part, weighted by their number of start positions.
        self._shards = [s for s in dataset.shards if len(s) >= seq_len + 1]
        if not self._shards:
            raise DataError(f"{dataset.split} split of {dataset.data_dir} has {dataset.num_tokens} tokens "
                            f"(largest shard too), fewer than seq_len+1 = {seq_len + 1}")
        starts = np.array([len(s) - seq_len for s in self._shards], dtype=np.int64)
        self._cum = np.cumsum(starts)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``k`` (a pure function of seed, peer and k); does not move the cursor."""
        rng = np.random.Generator(np.random.PCG64([self.seed, self._peer_hash, int(k)]))
        flat = rng.integers(0, int(self._cum[-1]), size=self.batch_size * self.world, dtype=np.int64)
        flat = flat[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        shard_idx = np.searchsorted(self._cum, flat, side="right")
        offsets = flat - np.concatenate(([0], self._cum[:-1]))[shard_idx]
        window = np.arange(self.seq_len + 1, dtype=np.int64)
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(shard_idx):
            rows = shard_idx == s
            out[rows] = self._shards[s][offsets[rows, None] + window]  # reads only these pages
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.batch(self.cursor)
        self.cursor += 1
        return xy

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


def eval_batches(dataset: TokenDataset, seq_len: int, batch_size: int, n_batches: int,
                 seed: int = 1234) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` validation batches on every call, so evaluations are comparable over time."""
    sampler = BatchSampler(dataset, seq_len, batch_size, seed=seed, peer="eval")  # DataError now, not lazily
    return (sampler.batch(k) for k in range(n_batches))
