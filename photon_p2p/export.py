"""Export a run's model as a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from photon_p2p.config import ModelConfig
from photon_p2p.model import ffn_hidden_size, kv_heads


def hf_config(cfg: ModelConfig, bos_id: int = 0, eos_id: int = 0) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": kv_heads(cfg),
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def hf_state_dict(model_state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """Our names are Llama's without the ``model.`` prefix; a tied head is stored once (as HF expects)."""
    out = {}
    for name, tensor in model_state.items():
        if name == "lm_head.weight":
            if not tie:
                out[name] = tensor
            continue
        out[f"model.{name}"] = tensor
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_hf(model_state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer_path: str | Path | None,
              out_dir: str | Path, eos_id: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model_state, cfg.tie_embeddings), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eos_id, eos_id), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}))
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>", "model_max_length": cfg.seq_len}))
    return out
