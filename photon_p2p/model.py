"""Llama-style decoder-only transformer (RMSNorm, RoPE, SwiGLU, SDPA); pure torch, no I/O, no network.

The layout and the rotary convention (rotate-half) match Hugging Face's LlamaForCausalLM, so export.py
only renames tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from photon_p2p.config import ModelConfig


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU width: 8/3 * d_model rounded up to ``multiple_of`` (Llama's rule) unless set explicitly."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.d_model / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def architecture(cfg: ModelConfig) -> dict[str, object]:
    """What a checkpoint's weights are for: the keys that set their shapes or how attention splits them into heads,
    derived ones resolved (n_kv_heads None = n_heads). seq_len, rope_theta, norm_eps and init_std shape no weight:
    a run may resume with other values of those."""
    return {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": kv_heads(cfg), "ffn_hidden": ffn_hidden_size(cfg), "tie_embeddings": cfg.tie_embeddings}


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the shape alone (checked against the module in tests)."""
    d, v, h = cfg.d_model, cfg.vocab_size, ffn_hidden_size(cfg)
    kv_dim = kv_heads(cfg) * (d // cfg.n_heads)
    attn = 2 * d * d + 2 * d * kv_dim  # q, o and k, v projections, no biases
    mlp = 3 * d * h
    per_layer = attn + mlp + 2 * d  # two RMSNorm weights
    embed = v * d * (1 if cfg.tie_embeddings else 2)
    return embed + cfg.n_layers * per_layer + d


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul weights (layers + LM head) + attention scores (PaLM's estimate)."""
    d, h = cfg.d_model, ffn_hidden_size(cfg)
    kv_dim = kv_heads(cfg) * (d // cfg.n_heads)
    matmul = cfg.n_layers * (2 * d * d + 2 * d * kv_dim + 3 * d * h) + cfg.vocab_size * d
    attn = 12 * cfg.n_layers * d * cfg.seq_len  # 6 * 2 * L * d * T for QK^T and AV
    return 6 * matmul + attn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 autocast does not lose the small variances.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout, as Hugging Face Llama
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """``forward(idx, targets=None) -> (logits, loss)``; loss is mean next-token cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(cfg.d_model // cfg.n_heads, cfg.seq_len, cfg.rope_theta)
        # Non-persistent: derived from the config, so checkpoints and averaging carry only parameters.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # GPT-2 / Llama scaled init: residual writers shrink with depth so activations stay O(1).
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len {self.cfg.seq_len}")
        cos, sin = self.rope_cos[:t].to(idx.device), self.rope_sin[:t].to(idx.device)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
