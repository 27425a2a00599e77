"""One dataclass config tree: YAML preset -> overlays (``extends:``) -> ``--set key=value`` overrides -> validate.

Unknown keys and wrong types are errors (``ConfigError``) that name the offending key, so a typo in a
silo's overlay fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

# The presets ship inside the package (a wheel has no repo around it); top-level configs/ holds byte-identical
# copies for users to copy and edit (tests/test_config.py checks that they never drift apart).
PRESET_DIR: Traversable = importlib.resources.files("photon_p2p") / "configs"
ConfigSource = Union[Path, Traversable]


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
    # Under torchrun (several ranks per silo, train/parallel.py): ddp replicates the model on every rank, fsdp
    # shards parameters, gradients and AdamW state (FSDP2); auto = fsdp when the model with AdamW would not fit
    # half a device, else ddp; none = one process (an error under torchrun with more than one rank).
    # batch_size is per rank: a silo's step is batch_size x ranks sequences.
    parallel: str = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    dist_timeout: float = 1800.0  # seconds a rank waits for the others (ranks idle while rank 0 averages)


@dataclass
class FederationConfig:
    """The outer loop: rounds of H local steps, then a compressed all-reduce of pseudo-gradients."""

    run_id: str = "photon"
    rounds: int = 10  # the swarm round at which the run ends, for every peer alike (0 = until stopped)
    local_steps: int = 128  # H: inner steps per round (per silo on average, with round_clock: swarm)
    # swarm: each silo takes H steps while it is within ±25% of the swarm's mean speed, else H x its speed over
    # the mean (hivemind's ProgressTracker records carry the speeds), so fast silos take more steps and slow
    # ones fewer, and all meet to average.
    # steps: every silo takes exactly H steps (Photon's fixed H; fine when silos are equally fast).
    round_clock: str = "swarm"
    round_token_budget: int = 0  # >0: a round ends after this many tokens even if H steps are not done
    round_time_budget: float = 0.0  # >0: a round's local phase ends after this many seconds
    # Up to this many live peers average as ONE group per round (one model by construction; butterfly traffic
    # per peer does not grow with the group); past it, in two stages over a grid (federation/groups.py).
    target_group_size: int = 32
    min_group_size: int = 2
    matchmaking_time: float = 5.0  # seconds spent gathering a group before all-reduce
    # >0: a group that knows the round's live members declares this long a wait for one that has not arrived
    # (0 = matchmaking_time). Measured (BENCHMARKS.md, one model): 15 s lowered participation from 1.0 to 0.875,
    # because hivemind's matchmaking can split into sub-groups that only merge at their declared deadline.
    straggler_wait: float = 0.0
    # A round's group waits for a member still training up to this share of the round's compute time (at least
    # matchmaking_time or straggler_wait, at most round_deadline / 2): a fixed window is too short on a busy
    # machine and too long for nothing (protocol.wait_budget). 1.0: on a busy 2-core machine a silo's round varies
    # ±50% (another silo's evaluation, a checkpoint); with 0.5 one README demo round in 32 left a silo behind.
    wait_fraction: float = 1.0
    allreduce_timeout: float = 60.0
    round_deadline: float = 120.0  # max seconds to wait for averaging; then the round goes solo
    compression: str = "none"  # none | fp16 | scaled-fp16 | uint8 | blockwise8
    error_feedback: bool = False
    outer_optimizer: str = "fedavg"  # fedavg | fedmom | nesterov | fedadam | fedyogi (federation/outer.py)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0  # fedmom/nesterov: μ; fedadam/fedyogi: β1
    outer_beta2: float = 0.99  # fedadam/fedyogi: second-moment decay
    outer_eps: float = 1.0e-3  # fedadam/fedyogi: τ, the adaptivity floor (Reddi et al. 2021)
    outer_lr_schedule: str = "constant"  # constant | cosine (over federation.rounds, by global round number)
    outer_warmup_rounds: int = 0  # linear outer-lr warmup over the first N global rounds
    outer_min_lr_ratio: float = 0.0  # cosine: the outer lr ends at outer_lr x this
    inner_state: str = "keep"  # keep | reset: AdamW state across rounds
    # Average round r in the background while round r+1 trains from the silo's own weights; the outer step lands
    # when the average arrives and the local progress made meanwhile is carried onto the new global weights
    # (a one-round-delayed outer update). Hides the network; see BENCHMARKS.md "Overlap" for its cost in quality.
    overlap: bool = False
    # What moves an uncompressed round's bytes: gloo (torch.distributed, C++ ring all-reduce) when every member of
    # the group is directly reachable, else hivemind's butterfly (NAT, relays, codecs). auto: gloo where it can.
    transport: str = "auto"  # auto | hivemind | gloo
    state_sync_timeout: float = 60.0
    # A stopping daemon (SIGINT/SIGTERM) that has not exited after this many seconds exits anyway: its helpers or
    # p2pd were killed under it (e.g. systemd's control-group kill) and a hivemind lock they held is never freed.
    # Checkpoints are written atomically, so the last complete one is kept. Allow for a checkpoint write.
    stop_timeout: float = 120.0
    allow_solo_start: bool = True  # start from scratch if no peer can give state in time
    # An averaging helper (`photon-peer run --helper`, on a reachable machine such as the bootstrap node's): it
    # trains nothing and joins every round with weight 0, so a round of client-mode volunteers behind NATs has a
    # peer that leads it, reduces its parts and serves the state. Its model is the swarm's, bit for bit.
    helper: bool = False
    # joining a swarm where nobody trains run_id but somebody trains a near miss of it ('run-a' for 'run-b'):
    # refused as a likely typo unless this says the run is new on purpose
    new_run: bool = False
    heartbeat_interval: float = 30.0
    record_ttl: float = 90.0
    max_rollbacks: int = 3  # non-finite guard: stop after this many rollbacks in a row
    divergence_loss: float = 0.0  # a local loss above this is treated as diverged (0 = 2·ln(vocab_size))
    # Each reducer bounds any one sender's influence on its part (federation/robust.py): clip (chunk norm and
    # weight to clip_multiplier x their median; one pass), centered_clip (CenteredClip from the coordinate median,
    # clip_iterations passes) or none (plain mean). clip and centered_clip drop a non-finite chunk. Every peer of a
    # run should use the same setting: each reducer applies its own to its part.
    robust_aggregation: str = "clip"
    # bench/scenarios.py adversary --attack fake-fingerprint (one sender of four pushing the same direction every round)
    # cost the honest silos +81% val ppl with 2 and +20% with 1; the attacker-free runs were the same with 1 and 2
    # (523.6 vs 524.9 / 523.0). 1 stays an option (README "What a bad peer can still do"): with it the sender of
    # the largest honest update is clipped (by a few %) every round and status would flag it. Pairs keep 2.
    clip_multiplier: float = 2.0
    clip_iterations: int = 3
    # A closed swarm (README "Closed swarms"): the owner's public key file (photon-peer swarm-key writes it). Only
    # peers with a token it signed average, serve or get state, and publish records. "" = an open swarm.
    swarm_owner_key: str = ""
    admission_token: str = ""  # this peer's token file (photon-peer admit), bound to its --identity's peer id


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
class ObserveConfig:
    """Optional exporters (photon_p2p/observe.py): a Prometheus endpoint and a TensorBoard event sink."""

    prometheus_port: int = 0  # serve /metrics on this port (0 = off); needs prometheus_client
    tensorboard_dir: str = ""  # write every metrics.jsonl record as TensorBoard scalars here ("" = off)


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
    observe: ObserveConfig = field(default_factory=ObserveConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "federation.compression": ("none", "fp16", "scaled-fp16", "uint8", "blockwise8"),
    "federation.outer_optimizer": ("fedavg", "fedmom", "nesterov", "fedadam", "fedyogi"),
    "federation.outer_lr_schedule": ("constant", "cosine"),
    "federation.inner_state": ("keep", "reset"),
    "federation.round_clock": ("swarm", "steps"),
    "federation.robust_aggregation": ("none", "clip", "centered_clip"),
    "federation.transport": ("auto", "hivemind", "gloo"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.parallel": ("auto", "ddp", "fsdp", "none"),
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


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``tiny``, ``photon-125m``, ...)."""
    return sorted(f.name[:-5] for f in PRESET_DIR.iterdir() if f.name.endswith(".yaml"))


def _preset(name: str) -> Traversable | None:
    """The shipped preset a bare name (``tiny`` or ``tiny.yaml``, no directory) stands for, if any."""
    if not name or "/" in name or "\\" in name:
        return None
    stem = name[:-5] if name.endswith(".yaml") else name
    preset = PRESET_DIR / f"{stem}.yaml"
    return preset if preset.is_file() else None


def resolve_config_path(name_or_path: str) -> ConfigSource:
    """A path to a YAML file, or the name of a preset shipped in photon_p2p/configs/ (e.g. ``tiny``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {name_or_path} is a directory: name a YAML file (or a preset: "
                          f"{', '.join(preset_names())})")
    preset = _preset(name_or_path)
    if preset is not None:
        return preset
    raise ConfigError(f"config file not found: {name_or_path} (presets: {', '.join(preset_names())})")


def _extends_target(src: ConfigSource, parent: str) -> ConfigSource:
    """``extends:`` is relative to the file that says it; a bare name also finds a preset."""
    if isinstance(src, Path):
        candidate = Path(parent).expanduser()
        candidate = candidate if candidate.is_absolute() else src.parent / candidate
        if candidate.is_file():
            return candidate
    return resolve_config_path(parent)


def _read_yaml(src: ConfigSource, seen: tuple[str, ...] = ()) -> list[dict]:
    """The chain of YAML documents for ``src``: its ``extends:`` parents first, then itself."""
    key = str(src.resolve()) if isinstance(src, Path) else str(src)
    if key in seen:
        raise ConfigError(f"config 'extends' cycle at {key}")
    try:
        data = yaml.safe_load(src.read_text()) or {}
    except yaml.MarkedYAMLError as e:  # FILE:LINE:COL, as editors and compilers name a place
        mark, problem = e.problem_mark or e.context_mark, e.problem or e.context
        raise ConfigError(f"{key}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {key} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {key} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {key} must contain a mapping at the top level")
    chain: list[dict] = []
    parent = data.pop("extends", None)
    if parent is not None:
        chain.extend(_read_yaml(_extends_target(src, str(parent)), seen + (key,)))
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


# The allowed range of every numeric key a user can set (floats must also be finite). tests/test_config.py fails
# when a numeric key is added to the tree without a range here, so every value is checked before anything starts.
RANGES: dict[str, str] = {
    "model.vocab_size": ">= 1", "model.d_model": ">= 1", "model.n_layers": ">= 1", "model.n_heads": ">= 1",
    "model.n_kv_heads": ">= 1", "model.ffn_hidden": ">= 1", "model.multiple_of": ">= 1", "model.seq_len": ">= 1",
    "model.rope_theta": "> 0", "model.norm_eps": "> 0", "model.init_std": "> 0",
    "data.val_fraction": "in [0, 1)", "data.seed": ">= 0",
    "train.batch_size": ">= 1", "train.grad_accum": ">= 1", "train.lr": "> 0", "train.min_lr_ratio": "in [0, 1]",
    "train.warmup_steps": ">= 0", "train.max_steps": ">= 1", "train.weight_decay": ">= 0",
    "train.beta1": "in [0, 1)", "train.beta2": "in [0, 1)", "train.eps": "> 0", "train.grad_clip": ">= 0",
    "train.eval_every": ">= 0", "train.eval_batches": ">= 1", "train.eval_batch_size": ">= 0",
    "train.checkpoint_every": ">= 1", "train.log_every": ">= 1", "train.threads": ">= 0", "train.seed": ">= 0",
    "train.dist_timeout": "> 0",
    "federation.rounds": ">= 0", "federation.local_steps": ">= 1", "federation.round_token_budget": ">= 0",
    "federation.round_time_budget": ">= 0", "federation.target_group_size": ">= 1",
    "federation.min_group_size": ">= 1", "federation.matchmaking_time": "> 0", "federation.straggler_wait": ">= 0",
    "federation.wait_fraction": "in [0, 10]",
    "federation.allreduce_timeout": "> 0", "federation.round_deadline": "> 0", "federation.outer_lr": "> 0",
    "federation.outer_momentum": "in [0, 1)", "federation.state_sync_timeout": "> 0", "federation.stop_timeout": "> 0",
    "federation.outer_beta2": "in [0, 1)", "federation.outer_eps": "> 0", "federation.outer_warmup_rounds": ">= 0",
    "federation.outer_min_lr_ratio": "in [0, 1]",
    "federation.heartbeat_interval": "in (0, 600]", "federation.record_ttl": "> 0", "federation.max_rollbacks": ">= 1",
    "federation.divergence_loss": ">= 0", "federation.clip_multiplier": "in [1, 1000]",
    "federation.clip_iterations": "in [1, 100]",
    "network.bootstrap_timeout": "> 0", "network.request_timeout": "> 0",
    "observe.prometheus_port": "in [0, 65535]",
}
_RANGE_TESTS: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 65535]": lambda v: 0 <= v <= 65535,
    "in [1, 1000]": lambda v: 1 <= v <= 1000, "in [1, 100]": lambda v: 1 <= v <= 100, "in [0, 10]": lambda v: 0 <= v <= 10,
    "in (0, 600]": lambda v: 0 < v <= 600,  # readers judge a record stale by at most 600 s beats (records.py)
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Rules of single keys that are neither a range nor a list of choices: (test, what the message says it must).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: bool(str(v).strip()), "must not be empty"),
    "run_dir": (lambda v: bool(str(v).strip()), "must not be empty"),
    "train.device": (lambda v: bool(_DEVICE.fullmatch(v)), "must be auto, cpu, cuda or cuda:N"),
    # the averager and the heartbeat publisher build DHT keys from it (they keep their own check too)
    "federation.run_id": (lambda v: bool(v) and "." not in v, "must be non-empty and contain no '.'"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_value(key: str, value: Any, flag: str = "") -> Any:
    """``value`` if it passes the rules of config key ``key`` (its range, choices, or RULES), else ConfigError.
    validate() applies this to every key; a command-line flag that stands for a key (eval --batches,
    status --timeout) goes through it too, with ``flag`` named first in the message: the one the user typed."""
    where = f"{flag} (config key '{key}')" if flag else f"config key '{key}'"
    if value is None:
        return value  # Optional keys (n_kv_heads, ffn_hidden): None means "derive it"
    if key in RANGES:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
        if not _RANGE_TESTS[RANGES[key]](value):
            raise ConfigError(f"{where} must be {RANGES[key]}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:  # again: a Config built in code never went through _merge
        raise ConfigError(f"{where} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RULES and not RULES[key][0](value):
        raise ConfigError(f"{where} {RULES[key][1]}, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Every rule a config must pass, checked once before anything starts (data preparation, the DHT, the
    averager), so a mistake is a one-line ConfigError instead of a traceback minutes into a run."""
    for key in (*RANGES, *CHOICES, *RULES):
        check_value(key, _get(cfg, key))
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.d_model / model.n_heads must be even for rotary embeddings")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    _validate_federation(cfg.federation)
    if cfg.federation.helper and cfg.network.client_mode:
        raise ConfigError("federation.helper needs a reachable peer: an averaging helper leads rounds and reduces "
                          "the parts of client-mode volunteers, so it cannot run in client mode itself")
    if cfg.federation.helper and cfg.federation.round_clock != "swarm":
        raise ConfigError("federation.helper needs federation.round_clock: swarm (a helper trains nothing and "
                          "learns when the others' round ends from the swarm clock's records)")
    if cfg.federation.transport == "gloo" and cfg.network.client_mode:
        raise ConfigError("federation.transport 'gloo' needs peers that others can dial; a client-mode peer "
                          "(network.client_mode) cannot use it (use transport: auto)")
    if cfg.federation.transport == "gloo" and cfg.federation.swarm_owner_key:
        # gloo's rendezvous (a TCPStore) and its traffic are not authenticated: anyone who reaches the port could
        # join a closed swarm's round or corrupt it. auto keeps a closed swarm on hivemind's authenticated streams.
        raise ConfigError("federation.transport 'gloo' is not allowed in a closed swarm (federation.swarm_owner_key): "
                          "its connections are not authenticated (use transport: auto or hivemind)")
    validate_network(cfg.network)
    _validate_admission(cfg.federation, cfg.network)
    _validate_observe(cfg.observe)


def _validate_federation(f: FederationConfig) -> None:
    # The same rules the averager and the heartbeat publisher enforce once they start (they keep theirs as a
    # last line of defence); here they fail before data preparation and the DHT.
    if f.min_group_size > f.target_group_size:
        raise ConfigError(f"federation.min_group_size ({f.min_group_size}) must be <= federation.target_group_size "
                          f"({f.target_group_size})")
    margin = f.matchmaking_time * 1.25 + 0.5
    if f.round_deadline <= margin:
        raise ConfigError(f"federation.round_deadline ({f.round_deadline:g}s) must exceed 1.25 x "
                          f"federation.matchmaking_time + 0.5s (= {margin:g}s): a group needs time to form")
    if f.record_ttl <= f.heartbeat_interval:
        raise ConfigError(f"federation.record_ttl ({f.record_ttl:g}s) must exceed federation.heartbeat_interval "
                          f"({f.heartbeat_interval:g}s), or live peers expire between two heartbeats")
    if f.outer_lr_schedule == "cosine" and f.rounds == 0:
        raise ConfigError("federation.outer_lr_schedule 'cosine' needs federation.rounds > 0 (the schedule's length)")
    if f.transport == "gloo" and f.compression != "none":
        raise ConfigError(f"federation.transport 'gloo' moves uncompressed rounds only; federation.compression is "
                          f"{f.compression!r} (use transport: auto or hivemind, or compression: none)")
    if f.compression == "blockwise8" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("federation.compression 'blockwise8' needs bitsandbytes (pip install bitsandbytes)")


def _validate_admission(f: FederationConfig, net: NetworkConfig) -> None:
    """A closed swarm needs the owner's key, a stable identity and this identity's valid token, checked here."""
    if not f.swarm_owner_key:
        if f.admission_token:
            raise ConfigError("federation.admission_token (--token) is set but federation.swarm_owner_key "
                              "(--swarm-owner-key) is not: a token means nothing without the owner key that signed it")
        return
    from photon_p2p.credentials import CredentialError, check_token, load_owner_public, peer_id_of_identity

    try:
        public = load_owner_public(f.swarm_owner_key)
        if not net.identity_path:
            raise ConfigError("a closed swarm (federation.swarm_owner_key) needs network.identity_path / --identity: "
                              "the admission token is bound to the peer id that identity file keeps")
        if not Path(net.identity_path).expanduser().exists():
            raise ConfigError(f"identity file {net.identity_path} does not exist: create it with `photon-peer "
                              f"peer-id --identity {net.identity_path}` and ask the owner to admit that peer id")
        if not f.admission_token:
            raise ConfigError("a closed swarm needs federation.admission_token / --token: the owner makes one with "
                              f"`photon-peer admit --peer-id {peer_id_of_identity(net.identity_path)} "
                              f"--run-id {f.run_id}`")
        check_token(f.admission_token, public, peer_id_of_identity(net.identity_path), run_id=f.run_id)
    except CredentialError as e:
        raise ConfigError(str(e)) from None


def validate_network(net: NetworkConfig) -> None:
    """Addresses parse as multiaddrs (initial peers with /p2p/<id>, announced ones with an explicit port) and an
    existing identity file is a private key; also used by `bootstrap` and `status`, which have no full config."""
    for key, addrs in (("network.initial_peers", net.initial_peers), ("network.host_maddrs", net.host_maddrs),
                       ("network.announce_maddrs", net.announce_maddrs)):
        where = f"{key} / --{key.split('.')[1].replace('_', '-')}"  # the config key and its command-line flag
        for text in addrs:
            try:  # imported only when there is an address: a training-only machine needs no network stack
                import multiaddr
            except ImportError:
                raise ConfigError(f"{where} needs the multiaddr package (pip install multiaddr)") from None
            try:
                maddr = multiaddr.Multiaddr(text.strip())
                names = [p.name for p in maddr.protocols()]
            except Exception as e:  # the library raises several types; any of them means "not an address"
                reason = str(e).split("\n")[0].split(" (string:")[0]
                reason = reason.split("': ", 1)[-1] or type(e).__name__  # "Invalid MultiAddr 'x': <why>" -> why
                raise ConfigError(f"invalid multiaddr in {where}: {text!r} ({reason})") from None
            if key == "network.initial_peers" and "p2p" not in names:
                raise ConfigError(f"invalid multiaddr in {where}: {text!r} (missing /p2p/<peer id>: copy the full "
                                  "address a running peer prints)")
            if key == "network.announce_maddrs":
                ports = [maddr.value_for_protocol(proto) for proto in ("tcp", "udp") if proto in names]
                if not ports or any(str(port) == "0" for port in ports):
                    raise ConfigError(f"invalid multiaddr in {where}: {text!r} (needs an explicit, non-zero port: "
                                      "the one other peers dial)")
    if net.identity_path:
        check_identity_file(net.identity_path)


def check_identity_file(path: str) -> None:
    """A missing identity file is fine (hivemind creates one); an existing one must be a libp2p private key, or
    p2pd fails deep inside the DHT start with a protobuf message that names no file."""
    p = Path(path).expanduser()
    if not p.exists():
        return
    where = f"identity file {p} (network.identity_path / --identity)"
    if not p.is_file():
        raise ConfigError(f"{where} is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror}") from None
    if not _is_private_key(data):
        raise ConfigError(f"{where} is not a private key: point it at a key file a peer wrote, or at a path that "
                          "does not exist yet to create a new identity there")


def _is_private_key(data: bytes) -> bool:
    # hivemind's protobuf module (it imports hivemind, so only when an identity file exists: the peer is about to
    # start hivemind anyway). An empty file parses as an empty message, so the key bytes are checked too.
    from hivemind.proto import crypto_pb2

    try:
        key = crypto_pb2.PrivateKey.FromString(data)
    except Exception:  # google.protobuf DecodeError, or RuntimeWarning-style errors from the C++ parser
        return False
    if not key.data or key.key_type not in crypto_pb2.KeyType.values():
        return False
    if key.key_type == crypto_pb2.KeyType.RSA:  # the kind hivemind writes: DER that p2pd will unmarshal
        try:
            from cryptography.hazmat.primitives.serialization import load_der_private_key
        except ImportError:
            return True
        try:
            load_der_private_key(key.data, password=None)
        except Exception:  # ValueError/TypeError/UnsupportedAlgorithm: not a key p2pd can load either
            return False
    return True


def _validate_observe(o: ObserveConfig) -> None:
    # Optional packages are checked here, not when the exporter starts after data preparation and the DHT.
    if o.prometheus_port and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError("observe.prometheus_port is set but prometheus_client is not installed "
                          "(pip install prometheus_client)")
    if o.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("observe.tensorboard_dir is set but the tensorboard package is not installed "
                          "(pip install 'photon_p2p[tensorboard]')")

def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
