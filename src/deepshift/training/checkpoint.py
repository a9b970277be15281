"""Training checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deepshift.files import atomic_path
from deepshift.training.config import CheckpointError

CHECKPOINT_FORMAT = "deepshift-train-checkpoint"


CHECKPOINT_VERSION = 1


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``; any failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, refused globals: all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): "
                              f"{reason[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict (not a deepshift checkpoint)")
    return obj


def _state_dict_of(ckpt: dict, path) -> dict:
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt["model"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a plain state_dict saved by the user
    raise CheckpointError(f"{path} is neither a deepshift checkpoint nor a state_dict")


def _load_into(model: nn.Module, state: dict, path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{what} {path} does not fit this model: {first}") from None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
