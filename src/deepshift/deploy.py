"""From a finished run to deployment artefacts: load a run / checkpoint / packed file, export, report.

The ``deepshift export``, ``deepshift report`` and ``deepshift eval --packed`` commands are thin
wrappers over these functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import convert_, shift_layers
from .export import _MAX_HEADER, PackedFormatError, load_packed, save_packed
from .freeze import freeze_
from .modules import is_frozen_layer


class DeployError(ValueError):
    """A source that cannot be exported or reported (missing, float-only, unknown input shape)."""


def default_input_shape(model_name: str | None, data: str | None = None,
                        image_size: int = 224) -> tuple[int, ...] | None:
    """Input shape (without batch) a zoo model / dataset expects, or None when unknown."""
    if data in ("digits", "mnist", "fashion-mnist"):
        return (1, 28, 28)
    if data == "cifar10":
        return (3, 32, 32)
    if data == "imagefolder":
        return (3, image_size, image_size)
    if model_name is None:
        return None
    if model_name.startswith("mnist-"):
        return (1, 28, 28)
    if model_name.startswith(("imagenet-", "torchvision:")):
        return (3, 224, 224)
    return (3, 32, 32)  # the CIFAR zoo


def _is_packed_file(path: Path) -> bool:
    if path.suffix == ".dshift":
        return True
    with open(path, "rb") as fh:  # a safetensors file starts with a small header length and '{'
        head = fh.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < _MAX_HEADER and head[8:] == b"{"


def load_source(source: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model for deployment from a run folder (its ``best.pt``), a checkpoint, or a packed file.

    Returns ``(model, info)``: a converted model (checkpoints) or a frozen one (packed files), in
    eval mode, and ``info`` with ``"kind"`` (checkpoint|packed), ``"model"`` (zoo name or None),
    ``"data"`` (dataset name or None) and ``"input_shape"`` (or None when it cannot be told).
    """
    from .train import TrainConfig, _load_into, load_checkpoint

    path = Path(source)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise DeployError(f"{source}: no such run folder, checkpoint or packed file")
    if _is_packed_file(path):
        model = load_packed(path)
        spec = getattr(model, "zoo_spec", None) or {}
        name = spec.get("name")
        return model, {"kind": "packed", "model": name, "data": None,
                       "input_shape": default_input_shape(name)}
    ckpt = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        spec = ckpt["zoo_spec"]
        from .models import build_model

        model = build_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeployError(f"{path} is not a deepshift training checkpoint ({exc})") from None
    shift_cfg = cfg.shift_config()
    if shift_cfg is not None:
        convert_(model, shift_cfg, depth=cfg.shift_depth)
    _load_into(model, ckpt["model"], path, "checkpoint")
    return model.eval(), {"kind": "checkpoint", "model": spec["name"], "data": cfg.data,
                          "input_shape": default_input_shape(spec["name"], cfg.data, cfg.image_size)}


def _require_shift_layers(model: nn.Module, source) -> None:
    if not shift_layers(model) and not any(is_frozen_layer(m) for m in model.modules()):
        raise DeployError(f"{source} has no shift layers (a float run): train with --method q or ps")


def export(source: str | os.PathLike, fmt: str, output: str | os.PathLike,
           act_bits: tuple[int, int] | None = None, onnx_mode: str = "fixed_point",
           input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Export ``source`` to a packed file (``fmt="packed"``) or ONNX (``fmt="onnx"``); returns a summary."""
    model, info = load_source(source)
    _require_shift_layers(model, source)
    if fmt == "packed":
        size = save_packed(model, output, act_bits=act_bits)
        from .export import compression_report

        return {"path": str(output), "bytes": size, **compression_report(model, act_bits)}
    if fmt == "onnx":
        shape = input_shape or info["input_shape"]
        if shape is None:
            raise DeployError("cannot tell the model's input shape: pass --input-shape")
        from .onnx_export import export_onnx

        frozen = model if info["kind"] == "packed" else freeze_(model, act_bits=act_bits)
        export_onnx(frozen, torch.zeros((1, *shape)), output, mode=onnx_mode)
        return {"path": str(output), "bytes": Path(output).stat().st_size, "input_shape": list(shape)}
    raise DeployError(f"format {fmt!r} is not allowed; choose packed or onnx")


def report(source: str | os.PathLike, input_shape: tuple[int, ...] | None = None):
    """The :class:`~deepshift.report.Report` of ``source`` (run folder, checkpoint or packed file)."""
    from .report import savings_report

    model, info = load_source(source)
    _require_shift_layers(model, source)
    shape = input_shape or info["input_shape"]
    if shape is None:
        raise DeployError("cannot tell the model's input shape: pass --input-shape")
    return savings_report(model, tuple(shape))


__all__ = ["DeployError", "PackedFormatError", "default_input_shape", "export", "load_source", "report"]
