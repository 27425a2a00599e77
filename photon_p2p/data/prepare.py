"""Tokenize text/jsonl/parquet inputs into flat uint16/uint32 train/val shards plus a manifest.json."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from photon_p2p.data import DataError
from photon_p2p.data.tokenizer import eos_id, load_tokenizer, resolve_tokenizer_path, tokenizer_sha256
from photon_p2p.paths import writable_dir
from photon_p2p.progress import Progress

MANIFEST_FORMAT = 1
_SUFFIXES = {f".{kind}{z}": kind for kind in ("txt", "jsonl") for z in ("", ".gz", ".xz")} | {".parquet": "parquet"}
SUPPORTED = ", ".join(_SUFFIXES)
HEAD_BYTES = 64 * 1024  # how much of a file is sniffed for NUL bytes / invalid UTF-8
DOC_CHARS = 64 * 1024  # a .txt file is cut into documents of about this many characters
BATCH_CHARS = 8 * 1024 * 1024  # text handed to one encode_batch call: big enough to use every core
BATCH_DOCS = 1024


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _SUFFIXES.items() if name.endswith(suffix)), None)


def _input_groups(inputs: Sequence[str | Path]) -> list[list[Path]]:
    """The supported files of each input (a file, or a directory searched recursively), in a stable order."""
    if not inputs:
        raise DataError("no data inputs given")
    groups: list[list[Path]] = []
    seen: set[Path] = set()
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataError(f"data input not found: {p}")
        if p.is_dir():
            # Hidden entries are skipped: they include prepare()'s own .tmp-* dirs and VCS metadata.
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q)
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise DataError(f"no supported files ({SUPPORTED}) found under {p}")
        elif _kind(p) is None:
            raise DataError(f"unsupported data file type (expected {SUPPORTED}): {p}")
        else:
            found = [p]
        fresh = [f for f in found if f.resolve() not in seen]  # a file named twice is used once
        seen.update(f.resolve() for f in fresh)
        if fresh:
            groups.append(fresh)
    return groups


def find_input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """All supported files named by ``inputs`` (files or directories), in a stable order."""
    return [f for group in _input_groups(inputs) for f in group]


def _open_binary(path: Path) -> IO[bytes]:
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    return opener(path, "rb")


def _open_text(path: Path) -> io.TextIOWrapper:
    """Open a (possibly compressed) text file after checking that its start really is UTF-8 text."""
    with _open_binary(path) as f:
        head = f.read(HEAD_BYTES)
    if b"\x00" in head:
        raise DataError(f"input looks binary (contains NUL bytes), not UTF-8 text: {path}")
    try:
        # final=False tolerates a multi-byte character cut in half at the HEAD_BYTES boundary.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < HEAD_BYTES)
    except UnicodeDecodeError as e:
        raise DataError(f"input is not UTF-8 text (bad byte at offset {e.start}): {path}") from None
    # Past the sniffed head, a stray bad byte should not sink a multi-GB corpus: replace it.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="replace")


def _txt_documents(f: io.TextIOWrapper) -> Iterator[str]:
    """Blank-line separated paragraphs grouped into ~DOC_CHARS documents (a text file is many documents)."""
    buf: list[str] = []
    size = 0
    # readline(limit) bounds memory even for a file that is one enormous line.
    for line in iter(lambda: f.readline(DOC_CHARS), ""):
        blank = not line.strip()
        if size >= DOC_CHARS and (blank or size >= 2 * DOC_CHARS):
            doc = "".join(buf).strip("\n")
            if doc.strip():
                yield doc
            buf, size = [], 0
            if blank:
                continue
        buf.append(line)
        size += len(line)
    doc = "".join(buf).strip("\n")
    if doc.strip():
        yield doc


def _jsonl_documents(path: Path, f: io.TextIOWrapper) -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:  # e.msg of some ends in "at" (its position follows in str(e))
            raise DataError(f"{path}:{lineno}:{e.colno}: not valid JSON: {e.msg.removesuffix(' at')}") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f'{path}:{lineno}: JSON line has no "text" field')
        text = obj["text"]
        if text is not None and not isinstance(text, str):
            raise DataError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
        yield text or ""  # empty records still count, so document indices match count_documents()


def _parquet_file(path: Path):  # -> pyarrow.parquet.ParquetFile
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with long messages
        raise DataError(f"not a readable parquet file ({str(e).splitlines()[0]}): {path}") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f'parquet file has no "text" column (columns: {", ".join(schema.names)}): {path}')
    tp = schema.field("text").type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow < 16 has no string_view
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or is_view(tp)):
        raise DataError(f'parquet column "text" must be strings, got {tp}: {path}')
    return pf


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of one supported file, in order (empty jsonl/parquet records yield "")."""
    path = Path(path)
    kind = _kind(path)
    try:
        if kind == "parquet":
            for batch in _parquet_file(path).iter_batches(columns=["text"], batch_size=BATCH_DOCS):
                yield from (t or "" for t in batch.column(0).to_pylist())
            return
        with _open_text(path) as f:
            yield from (_jsonl_documents(path, f) if kind == "jsonl" else _txt_documents(f))
    except (OSError, EOFError, lzma.LZMAError) as e:  # truncated/corrupt compressed streams, I/O errors
        raise DataError(f"cannot read {path}: {e}") from None


def count_documents(path: str | Path) -> int:
    """Number of documents iter_documents(path) yields, needed up front to place the validation split."""
    path = Path(path)
    if _kind(path) == "parquet":
        return _parquet_file(path).metadata.num_rows
    # For jsonl this parses every line twice; simpler than buffering, and cheap next to tokenizing.
    return sum(1 for _ in iter_documents(path))


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
    groups = _input_groups(inputs)
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
