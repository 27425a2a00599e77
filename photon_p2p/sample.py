"""Text from a run's checkpoint: greedy decoding or temperature + top-k sampling (the swarm's global model)."""

from __future__ import annotations

from pathlib import Path

import torch

from photon_p2p.config import ConfigError, TrainConfig, check_value
from photon_p2p.data.tokenizer import eos_id, load_tokenizer
from photon_p2p.model import Transformer
from photon_p2p.train.device import pick_device
from photon_p2p.train.solo import load_model_from_run, run_tokenizer_path


@torch.no_grad()
def generate(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, vocab_limit: int | None = None, stop_id: int | None = None) -> list[int]:
    """New token ids after ``ids``: argmax when ``temperature`` is 0, else sampled from softmax(logits / T) over
    the ``top_k`` most likely tokens (0 = all). ``vocab_limit``: ids at or above it (model rows the tokenizer has
    no token for) are never produced. Stops early at ``stop_id``, which is not returned."""
    if not ids:
        raise ValueError("generate() needs at least one token of context")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same text for a seed on any device
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.cfg.seq_len:]], device=device)  # the model attends seq_len tokens at most
        logits = model(context)[0][0, -1].float().cpu()
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = -float("inf")
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        if token == stop_id:
            break
        out.append(token)
    return out[len(ids):]


def sample_run(run_dir: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
               top_k: int = 50, seed: int = 0, tokenizer: str | None = None, device: str = "auto") -> str:
    """The prompt and its continuation by the run's checkpoint (its global weights, for a federated run)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = no limit), got {top_k}")
    check_value("train.device", device, "--device")
    target = pick_device(TrainConfig(device=device), where="--device")  # before the checkpoint is read
    cfg, model, _ = load_model_from_run(run_dir)
    tok = load_tokenizer(tokenizer or run_tokenizer_path(cfg, run_dir))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab} tokens but the model only {cfg.model.vocab_size}: pass the "
                          "--tokenizer the run's data was prepared with")
    model.to(target)
    eos = eos_id(tok)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    # Documents are separated by end-of-text in training, so with no prompt the model starts a fresh document.
    context = prompt_ids or [eos]
    new = generate(model, context, max_new_tokens, temperature, top_k, seed, vocab_limit=vocab, stop_id=eos)
    return tok.decode(prompt_ids + new)
