"""The CPU kernels' LRU cache of what they derive from weights (decoded codes, tiles, term plans)."""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any

from torch import Tensor

from deepshift.frozen.spec import FrozenSpec

_lock = threading.RLock()

CACHE_MAX_BYTES = 1 << 30
"""Bytes of decoded weights / tiles / term lists the LRU cache may hold."""


_cache: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()


_cache_bytes = [0]


def clear_cache() -> None:
    """Drop every cached decoded weight / tile / term list and prepared fused forward."""
    with _lock:
        _cache.clear()
        _cache_bytes[0] = 0
        _fused.clear()


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _drop(table: dict, ref: weakref.ref, key: tuple) -> None:
    """Forgets ``table[key]`` when its codes tensor (``ref``) is freed."""
    with _lock:
        entry = table.get(key)
        if entry is not None and entry[0] is ref:  # not a newer entry at the same key
            del table[key]
            if table is _cache:
                _cache_bytes[0] -= entry[2]


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
            # The entry goes with its codes tensor: a freed model's tiles do not wait for eviction.
            _cache[full] = (weakref.ref(codes, lambda r, k=full: _drop(_cache, r, k)), value, size)
            _cache_bytes[0] += size
            while _cache_bytes[0] > CACHE_MAX_BYTES and _cache:
                _, (_, _, n) = _cache.popitem(last=False)
                _cache_bytes[0] -= n
    return value


# Prepared fused forwards by (codes tensor, layer, input shape and dtype): looked up on every frozen
# layer call that reaches Python, so kept apart from the LRU (whose generic key costs several
# microseconds a lookup). They are the extension's PreparedConv / PreparedLinear objects, owned here:
# the frozen ops' C++ kernels find them through weak references (``remember``), so an entry dropped
# here (its codes tensor freed, clear_cache) is gone for those kernels too.
_fused: dict[tuple, tuple] = {}
_FUSED_MAX = 4096
_fused_on = [True]


def fused_forward(x: Tensor, codes: Tensor, bias: Tensor | None, key: str, prepare):
    """A frozen layer's prepared native forward for inputs like ``x`` (``prepare()``'s result, None
    where the fused path does not apply or is switched off), kept while the codes and bias tensors
    are unchanged, so a call costs little more than the kernel itself (what matters at batch 1)."""
    if not fused_enabled():
        return None
    try:
        versions = (codes._version, None if bias is None else bias._version)
    except RuntimeError:  # inference tensors have no version counter: prepare every time
        return prepare()
    k = (id(codes), key, x.shape, x.dtype)
    entry = _fused.get(k)
    # The weak references make a new tensor at a recycled id() a miss, never a stale hit.
    if (entry is not None and entry[0]() is codes and entry[1] == versions
            and (entry[2] is None if bias is None else entry[2]() is bias)):
        return entry[3]
    value = prepare()
    if value is not None:
        with _lock:
            if len(_fused) >= _FUSED_MAX:
                _fused.clear()
            # The entry goes with its codes tensor (the prepared forward never refers to it).
            codes_ref = weakref.ref(codes, lambda r, k=k: _drop(_fused, r, k))
            _fused[k] = (codes_ref, versions, None if bias is None else weakref.ref(bias), value)
        value.remember(codes, bias, key, x)
    return value


def fused_enabled() -> bool:
    """Whether the fused native forwards are on (``build.set_fused``)."""
    return _fused_on[0]


def set_fused(enabled: bool) -> None:
    """Python's half of ``build.set_fused``: whether ``fused_forward`` prepares and returns forwards
    (those prepared stay cached meanwhile)."""
    _fused_on[0] = bool(enabled)


@functools.lru_cache(maxsize=4096)
def parsed_spec(spec: str) -> FrozenSpec:
    """A frozen layer's spec, parsed once per distinct JSON string (the frozen ops receive the
    string on every call; FrozenSpec is immutable, so sharing the parsed one is safe)."""
    return FrozenSpec.from_json(spec)
