"""The embedded default corpus (public-domain slices shipped as .txt.xz), prepared on first use into a run dir."""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from photon_p2p.data import DataError
from photon_p2p.data.loader import TokenDataset, read_manifest
from photon_p2p.data.prepare import prepare
from photon_p2p.data.tokenizer import tokenizer_sha256

SOURCES = ("shakespeare", "kjv", "brown")
CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"


def resolve_sources(sources: Sequence[str] | None) -> list[str]:
    """Validated source names in canonical order (None/[] = all), so equal sets share one prepared dir."""
    if not sources:
        return list(SOURCES)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown embedded data source(s): {', '.join(map(str, unknown))} "
                        f"(valid: {', '.join(SOURCES)})")
    return [s for s in SOURCES if s in sources]


def embedded_source_path(name: str) -> Path:
    """The shipped .txt.xz of one embedded source."""
    path = CORPUS_DIR / f"{resolve_sources([name])[0]}.txt.xz"
    if not path.is_file():
        raise DataError(f"embedded corpus file missing (broken installation?): {path}")
    return path


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    """Serialize preparation when several peers share one run dir (best effort: POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent prepares still end consistent (atomic renames)
        yield
        return
    with open(directory / ".data.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _reusable(data_dir: Path, names: list[str], tok_sha: str, val_fraction: float) -> bool:
    """True if ``data_dir`` holds an intact preparation of exactly these sources/tokenizer/split."""
    try:
        manifest = read_manifest(data_dir)
        for split in ("train", "val"):
            TokenDataset(data_dir, split)  # checks every shard's size against the manifest
    except DataError:
        return False
    return ([Path(s).name for s in manifest.get("sources", [])] == [f"{n}.txt" for n in names]
            and manifest.get("tokenizer_sha256") == tok_sha
            and manifest.get("val_fraction") == val_fraction)


def _decompress(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with lzma.open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(tmp, dst)


def ensure_default_dataset(out_dir: str | Path, sources: list[str] | None = None, tokenizer: str | None = None,
                           val_fraction: float = 0.01, progress: bool = True) -> Path:
    """Prepare the embedded corpus (the chosen ``sources``) under ``out_dir`` unless an up-to-date
    preparation is already there; return the prepared data dir (``out_dir/data-<sources>``)."""
    names = resolve_sources(sources)
    tok_sha = tokenizer_sha256(tokenizer)
    # A non-default tokenizer gets its own dir so switching back and forth does not re-tokenize each time.
    suffix = "" if tok_sha == tokenizer_sha256(None) else f"-tok{tok_sha[:8]}"
    out = Path(out_dir)
    data_dir = out / ("data-" + "-".join(names) + suffix)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if _reusable(data_dir, names, tok_sha, val_fraction):
            return data_dir
        raw = out / "raw"
        raw.mkdir(exist_ok=True)
        inputs = []
        for name in names:
            dst = raw / f"{name}.txt"
            _decompress(embedded_source_path(name), dst)
            inputs.append(str(dst))
        prepare(inputs, data_dir, tokenizer=tokenizer, val_fraction=val_fraction, progress=progress)
    return data_dir
