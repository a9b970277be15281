"""The packed file format: safetensors with bit-packed shift codes and a checked JSON header.

Layout (a valid safetensors file; ``safetensors.torch.load_file`` reads it):

* 8 bytes: little-endian length of the JSON header; the header (space-padded to a multiple of 8);
  then the tensor data, contiguous, in the order of the header's ``data_offsets``.
* Tensors: the frozen model's whole ``state_dict``: per shift layer ``<name>.codes`` (uint8,
  ``weight_bits`` bits per weight, see :mod:`deepshift.ops.codes`) and ``<name>.bias_int`` (int32
  fixed point), and every other tensor (BatchNorm statistics, float layers, ...) as is.
* ``__metadata__`` (strings only, as safetensors requires):
  ``"deepshift"``: JSON ``{"format": "deepshift.packed", "version": 1, "layers": {name: spec},
  "zoo": {"name", "kwargs"} or null, "library": version}``, where a layer spec is
  :meth:`ShiftLinear.spec` / :meth:`ShiftConvNd.spec` (weight shape, bits, method, used shift
  range, act_bits, convolution options, the training config);
  ``"deepshift_sha256"``: SHA-256 of the whole file with this 64-hex-digit value replaced by
  64 zeros, so any changed byte -- header or data -- is detected.

Loading never unpickles anything: the header is parsed with ``json`` and tensors are built with
``torch.frombuffer``. Every problem with a file raises :class:`PackedFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshift.core.replace import replace_modules
from deepshift.files import atomic_path
from deepshift.frozen.attention import ShiftMultiheadAttention
from deepshift.frozen.float_layers import freeze_float_layers_
from deepshift.frozen.freeze import frozen_copy, without_attention_fast_path
from deepshift.frozen.integer import IntegerShiftLayer, integer_only
from deepshift.frozen.layers import _FrozenShift, frozen_from_spec, is_frozen_layer
from deepshift.frozen.spec import FrozenSpec
from deepshift.ops.codes import packed_numel

FORMAT_NAME = "deepshift.packed"


FORMAT_VERSION = 1


_META_KEY = "deepshift"


_SUM_KEY = "deepshift_sha256"


_ZERO_SUM = "0" * 64


_MAX_HEADER = 64 * 1024 * 1024  # far above any real header; bounds what a corrupt length can ask


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


_NAMES = {v: k for k, v in _DTYPES.items()}


class PackedFormatError(ValueError):
    """A packed file is truncated, corrupted, of another version, inconsistent, not a deepshift
    packed file, or does not fit the model it is loaded into."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _seal(header_bytes: bytes, data: bytes) -> bytes:
    """Fill the checksum placeholder of ``header_bytes`` and return the complete file."""
    placeholder = f'"{_SUM_KEY}":"{_ZERO_SUM}"'.encode()
    if header_bytes.count(placeholder) != 1:
        raise ValueError("header must contain the checksum placeholder exactly once")
    prefix = struct.pack("<Q", len(header_bytes))
    digest = hashlib.sha256(prefix + header_bytes + data).hexdigest()
    sealed = header_bytes.replace(placeholder, f'"{_SUM_KEY}":"{digest}"'.encode())
    return prefix + sealed + data


def _encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    # Widest dtypes first, so every tensor starts at an offset aligned to its element size.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which packed files do not store")
        raw = _tensor_bytes(t)
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {_META_KEY: json.dumps(meta, separators=(",", ":"), sort_keys=True),
                              _SUM_KEY: _ZERO_SUM}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text) - 8) % 8)  # safetensors: data starts 8-byte aligned
    return _seal(text, b"".join(chunks))


def save_packed(model: nn.Module, path: str | os.PathLike, act_bits: tuple[int, int] | None = None,
                integer_only: dict[str, Any] | None = None) -> int:
    """Write ``model`` as a packed file (atomically: temp file + ``os.replace``); returns its size.

    ``integer_only`` (``{"input_shape": [...], "scale_terms": k}``, the sample shape without the
    batch dimension) records that the file is to run as an integer-only model:
    :func:`load_packed` then returns ``deepshift.integer_only(frozen, zeros(1, *input_shape),
    scale_terms)``, which the frozen model and these two numbers determine.

    ``model`` may be converted (shift layers: a frozen copy is made with
    :func:`deepshift.freeze_` and ``act_bits``; ``model`` is not changed) or already frozen. A
    ``model.zoo_spec`` (set by ``deepshift.models.build_model``) is stored so that
    :func:`load_packed` can rebuild the model without a skeleton.

    Example:
        >>> import os, tempfile, torch, deepshift
        >>> net = deepshift.convert_(torch.nn.Sequential(torch.nn.Linear(64, 8)), deepshift.QConfig())
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> size = deepshift.save_packed(net, path)  # 64*8 weights x 5 bits = 320 bytes of codes
        >>> 320 < size < 320 + 32 + 4096  # + int32 bias + header
        True
        >>> frozen = deepshift.load_packed(path, model=torch.nn.Sequential(torch.nn.Linear(64, 8)))
        >>> type(frozen[0]).__name__
        'ShiftLinear'
    """
    if any(type(m).__name__ == "ShiftConvBatchNorm" for m in model.modules()):
        raise ValueError("save_packed stores the frozen model, not its fuse_frozen copy: save the "
                         "frozen model (a loaded model can be fused again)")
    if any(isinstance(m, IntegerShiftLayer) for m in model.modules()):
        raise ValueError("save_packed stores the frozen model, not its integer_only form: save the frozen "
                         "model with integer_only={'input_shape': ..., 'scale_terms': ...}")
    frozen = frozen_copy(model, act_bits)
    # remove_duplicate=False: a layer shared by two parents is listed under both names, as in
    # the state_dict.
    layers = {name: m.spec().to_dict() for name, m in frozen.named_modules(remove_duplicate=False)
              if is_frozen_layer(m)}
    zoo = getattr(frozen, "zoo_spec", None)
    from deepshift._version import __version__

    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": layers, "zoo": zoo,
            "library": __version__}
    if integer_only is not None:
        meta["integer_only"] = _integer_recipe(integer_only)
        _integer_model(frozen, meta["integer_only"])  # refused now, not when the file is loaded
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.zoo_spec must be JSON-serialisable: {e}") from None
    payload = _encode(dict(frozen.state_dict()), meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return len(payload)


def _fail(message: str) -> PackedFormatError:
    return PackedFormatError(message)


def _parse(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate a whole file and return its tensors and deepshift metadata."""
    if len(blob) < 8:
        raise _fail(f"file is {len(blob)} bytes: too short to be a packed file (truncated?)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(len(blob) - 8, _MAX_HEADER):
        raise _fail(f"header length {n} exceeds the file ({len(blob)} bytes): truncated or not ours")
    raw_header = blob[8 : 8 + n]
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail("header is not valid JSON: not a packed file, or corrupted") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _fail("no safetensors metadata: not a deepshift packed file")
    metadata = header.pop("__metadata__")
    if _META_KEY not in metadata or not isinstance(metadata[_META_KEY], str):
        raise _fail("no deepshift header in the metadata: not a deepshift packed file")
    claimed = metadata.get(_SUM_KEY)
    if not isinstance(claimed, str) or len(claimed) != 64:
        raise _fail("checksum missing or malformed")
    stamp = f'"{_SUM_KEY}":"{claimed}"'.encode()
    if raw_header.count(stamp) != 1:
        raise _fail("checksum missing or malformed")
    unsealed = blob[:8] + raw_header.replace(stamp, f'"{_SUM_KEY}":"{_ZERO_SUM}"'.encode()) + blob[8 + n:]
    if hashlib.sha256(unsealed).hexdigest() != claimed:
        raise _fail("checksum mismatch: the file is corrupted or was modified")
    try:
        meta = json.loads(metadata[_META_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise _fail("deepshift header is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _fail("not a deepshift packed file (format field missing)")
    if meta.get("version") != FORMAT_VERSION:
        raise _fail(f"unsupported packed format version {meta.get('version')!r}; this library reads "
                    f"version {FORMAT_VERSION}")
    data = blob[8 + n :]
    tensors = _read_tensors(header, data)
    return tensors, meta


def _read_tensors(header: dict[str, Any], data: bytes) -> dict[str, torch.Tensor]:
    entries = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(f"tensor entry {key!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise _fail(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(f"tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise _fail(f"tensor {key!r} has invalid data offsets {offsets!r}")
        nbytes = math.prod(shape) * torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(f"tensor {key!r}: shape {shape} needs {nbytes} bytes, the header gives "
                        f"{offsets[1] - offsets[0]}")
        entries.append((offsets[0], offsets[1], key, dtype, shape))
    entries.sort()
    position = 0
    for start, end, key, _, _ in entries:
        if start != position:
            raise _fail(f"tensor {key!r} does not start where the previous one ends")
        position = end
    if position != len(data):
        raise _fail(f"tensor data is {len(data)} bytes, the header describes {position}: truncated?")
    tensors = {}
    for start, end, key, dtype, shape in entries:
        if end > start:
            t = torch.frombuffer(bytearray(data[start:end]), dtype=_DTYPES[dtype]).reshape(shape)
        else:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
        tensors[key] = t
    return tensors


def _check_layer(name: str, raw: Any, tensors: dict[str, torch.Tensor]) -> _FrozenShift:
    """Build the empty frozen layer a header's spec describes, after checking it against the tensors."""
    prefix = f"{name}." if name else ""
    try:
        spec = FrozenSpec.from_dict(raw)
    except ValueError as e:
        raise _fail(f"layer {name!r}: {e}") from e
    codes = tensors.get(prefix + "codes")
    if codes is None or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise _fail(f"layer {name!r}: packed codes missing or not a flat uint8 tensor")
    numel = math.prod(spec.weight_shape)
    if codes.numel() != packed_numel(numel, spec.weight_bits):
        raise _fail(f"layer {name!r}: header says {numel} weights of {spec.weight_bits} bits, "
                    f"the file holds {codes.numel()} code bytes")
    if (prefix + "bias_int" in tensors) != spec.bias:
        raise _fail(f"layer {name!r}: bias presence differs between header and tensors")
    return frozen_from_spec(spec)


def _build_zoo_model(zoo: Any) -> nn.Module:
    if not isinstance(zoo, dict) or not isinstance(zoo.get("name"), str) or not isinstance(
            zoo.get("kwargs", {}), dict):
        raise _fail("the file names no zoo model: pass load_packed(path, model=skeleton)")
    try:
        from deepshift.models import build_model
    except ImportError as e:
        raise _fail(f"the file needs zoo model {zoo['name']!r} but deepshift.models is unavailable "
                    f"({e}); pass model=skeleton") from e
    try:
        return build_model(zoo["name"], **zoo.get("kwargs", {}))
    except Exception as e:  # an unknown name or bad arguments in a file: report it as the file's fault
        raise _fail(f"cannot rebuild zoo model {zoo['name']!r} from the file: {e}") from e


def _matches(module: nn.Module, layer: _FrozenShift) -> bool:
    """Whether a skeleton module can hold a frozen layer (same kind and weight shape)."""
    if is_frozen_layer(module):
        return type(module) is type(layer) and module.weight_shape == layer.weight_shape
    kind = nn.Linear if layer.kind == "linear" else nn.modules.conv._ConvNd
    weight = getattr(module, "weight", None)
    return isinstance(module, kind) and isinstance(weight, torch.Tensor) and (
        tuple(weight.shape) == layer.weight_shape)


def _split_attention(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The skeleton with each ``nn.MultiheadAttention`` that the file holds in split form (its
    tensors under ``<name>.q_proj.``) replaced by a float :class:`ShiftMultiheadAttention`."""
    split = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        if any(k.startswith(prefix + "q_proj.") for k in tensors):
            try:
                split[id(module)] = ShiftMultiheadAttention.from_float(module)
            except ValueError as e:
                raise _fail(f"attention {name!r}: {e}") from e
    return replace_modules(model, lambda m: split.get(id(m))) if split else model


def load_packed(path: str | os.PathLike | bytes, model: nn.Module | None = None) -> nn.Module:
    """Load a packed file (a path, or the file's contents as bytes) into a frozen inference model.

    Without ``model``, the file must name a zoo model (saved from a model built by
    ``deepshift.models.build_model``), which is rebuilt. Otherwise ``model`` is the skeleton:
    the float model (or a converted or frozen one) of the same architecture; its shift-layer
    positions are replaced by frozen layers and every tensor is loaded from the file, in place.
    Use the return value (a file whose root is a single layer returns a new module). The
    model is returned in eval mode.

    Raises:
        PackedFormatError: the file is truncated, corrupted (checksum), of another format
            version, inconsistent (shapes, layers), not a packed file, or does not fit ``model``.
    """
    blob = bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else Path(path).read_bytes()
    try:
        tensors, meta = _parse(blob)
        layers_meta = meta.get("layers")
        if not isinstance(layers_meta, dict):
            raise _fail("header has no layer table")
        layers = {name: _check_layer(name, spec, tensors) for name, spec in layers_meta.items()}
    except PackedFormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError,
            AttributeError, RecursionError, MemoryError) as e:
        raise _fail(f"inconsistent packed file: {type(e).__name__}: {e}") from e
    if model is None:
        model = _build_zoo_model(meta.get("zoo"))
    model = _split_attention(model, tensors)
    by_module: dict[int, nn.Module] = {}  # a layer the file lists under two names is one module
    for name, layer in layers.items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise _fail(f"the model has no layer {name!r} that the file holds") from None
        if not _matches(target, layer):
            raise _fail(f"layer {name!r} of the model ({type(target).__name__}) does not match the "
                        f"file's {type(layer).__name__} of weight shape {layer.weight_shape}")
        by_module.setdefault(id(target), layer)
    model = replace_modules(model, lambda m: by_module.get(id(m)))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise _fail(f"the file does not match the model: {e}") from e
    for name in layers:
        try:
            model.get_submodule(name).check_consistency()
        except ValueError as e:
            raise _fail(f"layer {name!r}: {e}") from e
    # The same float-layer forms freeze_ gives (state-dict compatible, so the file need not say).
    model = without_attention_fast_path(freeze_float_layers_(model)).eval()
    if "integer_only" in meta:
        try:
            return _integer_model(model, _integer_recipe(meta["integer_only"]))
        except (ValueError, TypeError) as e:
            raise _fail(f"integer-only model: {e}") from e
    return model


def _integer_recipe(recipe: Any) -> dict[str, Any]:
    """The checked ``{"input_shape", "scale_terms"}`` of an integer-only packed file."""
    if not isinstance(recipe, dict) or set(recipe) != {"input_shape", "scale_terms"}:
        raise ValueError(f"integer_only must be {{'input_shape': [...], 'scale_terms': k}}, got {recipe!r}")
    shape, terms = recipe["input_shape"], recipe["scale_terms"]
    if (not isinstance(shape, (list, tuple)) or not shape or len(shape) > 4
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape)):
        raise ValueError(f"integer_only input_shape must be 1 to 4 sizes in [1, 65536], got {shape!r}")
    return {"input_shape": list(shape), "scale_terms": terms}


def _integer_model(frozen: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    example = torch.zeros((1, *recipe["input_shape"]))
    result = integer_only(frozen, example, scale_terms=recipe["scale_terms"])
    zoo = getattr(frozen, "zoo_spec", None)
    if zoo is not None:
        result.zoo_spec = zoo
    result.integer_recipe = dict(recipe)
    return result.eval()
