"""The CPU kernels' LRU cache of what they derive from weights (decoded codes, tiles, term plans)."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

from torch import Tensor

_lock = threading.RLock()

CACHE_MAX_BYTES = 1 << 30
"""Bytes of decoded weights / tiles / term lists the LRU cache may hold."""


_cache: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()


_cache_bytes = [0]


def clear_cache() -> None:
    """Drop every cached decoded weight / tile / term list."""
    with _lock:
        _cache.clear()
        _cache_bytes[0] = 0


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _cached(codes: Tensor, key: tuple, make):
    try:
        version = codes._version
    except RuntimeError:  # inference tensor: no version counter, so never cache
        return make()
    full = (codes.data_ptr(), version, codes.numel(), *key)
    with _lock:
        entry = _cache.get(full)
        if entry is not None and entry[0]() is codes:
            _cache.move_to_end(full)
            return entry[1]
    value = make()
    size = _nbytes(value)
    with _lock:
        old = _cache.pop(full, None)
        if old is not None:
            _cache_bytes[0] -= old[2]
        if value is not None and size <= CACHE_MAX_BYTES:  # None (does not apply) is cheap to re-derive
            _cache[full] = (weakref.ref(codes), value, size)
            _cache_bytes[0] += size
            while _cache_bytes[0] > CACHE_MAX_BYTES and _cache:
                _, (_, _, n) = _cache.popitem(last=False)
                _cache_bytes[0] -= n
    return value


def fused_forward(x: Tensor, codes: Tensor, bias: Tensor | None, key: tuple, prepare):
    """A frozen layer's prepared native forward for inputs like ``x`` (``prepare()``'s result, None
    where the fused path does not apply), kept while the codes and bias tensors are unchanged, so a
    call costs little more than the kernel itself (what matters at batch 1)."""
    try:
        bias_key = None if bias is None else (bias.data_ptr(), bias._version)
    except RuntimeError:  # an inference-tensor bias has no version counter: prepare every time
        return prepare()
    return _cached(codes, (*key, x.shape, x.dtype, bias_key), prepare)
