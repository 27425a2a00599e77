"""One dataclass config tree: YAML preset -> overlays (``extends:``) -> ``--set section.key=value`` overrides.

Unknown keys and wrong types are errors (``ConfigError``) that name the offending key, so a typo in a
silo's overlay fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line and names the key."""


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder (see model.py)."""

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head attention)
    ffn_hidden: Optional[int] = None  # None = 8/3 * d_model rounded up to multiple_of (Llama's rule)
    multiple_of: int = 64
    seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Where tokens come from. An empty ``path`` means the embedded default corpus."""

    path: str = ""  # a prepared data dir (photon-peer prepare-data), or "" for the embedded default
    sources: list[str] = field(default_factory=list)  # embedded sources to use ([] = all of them)
    tokenizer: str = ""  # tokenizer.json for preparing the embedded default ("" = the bundled one)
    val_fraction: float = 0.01
    # A prepared data dir whose 'val' split is used for validation instead of this data's own ("" = own):
    # lets silos with different training data be scored on one shared held-out set.
    val_dir: str = ""
    seed: int = 0


@dataclass
class TrainConfig:
    """Local (inner) optimisation: Photon's small batch, high learning rate recipe."""

    batch_size: int = 32  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000  # length of the cosine schedule and of a solo `train` run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    eval_batch_size: int = 0  # sequences per validation batch (0 = the training micro-batch)
    checkpoint_every: int = 100
    log_every: int = 10
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 0


@dataclass
class FederationConfig:
    """The outer loop: rounds of H local steps, then a compressed all-reduce of pseudo-gradients."""

    run_id: str = "photon"
    rounds: int = 10  # rounds this peer trains before it exits (0 = until stopped)
    local_steps: int = 128  # H: inner steps per round (per silo on average, with round_clock: swarm)
    # swarm: a round ends for every peer when the live peers together have trained H steps' worth of tokens each
    # (hivemind's ProgressTracker), so fast silos take more steps and slow ones fewer, and all meet to average.
    # steps: every silo takes exactly H steps (Photon's fixed H; fine when silos are equally fast).
    round_clock: str = "swarm"
    round_token_budget: int = 0  # >0: a round ends after this many tokens even if H steps are not done
    round_time_budget: float = 0.0  # >0: a round's local phase ends after this many seconds
    target_group_size: int = 8
    min_group_size: int = 2
    matchmaking_time: float = 5.0  # seconds spent gathering a group before all-reduce
    # >0: a group that knows the round's live members declares this long a wait for one that has not arrived
    # (0 = matchmaking_time). Measured (BENCHMARKS.md, one model): 15 s lowered participation from 1.0 to 0.875,
    # because hivemind's matchmaking can split into sub-groups that only merge at their declared deadline.
    straggler_wait: float = 0.0
    allreduce_timeout: float = 60.0
    round_deadline: float = 120.0  # max seconds to wait for averaging; then the round goes solo
    compression: str = "none"  # none | fp16 | scaled-fp16 | uint8 | blockwise8
    error_feedback: bool = False
    outer_optimizer: str = "fedavg"  # fedavg | fedmom | nesterov
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    inner_state: str = "keep"  # keep | reset: AdamW state across rounds
    state_sync_timeout: float = 60.0
    allow_solo_start: bool = True  # start from scratch if no peer can give state in time
    heartbeat_interval: float = 30.0
    record_ttl: float = 90.0
    max_rollbacks: int = 3  # non-finite guard: stop after this many rollbacks in a row
    divergence_loss: float = 0.0  # a local loss above this is treated as diverged (0 = 2·ln(vocab_size))


@dataclass
class NetworkConfig:
    """How this peer reaches the swarm (all addresses are multiaddrs)."""

    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: str = ""
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    bootstrap_timeout: float = 30.0
    request_timeout: float = 10.0


@dataclass
class Config:
    """The whole tree; ``name`` and ``run_dir`` describe the run itself."""

    name: str = "run"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "federation.compression": ("none", "fp16", "scaled-fp16", "uint8", "blockwise8"),
    "federation.outer_optimizer": ("fedavg", "fedmom", "nesterov"),
    "federation.inner_state": ("keep", "reset"),
    "federation.round_clock": ("swarm", "steps"),
    "train.precision": ("auto", "bf16", "fp32"),
}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to ``tp`` where that is lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("run_id"):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Apply a nested dict onto a dataclass instance, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.")
        else:
            value = _check_type(value, hints[key], full)
            if full in CHOICES and value not in CHOICES[full]:
                raise ConfigError(f"config key '{full}' must be one of {', '.join(CHOICES[full])}, got {value!r}")
            setattr(obj, key, value)


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a preset in configs/ (e.g. ``tiny``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = REPO_CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.is_file() and path.suffix not in (".yaml", ".yml"):
        return preset
    raise ConfigError(f"config file not found: {name_or_path}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The chain of YAML documents for ``path``: its ``extends:`` parents first, then itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'extends' cycle at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    chain: list[dict] = []
    parent = data.pop("extends", None)
    if parent is not None:
        parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
        if not parent_path.is_file():
            parent_path = resolve_config_path(str(parent))
        chain.extend(_read_yaml(parent_path, seen + (path,)))
    chain.append(data)
    return chain


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value parsed as YAML (so numbers, bools and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" as a string; a number is what anyone typing it means.
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from preset/overlay files (later wins) and ``key=value`` overrides."""
    cfg = Config()
    for p in paths:
        for doc in _read_yaml(resolve_config_path(p)):
            _merge(cfg, doc)
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single type check cannot express."""
    m, t, f = cfg.model, cfg.train, cfg.federation
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.d_model / model.n_heads must be even for rotary embeddings")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    for key, value in (("train.batch_size", t.batch_size), ("train.max_steps", t.max_steps),
                       ("model.seq_len", m.seq_len), ("federation.local_steps", f.local_steps),
                       ("federation.target_group_size", f.target_group_size)):
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if t.eval_batch_size < 0:
        raise ConfigError(f"config key 'train.eval_batch_size' must be >= 0, got {t.eval_batch_size}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("config key 'data.val_fraction' must be in [0, 1)")
    if f.straggler_wait < 0:
        raise ConfigError(f"config key 'federation.straggler_wait' must be >= 0, got {f.straggler_wait}")
    if f.max_rollbacks < 1:
        raise ConfigError(f"config key 'federation.max_rollbacks' must be >= 1, got {f.max_rollbacks}")
    if f.divergence_loss < 0:
        raise ConfigError(f"config key 'federation.divergence_loss' must be >= 0, got {f.divergence_loss}")
    if f.min_group_size < 1 or f.min_group_size > f.target_group_size:
        raise ConfigError("federation.min_group_size must be in [1, federation.target_group_size]")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
