"""Maintainer-only: rebuild photon_p2p/assets/corpus/*.txt.xz and photon_p2p/assets/tokenizer.json.

Reads the full public-domain corpus in ../shared/corpus (which users never have), cuts a ~1.2 MB slice of
each source, compresses it with lzma preset 9, then trains the bundled 8192-token byte-level BPE on the
three slices. Run from the repository root:  python bench/make_embedded_corpus.py
"""

from __future__ import annotations

import lzma
import re
from pathlib import Path

import toolkit as kit
from photon_p2p.data.tokenizer import BUNDLED_TOKENIZER, train_tokenizer

ASSETS = kit.REPO / "photon_p2p" / "assets" / "corpus"
TARGET_BYTES = 1_200_000
VOCAB_SIZE = 8192


def shakespeare_slice(text: str, target: int) -> str:
    """Every fourth work (comedies, histories, tragedies and poems mixed), cut at `=== name ===` lines."""
    works = [w for w in re.split(r"(?m)^(?==== .+ ===$)", text) if w.strip()]
    picked: list[str] = []
    size = 0
    for work in works[::4]:
        if size + len(work) > target:
            continue  # a long play would overshoot; a later, shorter work may still fit
        picked.append(work.strip("\n") + "\n")
        size += len(work)
    return "\n\n".join(picked)


def line_blocks(text: str, starts: list[int], target: int) -> str:
    """Contiguous blocks of whole lines beginning at the given character offsets, ``target`` bytes in all."""
    per_block = target // len(starts)
    blocks = []
    for start in starts:
        if start > 0:
            start = text.index("\n", start - 1) + 1  # snap forward to a line start
        end = text.find("\n", min(start + per_block, len(text)) - 1)
        blocks.append(text[start : len(text) if end < 0 else end + 1].strip("\n") + "\n")
    return "\n\n".join(blocks)


def kjv_slice(text: str, target: int) -> str:
    """Half from Genesis, half from Matthew, so both testaments are represented."""
    return line_blocks(text, [0, text.index("\nMatthew\n") + 1], target)


def brown_slice(text: str, target: int) -> str:
    """Four evenly spaced blocks, so several of the Brown corpus' genres are represented."""
    return line_blocks(text, [len(text) * i // 4 for i in range(4)], target)


def main() -> None:
    ap = kit.parser(__doc__)
    ap.add_argument("--source-dir", type=Path, default=kit.CORPUS)
    ap.add_argument("--target-bytes", type=int, default=TARGET_BYTES)
    ap.add_argument("--skip-tokenizer", action="store_true")
    ap.add_argument("--assets", type=Path, default=ASSETS, help="where the slices go (the tokenizer: next to it)")
    args = ap.parse_args()
    args.assets.mkdir(parents=True, exist_ok=True)
    tokenizer = args.assets.parent / BUNDLED_TOKENIZER.name  # photon_p2p/assets/tokenizer.json by default
    slicers = {"shakespeare": shakespeare_slice, "kjv": kjv_slice, "brown": brown_slice}
    outputs = []
    for name, slicer in slicers.items():
        text = (args.source_dir / f"{name}.txt").read_text(encoding="utf-8")
        piece = slicer(text, args.target_bytes)
        data = piece.encode("utf-8")
        out = args.assets / f"{name}.txt.xz"
        out.write_bytes(lzma.compress(data, preset=9))
        outputs.append(out)
        print(f"{name}: {len(data):,} bytes of text -> {out.stat().st_size:,} bytes xz")
    print(f"corpus total: {sum(p.stat().st_size for p in outputs):,} bytes")

    if not args.skip_tokenizer:
        tok = train_tokenizer(outputs, VOCAB_SIZE, tokenizer)
        assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
        assert tok.token_to_id("<|endoftext|>") == 0
        print(f"tokenizer: {tokenizer} ({tokenizer.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
