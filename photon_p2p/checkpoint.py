"""Atomic checkpoints (temp file + fsync + rename), composed from stateful parts: model, optimizers, cursor, round."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, wrong format); one-line message."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` so that a crash at any moment leaves either the old or the new file, never half of one."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a run directory holding one) with weights_only, i.e. no code execution."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    return state


class Stateful(Protocol):
    """A part of a checkpoint: torch's convention (modules, optimizers, the trainer, the global state)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Part:
    """A stateful part from two callables, for state whose accessors are named otherwise (or that is only saved:
    the config is checked before a resume, never loaded from the checkpoint)."""

    save: Callable[[], Any]
    load: Callable[[Any], None] = lambda _state: None

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state: Any) -> None:
        self.load(state)


class CheckpointManager:
    """The run dir's checkpoint as one key per stateful part (torchtitan's ``CheckpointManager(states=...)``):
    ``save`` writes every part atomically; ``restore`` hands each part its own key, in the order given."""

    def __init__(self, run_dir: str | Path, states: dict[str, Stateful]) -> None:
        self.run_dir, self.states = Path(run_dir), states

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, {key: part.state_dict() for key, part in self.states.items()})

    def restore(self, saved: dict[str, Any]) -> None:
        for key, part in self.states.items():
            if key in saved:
                part.load_state_dict(saved[key])
