"""What the ``deepshift`` commands do, thinly over the library: train / resume, eval, compare,
calibrate (post-training conversion of a float run), finetune-bn (the BatchNorm-aware fine-tune
for integer-only models), and from a finished run to deployment
artefacts (load a run folder, checkpoint or packed file; export
it packed or as ONNX; report its savings).

Every user error (bad option value, missing or corrupt data, unreadable checkpoint or packed file,
non-empty output folder) prints one line ``deepshift: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshift._version import __version__
from deepshift.cli.parser import EXIT_USAGE, build_parser
from deepshift.core.convert import convert_, shift_layers
from deepshift.formats.packed import _MAX_HEADER, PackedFormatError, load_packed, save_packed
from deepshift.frozen.freeze import frozen_copy
from deepshift.frozen.integer import is_deployed_shift_layer
from deepshift.frozen.layers import ShiftConvNd, is_frozen_layer
from deepshift.models import LANGUAGE_MODELS, input_shape


class DeployError(ValueError):
    """A source that cannot be exported or reported (missing, float-only, unknown input shape)."""


def default_input_shape(model_name: str | None, data: str | None = None,
                        image_size: int = 224) -> tuple[int, ...] | None:
    """Input shape (without batch) of a model trained on ``data`` (the dataset's images), else of the
    zoo model (see :func:`deepshift.models.input_shape`); None when unknown."""
    if data in ("digits", "mnist", "fashion-mnist"):
        return (1, 28, 28)
    if data == "cifar10":
        return (3, 32, 32)
    if data == "imagefolder":
        return (3, image_size, image_size)
    return None if model_name is None else input_shape(model_name)


def _is_packed_file(path: Path) -> bool:
    if path.suffix == ".dshift":
        return True
    with open(path, "rb") as fh:  # a safetensors file starts with a small header length and '{'
        head = fh.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < _MAX_HEADER and head[8:] == b"{"


def _checkpoint_in(source: str | os.PathLike) -> Path:
    """A run folder's checkpoint (its ``best.pt``), or ``source`` itself (a checkpoint or packed file)."""
    path = Path(source)
    return path / "best.pt" if path.is_dir() else path


def load_source(source: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model for deployment from a run folder (its ``best.pt``), a checkpoint, or a packed file.

    Returns ``(model, info)``: a converted model (checkpoints) or a frozen one (packed files), in
    eval mode, and ``info`` with ``"kind"`` (checkpoint|packed), ``"model"`` (zoo name or None),
    ``"data"`` (dataset name or None) and ``"input_shape"`` (or None when it cannot be told); for
    checkpoints also ``"config"`` (the run's TrainConfig) and ``"zoo_spec"``.
    """
    from deepshift.training.checkpoint import _load_into, load_checkpoint
    from deepshift.training.config import TrainConfig

    path = _checkpoint_in(source)
    if not path.is_file():
        raise DeployError(f"{source}: no such run folder, checkpoint or packed file")
    if _is_packed_file(path):
        model = load_packed(path)
        spec = getattr(model, "zoo_spec", None) or {}
        name = spec.get("name")
        recipe = getattr(model, "integer_recipe", None)  # an integer-only file knows its input shape
        return model, {"kind": "packed", "model": name, "data": None,
                       "input_shape": tuple(recipe["input_shape"]) if recipe else default_input_shape(name)}
    ckpt = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        spec = ckpt["zoo_spec"]
        from deepshift.models import build_model

        model = build_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeployError(f"{path} is not a deepshift training checkpoint ({exc})") from None
    shift_cfg = cfg.shift_config()
    if shift_cfg is not None:
        convert_(model, shift_cfg, depth=cfg.shift_depth)
    _load_into(model, ckpt["model"], path, "checkpoint")
    return model.eval(), {"kind": "checkpoint", "model": spec["name"], "data": cfg.data,
                          "input_shape": default_input_shape(spec["name"], cfg.data, cfg.image_size),
                          "config": cfg, "zoo_spec": spec}


def _input_dtype(info: dict[str, Any]) -> torch.dtype:
    """int64 tokens for a language model, float32 images otherwise."""
    return torch.int64 if info.get("model") in LANGUAGE_MODELS else torch.float32


def _require_shift_layers(model: nn.Module, source) -> None:
    if not shift_layers(model) and not any(is_deployed_shift_layer(m) for m in model.modules()):
        raise DeployError(f"{source} has no shift layers (a float run): train with --method q or ps")


def export(source: str | os.PathLike, fmt: str, output: str | os.PathLike,
           act_bits: tuple[int, int] | None = None, onnx_mode: str = "fixed_point",
           input_shape: tuple[int, ...] | None = None, integer_only: bool = False,
           scale_terms: int = 3) -> dict[str, Any]:
    """Export ``source`` to a packed file (``fmt="packed"``) or ONNX (``fmt="onnx"``); returns a summary.
    ``integer_only``: the integer-only model (``scale_terms`` signed powers of two per BatchNorm
    scale): a packed file that loads as it, or its int64 ONNX graph."""
    model, info = load_source(source)
    _require_shift_layers(model, source)
    if fmt not in ("packed", "onnx"):
        raise DeployError(f"format {fmt!r} is not allowed; choose packed or onnx")
    if getattr(model, "integer_recipe", None) is not None:
        raise DeployError(f"{source} is an integer-only packed file already: export its frozen source")
    if integer_only and onnx_mode != "fixed_point":
        raise DeployError("--integer-only exports the integer model itself: --onnx-mode does not apply")
    frozen = frozen_copy(model, act_bits)  # a packed file's model is frozen already
    shape = input_shape or info["input_shape"]
    if (integer_only or fmt == "onnx") and shape is None:
        raise DeployError("cannot tell the model's input shape: pass --input-shape")
    if fmt == "packed":
        recipe = {"input_shape": list(shape), "scale_terms": scale_terms} if integer_only else None
        try:
            size = save_packed(frozen, output, integer_only=recipe)
        except ValueError as e:
            raise DeployError(str(e)) from e
        from deepshift.report import compression_report

        return {"path": str(output), "bytes": size, **compression_report(frozen)}
    if fmt == "onnx":
        from deepshift.formats.onnx import export_onnx

        example = torch.zeros((1, *shape), dtype=_input_dtype(info))
        graph = frozen
        if integer_only:
            from deepshift.frozen.integer import integer_only as to_integer

            try:
                graph = to_integer(frozen, example, scale_terms=scale_terms)
            except ValueError as e:
                raise DeployError(str(e)) from e
        try:
            export_onnx(graph, example, output, mode=onnx_mode)
        except ValueError as e:
            raise DeployError(str(e)) from e
        return {"path": str(output), "bytes": Path(output).stat().st_size, "input_shape": list(shape)}


def report(source: str | os.PathLike, input_shape: tuple[int, ...] | None = None):
    """The :class:`~deepshift.report.Report` of ``source`` (run folder, checkpoint or packed file)."""
    from deepshift.report import savings_report

    model, info = load_source(source)
    _require_shift_layers(model, source)
    shape = input_shape or info["input_shape"]
    if shape is None:
        raise DeployError("cannot tell the model's input shape: pass --input-shape")
    return savings_report(model, tuple(shape), input_dtype=_input_dtype(info))







def _cmd_export(args: argparse.Namespace) -> int:
    from deepshift.cli.commands import export

    act = tuple(args.act_bits) if args.act_bits else None
    shape = tuple(args.input_shape) if args.input_shape else None
    info = export(args.source, args.format, args.output, act_bits=act, onnx_mode=args.onnx_mode,
                  input_shape=shape, integer_only=args.integer_only, scale_terms=args.scale_terms)
    line = f"wrote {info['path']} ({info['bytes']:,} bytes)"
    if args.format == "packed":
        line += (f"; shift weights {info['float32_weight_bytes']:,} B float32 -> "
                 f"{info['packed_weight_bytes']:,} B packed ({info['weight_ratio']:.2f}x), "
                 f"whole model {info['total_ratio']:.2f}x smaller than float32")
    print(line)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from deepshift.cli.commands import report
    from deepshift.report import plot_shift_histograms

    rep = report(args.source, tuple(args.input_shape) if args.input_shape else None)
    print(rep.to_json() if args.json else rep.table())
    if args.plot:
        plot_shift_histograms(rep, args.plot, title=f"shift values per layer: {args.source}")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _eval_packed(args: argparse.Namespace) -> dict:
    from deepshift.cli.commands import DeployError, load_source
    from deepshift.training.config import resolve_device
    from deepshift.training.data.datasets import load_dataset
    from deepshift.training.data.loader import BatchLoader
    from deepshift.training.evaluate import evaluate

    if not args.data:
        raise DeployError("eval --packed needs --data (the dataset to evaluate on)")
    from deepshift.frozen.fuse import fuse_frozen

    model, _ = load_source(args.packed)
    if any(isinstance(m, ShiftConvNd) for m in model.modules()):
        model = fuse_frozen(model)  # BatchNorm / residual / ReLU inside the convs: same numbers, faster
    splits = load_dataset(args.data, args.data_dir)
    loader = BatchLoader(getattr(splits, args.split), args.batch_size or 256, train=False)
    return evaluate(model, loader, resolve_device(args.device), quiet=args.quiet, desc=args.split)


def _config_from_args(args: argparse.Namespace):
    from deepshift.training.config import TrainConfig

    names = set(TrainConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    if kwargs.get("data") == "auto":
        from deepshift.training.data.datasets import default_dataset

        kwargs["data"] = default_dataset()
    if kwargs.get("act_bits") is not None:
        kwargs["act_bits"] = tuple(kwargs["act_bits"])
    return TrainConfig(**kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    from deepshift.training.loop import resume, train

    if args.list_models:
        from deepshift.models import model_names

        print("\n".join(model_names()))
        return 0
    if args.resume:
        resume(args.resume, quiet=args.quiet or None, epochs=args.epochs, dist_backend=args.dist_backend,
               device=None if args.device == "auto" else args.device)
    else:
        train(_config_from_args(args))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from deepshift.training.evaluate import evaluate_checkpoint

    if args.packed:
        m = _eval_packed(args)
    else:
        m = evaluate_checkpoint(_checkpoint_in(args.from_checkpoint), split=args.split,
                                data_dir=args.data_dir, device=args.device, batch_size=args.batch_size,
                                quiet=args.quiet)
    if args.json:
        print(json.dumps(m, sort_keys=True))
    else:
        ppl = f"perplexity {m['perplexity']:.3f}  " if "perplexity" in m else ""
        print(f"{args.split} {ppl}top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  loss {m['loss']:.4f}  "
              f"({m['n']} {'positions' if ppl else 'examples'})")
    return 0


def _write_run_folder(out: Path, cfg, zoo_spec: dict, model: nn.Module, key: str, metrics: dict) -> None:
    """A run folder made without the training loop (calibrate, finetune-bn): best.pt (the checkpoint
    `eval`, `export` and `report` read, with ``metrics`` under ``key``), config.json, metrics.json."""
    from deepshift.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
    from deepshift.training.run_dir import _write_json

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                     "deepshift_version": __version__, "config": cfg.to_dict(),
                     "shift_config": cfg.shift_config().to_dict(), "zoo_spec": zoo_spec,
                     "model": model.state_dict(), key: metrics}, out / "best.pt")
    _write_json(out / "config.json", cfg.to_dict())
    _write_json(out / "metrics.json", metrics)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from deepshift.core.calibrate import calibrate_
    from deepshift.training.config import ConfigError
    from deepshift.training.data.datasets import load_dataset
    from deepshift.training.data.loader import BatchLoader
    from deepshift.training.evaluate import evaluate
    from deepshift.training.run_dir import check_output_dir

    path = _checkpoint_in(args.source)  # the checkpoint, as from_checkpoint records it
    float_model, info = load_source(path)
    if info["kind"] != "checkpoint" or shift_layers(float_model):
        raise DeployError(f"{args.source} is not a float training run: calibrate the float model it "
                          "came from")
    if args.calib_size < 1:
        raise ConfigError(f"--calib-size must be >= 1, got {args.calib_size}")
    ckpt_cfg = info["config"]
    max_shift = args.max_shift if args.max_shift == "auto" else _int_option("--max-shift", args.max_shift)
    cfg = replace(ckpt_cfg, method=args.method, weight_bits=args.weight_bits, max_shift=max_shift,
                  act_bits=None if args.act_bits is None else tuple(args.act_bits), shift_depth=None,
                  out=str(args.out), data_dir=args.data_dir or ckpt_cfg.data_dir, from_checkpoint=str(path))
    shift_cfg = cfg.shift_config()
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size,
                          cfg.workers)
    # A fixed random sample of the training split: several classes, never a validation or test image.
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))
    picked = order[: args.calib_size]
    batches = [splits.train.get_batch(picked[i:i + 64], train=False)[0] for i in range(0, len(picked), 64)]
    model = convert_(copy.deepcopy(float_model), shift_cfg)
    t0 = time.perf_counter()
    calibrate_(model, batches, reference=float_model, max_samples=args.calib_size, iters=args.iters,
               channel_scales=args.channel_scales, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    val = BatchLoader(splits.val, cfg.batch_size or 256, train=False)
    plain = convert_(copy.deepcopy(float_model), shift_cfg).eval()
    metrics = {"calibrate_seconds": seconds, "calib_size": len(picked), "iters": args.iters,
               "channel_scales": args.channel_scales,
               "val_top1_float": evaluate(float_model, val)["top1"],
               "val_top1_converted": evaluate(plain, val)["top1"],
               "val_top1": evaluate(model.eval(), val)["top1"]}
    _write_run_folder(out, cfg, info["zoo_spec"], model, "calibration", metrics)
    if not args.quiet:
        print(f"val top-1: float {metrics['val_top1_float']:.2f}, converted "
              f"{metrics['val_top1_converted']:.2f}, calibrated {metrics['val_top1']:.2f} "
              f"({seconds:.1f} s); wrote {out}")
    return 0


def _cmd_finetune_bn(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from deepshift.core.batchnorm import check_finetune_args, finetune_batchnorm_, round_batchnorm_scales_
    from deepshift.training.config import ConfigError
    from deepshift.training.data.datasets import load_dataset
    from deepshift.training.data.loader import BatchLoader
    from deepshift.training.evaluate import evaluate, flat_predictions
    from deepshift.training.run_dir import check_output_dir

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:  # before the data loads: the library's own checks, as option errors
        check_finetune_args(args.scale_terms, args.steps, args.lr)
    except ValueError as exc:  # "scale_terms must be ...": named as the option
        option = "--" + str(exc).split()[0].replace("_", "-")
        raise ConfigError(f"{option}: {exc}") from None
    model, info = load_source(args.source)
    if info["kind"] != "checkpoint" or not shift_layers(model):
        raise DeployError(f"{args.source} is not a converted training run (deepshift train --method q/ps "
                          "or deepshift calibrate): nothing to make integer-only")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise DeployError(f"{args.source}: the model has no BatchNorm; its integer-only form has no "
                          "scales to round, so there is nothing to fine-tune")
    cfg = replace(info["config"], out=str(args.out), data_dir=args.data_dir or info["config"].data_dir)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size,
                          cfg.workers)
    batch = args.batch_size or cfg.batch_size or 64
    val = BatchLoader(splits.val, max(batch, 256), train=False)
    metrics: dict[str, Any] = {"source": str(args.source), "scale_terms": args.scale_terms,
                               "steps": args.steps, "lr": args.lr, "batch_size": batch,
                               "val_top1_before": evaluate(model, val)["top1"],
                               "val_top1_rounded": evaluate(round_batchnorm_scales_(copy.deepcopy(model),
                                                                                    args.scale_terms),
                                                            val)["top1"]}
    torch.manual_seed(cfg.seed)

    def loss(logits, y):
        return torch.nn.functional.cross_entropy(*flat_predictions(logits, y))

    try:
        batches = BatchLoader(splits.train, batch, train=True, seed=cfg.seed)
        result = finetune_batchnorm_(model, batches, args.scale_terms, steps=args.steps, lr=args.lr,
                                     loss_fn=loss, progress=not args.quiet)
    except FloatingPointError as exc:
        raise ConfigError(f"{exc} (--lr)") from None
    metrics.update(seconds=result["seconds"], first_loss=result["first_loss"], last_loss=result["last_loss"],
                   val_top1=evaluate(model.eval(), val)["top1"])
    _write_run_folder(out, cfg, info["zoo_spec"], model, "bn_finetune", metrics)
    if not args.quiet:
        print(f"val top-1: before {metrics['val_top1_before']:.2f}, BatchNorm scales rounded to "
              f"{args.scale_terms} term(s) {metrics['val_top1_rounded']:.2f}, fine-tuned "
              f"{metrics['val_top1']:.2f} ({result['seconds']:.1f} s); wrote {out}")
    return 0


def _int_option(name: str, value: str) -> int:
    from deepshift.training.config import ConfigError

    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be 'auto' or an integer, got {value!r}") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from deepshift.training.loop import train

    base = _config_from_args(args)
    rows = []
    for label, method in (("float", "none"), ("Q", "q"), ("PS", "ps")):
        cfg = replace(base, method=method, out=str(Path(base.out) / label.lower()))
        if not base.quiet:
            print(f"== {label} ==", flush=True)
        m = train(cfg)
        # Language models: perplexity per byte in place of top-5.
        rows.append((label, m["test_top1"], m.get("test_perplexity", m["test_top5"]), m["seconds_per_epoch"]))
    third = "perplexity" if base.data in ("fortunes", "text") else "test top-5"
    print(f"{base.data}, {base.model or 'default model'}, {base.epochs or 'default'} epochs")
    print(f"{'method':<8}{'test top-1':>11}{third:>11}{'s/epoch':>9}")
    for label, top1, other, spe in rows:
        print(f"{label:<8}{top1:>11.2f}{other:>11.2f}{spe:>9.1f}")
    return 0


def generate(source: str | os.PathLike, prompt: str, tokens: int, temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0, frozen: bool = False) -> dict[str, Any]:
    """Sample ``tokens`` bytes from a language model after ``prompt``; returns the text and speed.

    ``source`` is a run folder, checkpoint (float or converted) or packed file (frozen);
    ``frozen`` freezes a converted checkpoint first (what a packed export would run).
    """
    model, info = load_source(source)
    if info["model"] not in LANGUAGE_MODELS:
        raise DeployError(f"{source} holds {info['model'] or 'an unknown model'}, not a language model "
                          f"({', '.join(LANGUAGE_MODELS)})")
    if tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise DeployError("--tokens and --top-k must be >= 1 and --temperature >= 0")
    if not prompt:
        raise DeployError("--prompt must not be empty")
    if frozen:
        _require_shift_layers(model, source)
        model = frozen_copy(model).eval()
    kind = ("frozen" if any(is_frozen_layer(m) for m in model.modules())
            else "converted" if shift_layers(model) else "float")
    ids = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(ids, tokens, temperature=temperature, top_k=top_k, generator=generator)
    seconds = time.perf_counter() - start
    return {"text": bytes(out.tolist()).decode("utf-8", errors="replace"), "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "kind": kind}


def _cmd_generate(args: argparse.Namespace) -> int:
    info = generate(args.source, args.prompt, args.tokens, args.temperature, args.top_k, args.seed,
                    args.frozen)
    print(info["text"])
    print(f"-- {info['tokens']} tokens in {info['seconds']:.2f} s: {info['tokens_per_second']:.1f} tokens/s "
          f"({info['kind']} model, batch 1, {torch.get_num_threads()} threads)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepshift`` console script; returns the exit status."""
    from deepshift.cli.commands import DeployError
    from deepshift.models import UnknownModelError
    from deepshift.training.config import TrainError
    from deepshift.training.data.readers import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    handler = {"train": _cmd_train, "eval": _cmd_eval, "compare": _cmd_compare, "export": _cmd_export,
               "report": _cmd_report, "calibrate": _cmd_calibrate, "generate": _cmd_generate,
               "finetune-bn": _cmd_finetune_bn}[args.command]
    try:
        return handler(args)
    except (TrainError, DataError, UnknownModelError, DeployError, PackedFormatError) as exc:
        message = " ".join(str(exc).split())
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"deepshift: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deepshift: interrupted", file=sys.stderr)
        return 130

