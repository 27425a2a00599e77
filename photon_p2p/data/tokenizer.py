"""Loading, fingerprinting and training byte-level BPE tokenizers (HF ``tokenizers`` JSON files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from photon_p2p.data import DataError
from photon_p2p.data.sources import find_input_files, iter_documents

BUNDLED_TOKENIZER: Path = Path(__file__).resolve().parent.parent / "assets" / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# GPT-2/NeoX call it <|endoftext|>, Llama-2/T5 </s>, Llama-3 <|end_of_text|>, Gemma <eos>.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


def resolve_tokenizer_path(path: str | Path | None) -> Path:
    """The tokenizer.json to use: None or "" means the bundled one; a directory means its tokenizer.json."""
    if path is None or str(path) == "":
        return BUNDLED_TOKENIZER
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"  # an HF model directory
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    return p


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizers JSON file; a missing or unreadable file is a one-line DataError."""
    p = resolve_tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception with a multi-line serde message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"tokenizer file {p} is not a valid tokenizer.json: {first}") from None


def tokenizer_sha256(path: str | Path | None = None) -> str:
    """Hex sha256 of the tokenizer file's bytes: two data dirs are compatible iff their hashes match."""
    h = hashlib.sha256()
    with open(resolve_tokenizer_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token appended after every document (0 if the tokenizer has none)."""
    for token in _EOS_CANDIDATES:
        tid = tok.token_to_id(token)
        if tid is not None:
            return tid
    return 0


def _iter_texts(files: Iterable[str | Path]) -> Iterator[str]:
    # prepare()'s own readers: a tokenizer can be trained on exactly the formats (txt/jsonl/parquet, compressed
    # or not) that prepare() accepts.
    for f in find_input_files([str(p) for p in files]):
        yield from iter_documents(f)


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with ``<|endoftext|>`` as id 0 and save it to ``out_path``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(files), trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tok.save(str(tmp), pretty=False)  # compact: the bundled file ships in the wheel
    os.replace(tmp, out)
    return tok
