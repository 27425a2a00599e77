"""Reading corpora: the supported input files (txt/jsonl/parquet, plain, .gz or .xz) and the documents in them."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import lzma
from pathlib import Path
from typing import IO, Iterator, Sequence

from photon_p2p.data import DataError

_SUFFIXES = {f".{kind}{z}": kind for kind in ("txt", "jsonl") for z in ("", ".gz", ".xz")} | {".parquet": "parquet"}
SUPPORTED = ", ".join(_SUFFIXES)
HEAD_BYTES = 64 * 1024  # how much of a file is sniffed for NUL bytes / invalid UTF-8
DOC_CHARS = 64 * 1024  # a .txt file is cut into documents of about this many characters
BATCH_DOCS = 1024


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _SUFFIXES.items() if name.endswith(suffix)), None)


def input_groups(inputs: Sequence[str | Path]) -> list[list[Path]]:
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
    return [f for group in input_groups(inputs) for f in group]


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
