"""Native CPU kernels (C++, portable + AVX2, OpenMP) for ``deepshift::shift_linear`` / ``shift_conv``.

Importing this module registers :func:`shift_linear_cpu` and :func:`shift_conv_cpu` as the ops' CPU
kernels (``torch.library.register_kernel``), so frozen models use them automatically. The C++
extension (``shift_cpu.cpp`` + ``shift_cpu_impl.h`` beside this file) is built lazily, on the first
op call, with ``torch.utils.cpp_extension.load`` into a persistent cache directory:
``$DEEPSHIFT_BUILD_DIR`` or ``~/.cache/deepshift/`` (``$XDG_CACHE_HOME/deepshift``), one
sub-directory per hash of the sources, torch and Python versions, so a warm cache loads in well
under a second and a source change rebuilds. If there is no compiler or the build fails, one
``RuntimeWarning`` is issued and the pure-torch reference implementation is used; setting
``DEEPSHIFT_NO_NATIVE=1`` disables native code without a warning.

Results equal the reference op bit for bit for every input (the kernels use wrapping integer
arithmetic exactly like torch's int32/int64 tensors). The instruction set is chosen at run time:
AVX2 where ``__builtin_cpu_supports("avx2")``, else a portable path (:func:`set_isa` forces one).

Algorithms (no multiplication of an activation by a weight anywhere; multiplications occur only in
index arithmetic: row / plane offsets, computed per row or per weight, never per activation):

* Linear, up to ``GEMV_MAX_ROWS`` input rows, int32 lanes: a cached byte per weight (sign, shift
  amount) in tiles of 8 output features; per weight column: broadcast ``x[k]``, variable left shift
  (``vpsllvd``), sign (``vpsignd``), add.
* Convolution (any dims, stride, padding, dilation, groups; transposed through the reference's
  rewrite to a stride-1 convolution) and Linear with more rows (as a 1x1 convolution over the
  rows): per image, a table of the zero-padded input (strided columns split into phases so every
  read is contiguous); each non-zero weight becomes a *term*, an offset into the table. An output's
  terms are grouped by shift amount, largest first, and summed by Horner's rule
  ``((S_a1 << (a1 - a2)) + S_a2) << ... << a_last`` (exact mod 2**bits, like torch's wrapping ops):
  the inner loop is one vector load and one add (positive weight) or subtract (negative weight) per
  8 (int32) or 4 (int64) outputs, plus one uniform shift of the accumulators per distinct amount.
  Zero weights have no term. Term lists are split into channel blocks so the table slice in use
  stays in L1. (A first version kept one pre-shifted copy of the input per shift amount, the
  design note's idea; Horner needs no copies, so the table is ~P times smaller and 1.3-2.5x faster.)
* 8-bit activations (every ``|x| <= 128``, checked per call; computed on int32 lanes): the table
  holds int16 copies, 16 outputs per vector (half the loads and adds), and each shift group is
  split into chunks of at most 255 terms, whose sums are exact in int16; Horner's rule runs on the
  sign-extended chunk sums in int32 lanes, so results are the int32 path's bit for bit.
* Narrow rows (8x8 planes: half of every 16-lane vector idle): with stride 1 a whole plane can be
  computed as one long row over the padded width (the positions between rows are computed and
  dropped; ~40% fewer vectors there), and rows of at most 8 outputs can use 8-lane int16 vectors,
  one per row (no idle lane). Where 256-bit operations cost two 128-bit ones (Zen 1, the portable
  build) the latter is preferred; stride-2 rows always use it.
* int64 inputs run in int32 lanes (then widen) when :func:`deepshift.ops.accumulator_bound`, with
  the actual ``max|x|``, ``max|bias|`` and the largest used shift, proves every intermediate value is
  below ``2**31``; otherwise in int64 lanes.

Caches: decoded weights (an int8 signed shift code per weight), the Linear tiles, the term lists and
each call signature's prepared arguments are kept in a small LRU (``CACHE_MAX_BYTES`` in total)
keyed on the codes tensor's ``data_ptr``, ``_version`` (bumped by in-place writes such as
``load_state_dict``), size and the layer/input geometry, and validated by a weak reference to the
very tensor (a new tensor at a recycled address never hits a stale entry). Inference tensors (no
version counter) are not cached. Calls with little work (< ~0.1 ms) run on one thread.

The frozen layers' eager forward skips the op altogether (:func:`prepare_conv_fused`,
:func:`prepare_linear_fused`): one native call takes the float input, rounds it to fixed point while
building the kernel's table (8-bit ``act_bits`` guarantee the int16 path, so no range check), runs
the same kernel and scales each image's output to float while it is still in cache; bit for bit the
op path's result, without the dispatcher, the intermediate integer tensors or per-call Python work
(at batch 1 that work cost as much as the kernels). Tracing and compiling use the op.

Also here: :func:`quantize_input` / :func:`scale_output`, fused one-pass versions of the frozen
layers' input rounding and output scaling on the op path (bit-identical to their float64 torch
path), and :func:`fake_quantize`, the one-pass forward of the training-time
:func:`deepshift.fixed_point`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import ops as _ops

GEMV_MAX_ROWS = 4
"""Linear inputs with at most this many rows use the small-batch (per-weight shift) kernel."""

INT16_MAX_ABS = 128
"""Inputs with every |x| <= this (8-bit activations) take the int16-table fast path of the conv kernel
(and of Linear beyond GEMV_MAX_ROWS rows) when the result is computed on int32 lanes: 255 such
terms sum exactly in int16, and the plan chunks its shift groups to at most 255 terms."""
INT16_MAX_GROUP = 255
_LANE_DTYPES = {16: torch.int16, 32: torch.int32, 64: torch.int64}

CACHE_MAX_BYTES = 1 << 30
"""Bytes of decoded weights / tiles / term lists the LRU cache may hold."""

TABLE_BLOCK_BYTES = 16 * 1024
"""Bytes of the input table one work item of a convolution reads per channel block: sized to stay in
L1 together with the term lists streaming past (Zen 1: 32 KiB L1D). Measured here at batch 1, 3x3:
a 64-channel 56x56 conv 1.06x fp32 in 2 blocks of 32 channels (12.7 KiB) vs 1.09x in one and 1.19x
in 4; 256 channels at 14x14 1.06x in 4 blocks (12 KiB) vs 1.19x in 2."""

LINEAR_BLOCK_BYTES = 24 * 1024
"""The same for batched Linear layers (a 1x1 convolution over the rows, one term per channel):
24 KiB beat 16 KiB by ~12% on 4096x4096 at batch 64 (31.7 vs 35.8 ms), 32 KiB was within noise."""

_SOURCES = ("shift_cpu.cpp", "shift_cpu_impl.h")
_HERE = Path(__file__).resolve().parent
_lock = threading.RLock()
_state: dict[str, Any] = {"tried": False, "ext": None, "error": None}
_cache: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()
_cache_bytes = [0]


_FLOAT_DTYPES = (torch.float32, torch.float64)


def eager() -> bool:
    """Whether the native helpers may run: not while compiling or tracing, where their results would
    be opaque to the compiler or recorded as constants (the torch / op paths are taken then)."""
    return not (torch.compiler.is_compiling() or torch._C._get_tracing_state())


def _shifted_bias(bias: Tensor | None, u: int) -> Tensor | None:
    """The op's bias in output units ``2**u`` (``u = min(shift_lo, 0)``): ``bias << -u``."""
    return None if bias is None else (bias if u == 0 else torch.bitwise_left_shift(bias, -u)).contiguous()


def _nan_error() -> ValueError:
    return ValueError("got a NaN input; fixed point has no NaN")


def native_disabled() -> bool:
    """True when ``DEEPSHIFT_NO_NATIVE`` is set (to anything but "" or "0")."""
    return os.environ.get("DEEPSHIFT_NO_NATIVE", "") not in ("", "0")


def build_dir() -> Path:
    """Root of the persistent build cache: ``$DEEPSHIFT_BUILD_DIR`` or ``~/.cache/deepshift``."""
    env = os.environ.get("DEEPSHIFT_BUILD_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepshift"


# -ffp-contract=off: a multiply followed by an add must stay two roundings (never an FMA), as in torch.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def _source_digest() -> str:
    h = hashlib.sha256()
    h.update(repr(_CFLAGS).encode())
    for name in _SOURCES:
        h.update((_HERE / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold the build folder's lock for one process at a time; a killed holder never blocks others.

    torch's own lock (a ``lock`` file that its holder deletes when done) stays behind when the
    holder is killed mid-build (kill -9, OOM, a CI timeout), and every later process then waits
    for it forever, silently. ``flock`` is released by the kernel when its holder dies, and every
    deepshift process takes it before torch's, so a ``lock`` file found while holding it is stale.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's lock alone
        yield
        return
    with open(directory / "deepshift.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    """Compile (or load the cached build of) the extension; raises on any failure."""
    from torch.utils import cpp_extension

    name = f"deepshift_cpu_{_source_digest()}"
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if not (directory / f"{name}.so").exists():
            print(f"deepshift: building the native CPU kernels (once, about a minute) in {directory}",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=name,
            sources=[str(_HERE / "shift_cpu.cpp")],
            extra_include_paths=[str(_HERE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=os.environ.get("DEEPSHIFT_BUILD_VERBOSE", "") not in ("", "0"),
        )


def load_extension():
    """The compiled extension module, or None (disabled, or the build failed: warned once)."""
    if native_disabled():
        return None
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["ext"] = _build()
            except Exception as exc:  # no compiler, build error, import error: use the reference
                _state["ext"] = None
                _state["error"] = exc
                warnings.warn(
                    f"deepshift: native CPU kernels unavailable ({type(exc).__name__}: {exc}); "
                    "using the pure-torch reference ops (slower). Set DEEPSHIFT_NO_NATIVE=1 to "
                    "silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["ext"]


def native_available() -> bool:
    """True when the native kernels are (or can be) built and loaded; builds them if needed."""
    return load_extension() is not None


def reset_state() -> None:
    """Forget the loaded extension, the build failure and the caches (tests)."""
    with _lock:
        _state.update(tried=False, ext=None, error=None)
        clear_cache()


def clear_cache() -> None:
    """Drop every cached decoded weight / tile / term list."""
    with _lock:
        _cache.clear()
        _cache_bytes[0] = 0


def set_isa(isa: str) -> str:
    """Force the kernels' instruction set: ``"avx2"``, ``"portable"`` or ``"auto"``; returns the one used."""
    ext = load_extension()
    if ext is None:
        return "reference"
    code = {"auto": -1, "portable": 0, "avx2": 1}[isa]
    return "avx2" if ext.set_isa(code) == 1 else "portable"


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
        if size <= CACHE_MAX_BYTES:
            _cache[full] = (weakref.ref(codes), value, size)
            _cache_bytes[0] += size
            while _cache_bytes[0] > CACHE_MAX_BYTES and _cache:
                _, (_, _, n) = _cache.popitem(last=False)
                _cache_bytes[0] -= n
    return value


def _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes):
    """(scode int8 in the weight's shape, largest used shift amount or -1): cached."""
    u = min(shift_lo, 0)

    def make():
        scode, max_amount = ext.decode(
            codes.contiguous(), math.prod(weight_shape), weight_bits, has_zero, shift_lo - u, lanes
        )
        return scode.reshape(tuple(weight_shape)), int(max_amount)

    return _cached(codes, ("dec", tuple(weight_shape), weight_bits, has_zero, shift_lo, lanes), make)


def _max_abs(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _lanes_for(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias_s, fan_in,
               int16: bool) -> int:
    """The lanes a call computes in: 64 (int64), 32 (int32), or 16 (int16 tables, int32 arithmetic).

    int32 x computes in int32; int64 x in int32 when the accumulator bound proves that exact, else
    int64. Where int32 is used and ``int16`` (the kernel has the 8-bit path), inputs with every
    ``|x| <= INT16_MAX_ABS`` take 16. ``max|x|`` is computed at most once, and not at all for int32
    x without the 8-bit path (the small-batch Linear kernel).
    """
    if x.dtype == torch.int32 and not int16:
        return 32
    x_max = _max_abs(x)
    if x.dtype != torch.int32:
        _, max_amount = _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 64)
        weights = 0 if max_amount < 0 else fan_in * x_max * 2**max_amount
        bias_max = 0 if bias_s is None else _max_abs(bias_s)
        if weights + bias_max >= 2**31:
            return 64
    return 16 if int16 and x_max <= INT16_MAX_ABS else 32


def _valid_codes(codes: Tensor, weight_shape, weight_bits) -> bool:
    return (
        isinstance(weight_bits, int)
        and 2 <= weight_bits <= 8
        and codes.dtype == torch.uint8
        and codes.device.type == "cpu"
        and codes.numel() == (math.prod(weight_shape) * weight_bits + 7) // 8
    )


def _linear_native_ok(x, codes, weight_shape, weight_bits, bias, x_dtype=None) -> bool:
    """Whether the native kernel takes the call (``x_dtype``: the integer dtype x stands for)."""
    x_dtype = x.dtype if x_dtype is None else x_dtype
    return not (
        len(weight_shape) != 2
        or x_dtype not in (torch.int32, torch.int64)
        or x.dim() < 1
        or x.shape[-1] != weight_shape[1]
        or not _valid_codes(codes, weight_shape, weight_bits)
        or (bias is not None and (bias.dtype != x_dtype or bias.shape != (weight_shape[0],)))
        or x.numel() == 0
        or min(weight_shape) <= 0
    )


def _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo):
    """The small-batch Linear kernel's byte tiles (cached)."""
    return _cached(
        codes,
        ("gemv", tuple(weight_shape), weight_bits, has_zero, shift_lo),
        lambda: ext.gemv_layout(_decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 32)[0]),
    )


def _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows):
    """The plan of a Linear over ``rows`` rows run as a 1x1 convolution (cached)."""
    out_f, in_f = weight_shape

    def make_plan():
        scode, _ = _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, max(lanes, 32))
        w5 = scode.reshape(out_f, in_f, 1, 1, 1)
        return ext.conv_plan(
            w5, [1, in_f, 1, 1, rows], 1, [1, 1, 1], [0, 0, 0], [1, 1, 1], lanes // 8, LINEAR_BLOCK_BYTES,
            INT16_MAX_GROUP if lanes == 16 else 0,
        )

    return _cached(codes, ("plan", tuple(weight_shape), weight_bits, has_zero, shift_lo, lanes, rows, False),
                   make_plan)


def shift_linear_cpu(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias):
    """CPU kernel of ``deepshift::shift_linear`` (native when available, else the reference)."""
    ext = load_extension()
    if ext is None or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias):
        return _ops.shift_linear_reference(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias)
    out_f, in_f = weight_shape
    rows = x.numel() // in_f
    u = min(shift_lo, 0)
    bias_s = _shifted_bias(bias, u)
    lanes = _lanes_for(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias_s, in_f,
                       int16=rows > GEMV_MAX_ROWS)
    dtype = _LANE_DTYPES[lanes]
    x2 = x.reshape(rows, in_f)
    x2 = (x2 if x2.dtype == dtype else x2.to(dtype)).contiguous()
    b = None if bias_s is None else bias_s.to(torch.int64 if lanes == 64 else torch.int32)
    if lanes == 32 and rows <= GEMV_MAX_ROWS:
        y = ext.gemv(x2, _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo), out_f, b)
    else:
        xt = x2.t().contiguous().reshape(1, in_f, 1, 1, rows)
        plan = _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows)
        y = ext.conv(xt, [out_f, in_f, 1, 1, 1], plan, b, 1, [1, 1, 1], [0, 0, 0], [1, 1, 1])
        y = y.reshape(out_f, rows).t().contiguous()
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


def _conv_native_ok(
    x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, stride, padding, dilation, groups,
    transposed, output_padding
) -> bool:
    dims = len(weight_shape) - 2
    if not 1 <= dims <= 3 or x.dtype not in (torch.int32, torch.int64) or x.dim() != dims + 2:
        return False
    if not _valid_codes(codes, weight_shape, weight_bits) or min(weight_shape) <= 0 or x.numel() == 0:
        return False
    if any(len(v) != dims for v in (stride, padding, dilation, output_padding)) or groups < 1:
        return False
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(output_padding) < 0:
        return False
    c_out = weight_shape[1] * groups if transposed else weight_shape[0]
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (c_out,)):
        return False
    if transposed:
        if weight_shape[0] % groups or x.shape[1] != weight_shape[0]:
            return False
    elif weight_shape[0] % groups or x.shape[1] != weight_shape[1] * groups:
        return False
    sizes = [
        _ops.conv_output_size(
            x.shape[2 + d],
            weight_shape[2 + d],
            stride[d],
            padding[d],
            dilation[d],
            transposed,
            output_padding[d],
        )
        for d in range(dims)
    ]
    return min(sizes) >= 1


class _ConvCall:
    """What a conv call with one signature (shapes, options) needs besides x and bias: cached."""

    def __init__(self, ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, _bias, stride, padding,
                 dilation, groups, transposed, output_padding):  # the op's arguments (bias: per call)
        dims = len(weight_shape) - 2
        self.kernel = list(weight_shape[2:])
        self.transposed = transposed
        self.groups = groups
        self.tstride, self.tpadding = list(stride), list(padding)
        self.tdilation, self.toutput_padding = list(dilation), list(output_padding)
        if transposed:
            self.fan_in = weight_shape[0] // groups * math.prod(self.kernel)
            stride, padding = [1] * dims, [0] * dims
        else:
            self.fan_in = weight_shape[1] * math.prod(self.kernel)
        self.pre = 3 - dims
        self.s3 = [1] * self.pre + list(stride)
        self.p3 = [0] * self.pre + list(padding)
        self.d3 = [1] * self.pre + list(dilation)
        self.args = (ext, codes, tuple(weight_shape), weight_bits, has_zero, shift_lo)
        self.by_lanes: dict[int, tuple] = {}

    def weights(self, lanes):
        """(w5 shape, conv-layout scode) for the lane width."""
        ext, codes, weight_shape, weight_bits, has_zero, shift_lo = self.args
        scode, _ = _decoded(ext, codes, list(weight_shape), weight_bits, has_zero, shift_lo, lanes)
        if self.transposed:
            groups, kernel = self.groups, self.kernel
            c_in_g, c_out_g = weight_shape[0] // groups, weight_shape[1]

            def as_conv():
                # (C_in, C_out/g, *k) -> (C_out, C_in/g, *k), kernel flipped: the reference's rewrite.
                t = scode.reshape(groups, c_in_g, c_out_g, *kernel).transpose(1, 2)
                t = t.reshape(groups * c_out_g, c_in_g, *kernel).flip(list(range(2, len(kernel) + 2)))
                return t.contiguous()

            scode = _cached(
                codes, ("tconv", weight_shape, weight_bits, has_zero, shift_lo, lanes, groups), as_conv
            )
        w5 = scode.reshape(scode.shape[0], scode.shape[1], *([1] * self.pre), *scode.shape[2:])
        return w5

    def prepared(self, ext, lanes, x5_shape):
        """(w5 shape, plan) for the lane width and the kernel's 5-d input shape (fixed per call
        signature), made once."""
        prepared = self.by_lanes.get(lanes)
        if prepared is None:
            w5 = self.weights(max(lanes, 32))
            plan = ext.conv_plan(
                w5, list(x5_shape), self.groups, self.s3, self.p3, self.d3, lanes // 8, TABLE_BLOCK_BYTES,
                INT16_MAX_GROUP if lanes == 16 else 0,
            )
            prepared = self.by_lanes[lanes] = (list(w5.shape), plan)
        return prepared

    def run(self, ext, x, bias_s, lanes):
        """``lanes``: 64 / 32 (int64 / int32 arithmetic), or 16 (int16 table, int32 arithmetic)."""
        dtype = _LANE_DTYPES[lanes]
        xi = x if x.dtype == dtype else x.to(dtype)
        if self.transposed:
            xi = _ops._dilate_and_pad_for_transpose(
                xi, self.kernel, self.tstride, self.tpadding, self.tdilation, self.toutput_padding
            )
        x5 = xi.reshape(xi.shape[0], xi.shape[1], *([1] * self.pre), *xi.shape[2:]).contiguous()
        w5_shape, plan = self.prepared(ext, lanes, x5.shape)
        b = None if bias_s is None else bias_s.to(torch.int64 if lanes == 64 else torch.int32)
        y = ext.conv(x5, w5_shape, plan, b, self.groups, self.s3, self.p3, self.d3)
        y = y.reshape(y.shape[0], y.shape[1], *y.shape[2 + self.pre :])
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _conv_call(ext, args: tuple, x_dtype: torch.dtype):
    """The prepared ``_ConvCall`` for the op's arguments ``args`` with x of integer dtype ``x_dtype``
    (x itself may be the float input of the fused path), or False when the native kernel does not
    take the call. One per signature: shapes and dtypes of the tensors, every option as is."""
    x = args[0]
    key = ("call", (tuple(x.shape), x_dtype), *((tuple(a.shape), a.dtype) if isinstance(a, Tensor) else
                                                 tuple(a) if isinstance(a, list) else a for a in args[1:]))

    def make():
        a = args if x.dtype == x_dtype else (torch.empty(x.shape, dtype=x_dtype, device="meta"), *args[1:])
        return _ConvCall(ext, *a) if _conv_native_ok(*a) else False

    return _cached(args[1], key, make)


def shift_conv_cpu(
    x,
    codes,
    weight_shape,
    weight_bits,
    has_zero,
    shift_lo,
    bias,
    stride,
    padding,
    dilation,
    groups,
    transposed,
    output_padding,
):
    """CPU kernel of ``deepshift::shift_conv`` (native when available, else the reference)."""
    args = (
        x,
        codes,
        weight_shape,
        weight_bits,
        has_zero,
        shift_lo,
        bias,
        stride,
        padding,
        dilation,
        groups,
        transposed,
        output_padding,
    )
    ext = load_extension()
    if ext is None:
        return _ops.shift_conv_reference(*args)
    call = _conv_call(ext, args, x.dtype)
    if call is False:
        return _ops.shift_conv_reference(*args)
    u = min(shift_lo, 0)
    bias_s = _shifted_bias(bias, u)
    lanes = _lanes_for(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias_s, call.fan_in,
                       int16=True)
    return call.run(ext, x, bias_s, lanes)


def _fused_setup(ext, x, act_bits, rounding, accumulator, shift_lo, bias, terms, weight_bits):
    """Common checks and constants of the fused frozen-layer paths, or None when they do not apply:
    (lanes, lo, hi, exponent, shifted int32 bias or None). ``terms``: weights per output."""
    if (
        accumulator != "int32"
        or not eager()
        or not isinstance(x, Tensor)
        or x.dtype not in _FLOAT_DTYPES
        or x.device.type != "cpu"
        or rounding not in ("nearest", "floor")
        or (bias is not None and bias.dtype != torch.int32)
    ):
        return None
    total = act_bits[0] + act_bits[1]
    lo, hi = -(2 ** (total - 1)), 2 ** (total - 1) - 1
    u = min(shift_lo, 0)
    b = _shifted_bias(bias, u)
    # 8-bit activations (|q| <= 128 by construction) take the int16 tables, unless an output has
    # fewer terms than 2 * (shift amounts): then the int16 path's widening per shift group outweighs
    # its narrower loads (ResNet's 3-channel first conv, 27 terms for 16 amounts: int32 tables were
    # 1.45x faster, 3.85 vs 5.65 ms at batch 128; int16 was already ahead at 45 terms).
    lanes = 16 if total <= 8 and terms >= 2**weight_bits else 32
    return lanes, lo, hi, u - act_bits[1], b


def prepare_conv_fused(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, stride, padding,
                       dilation, groups, act_bits, rounding, accumulator):
    """A function computing a frozen (non-transposed, zero-padded) conv layer's whole forward on float
    CPU inputs shaped and typed like ``x``, in one native call; None where that does not apply (no
    native kernels, an int64 accumulator, another dtype or device, shapes the native kernel does not
    take: use the op then).

    The call rounds the input to fixed point while building the kernel's table and scales each
    image's integer output to x's dtype while it is still in cache: bit for bit
    ``scale(shift_conv(quantize(x)))`` as :class:`deepshift.ShiftConvNd` computes it through the op
    (``bias`` is the layer's int32 ``bias_int``), without the dispatcher, the intermediate integer
    tensors or the per-call range check (8-bit ``act_bits`` guarantee ``|q| <= 128``). The function
    raises ValueError on NaN. Everything derived from the weights is computed here, once: callers
    keep the function while ``codes`` and ``bias`` are unchanged (see ``ShiftConvNd``).

    ``run(x, affine=(scale, shift), residual=None, relu=False)`` also applies a following
    :class:`deepshift.FrozenBatchNorm` (its ``affine(x.dtype)``: contiguous (Cout,) CPU tensors),
    then adds ``residual`` (contiguous, the output's shape and dtype) and applies ReLU, to each
    output value while it is in cache, bit for bit as torch computes those operations (see
    :class:`deepshift.ShiftConvBatchNorm`).
    """
    ext = load_extension()
    setup = None if ext is None else _fused_setup(ext, x, act_bits, rounding, accumulator, shift_lo, bias,
                                                  math.prod(weight_shape[1:]), weight_bits)
    if setup is None or x.dim() != len(weight_shape):
        return None
    lanes, lo, hi, exponent, b = setup
    dims = len(weight_shape) - 2
    args = (x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, stride, padding, dilation, groups,
            False, [0] * dims)
    call = _conv_call(ext, args, torch.int32)
    if call is False:
        return None
    w5_shape, plan = call.prepared(ext, lanes, [x.shape[0], x.shape[1], *([1] * call.pre), *x.shape[2:]])
    conv_fused, s3, p3, d3 = ext.conv_fused, call.s3, call.p3, call.d3
    frac, floor = act_bits[1], rounding == "floor"

    def run(x: Tensor, affine: tuple[Tensor, Tensor] | None = None, residual: Tensor | None = None,
            relu: bool = False) -> Tensor:
        y, has_nan = conv_fused(x.contiguous(), w5_shape, plan, b, groups, s3, p3, d3, frac, lo, hi, floor,
                                lanes, exponent, None if affine is None else list(affine), residual, relu)
        if has_nan:
            raise _nan_error()
        return y

    return run


def prepare_linear_fused(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, act_bits, rounding,
                         accumulator):
    """What :func:`prepare_conv_fused` is for a frozen Linear layer: a function computing its forward
    on float CPU inputs shaped and typed like ``x`` with native calls only (up to ``GEMV_MAX_ROWS``
    rows: one rounding pass, the small-batch kernel and one scaling pass; more rows: the fused
    1x1-convolution path). Bit for bit the op path's result; ValueError on NaN; None where it does
    not apply."""
    ext = load_extension()
    setup = None if ext is None else _fused_setup(ext, x, act_bits, rounding, accumulator, shift_lo, bias,
                                                  weight_shape[1], weight_bits)
    if setup is None or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias, torch.int32):
        return None
    lanes, lo, hi, exponent, b = setup
    out_f, in_f = weight_shape
    rows = x.numel() // in_f
    out_shape = (*x.shape[:-1], out_f)
    frac, floor, out64 = act_bits[1], rounding == "floor", x.dtype == torch.float64
    if rows <= GEMV_MAX_ROWS:
        tiles = _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)

        def run(x: Tensor) -> Tensor:
            q, has_nan = ext.quantize(x.reshape(rows, in_f), frac, lo, hi, floor, False)
            if has_nan:
                raise _nan_error()
            return ext.scale(ext.gemv(q, tiles, out_f, b), exponent, out64).reshape(out_shape)

        return run
    plan = _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows)

    def run(x: Tensor) -> Tensor:
        xt = x.reshape(rows, in_f).t().contiguous().reshape(1, in_f, 1, 1, rows)
        y, has_nan = ext.conv_fused(xt, [out_f, in_f, 1, 1, 1], plan, b, 1, [1, 1, 1], [0, 0, 0], [1, 1, 1],
                                    frac, lo, hi, floor, lanes, exponent, None, None, False)
        if has_nan:
            raise _nan_error()
        return y.reshape(out_f, rows).t().contiguous().reshape(out_shape)

    return run


def fake_quantize(x: Tensor, frac_bits: int, lo: float, hi: float, floor: bool,
                  band: tuple[float, float] = (-math.inf, math.inf)) -> tuple[Tensor, bool] | None:
    """``(clamp(round(x * 2**F), lo, hi) * 2**-F, outside)`` for a float32 CPU tensor in one pass.

    The forward of :func:`deepshift.fixed_point` (training-time activation rounding), bit for bit
    the same float32 operations as its torch path, which takes four passes over memory.
    ``outside`` tells whether some element has ``x <= band[0]`` or ``x >= band[1]`` (bounds
    rounded to float32; NaN counts as inside), i.e. whether the straight-through gradient masks
    anything. Returns None when the native kernels are unavailable or ``x`` is not a float32 CPU
    tensor.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or not eager():
        return None
    ext = load_extension()
    if ext is None:
        return None
    return ext.fake_quantize(x.contiguous(), frac_bits, float(lo), float(hi), floor, float(band[0]),
                             float(band[1]))


def _weight_pass_ok(t: Tensor, p_min: int, p_max: int) -> bool:
    """Whether the native weight-rounding passes apply: a float32/float64 CPU tensor, eager mode, and
    ``2**p_min`` .. ``2**p_max`` normal numbers of its dtype (the passes build powers of two from bits)."""
    if t.device.type != "cpu" or t.dtype not in _FLOAT_DTYPES or not eager():
        return False
    info = torch.finfo(t.dtype)
    return 2.0**p_min >= info.tiny and 2.0**p_max <= info.max


def q_round(weight: Tensor, p_min: int, p_max: int, threshold: float) -> Tensor | None:
    """DeepShift-Q's deterministic rounded weight ``sign(w) * 2**round(log2|w|)`` in one native pass.

    The forward of :func:`deepshift.quantize.q_weight`, bit for bit its torch path (``threshold``:
    the least value of the dtype above ``sqrt(1/2)``, where ``round(log2 m)`` steps up), which takes
    about ten passes over the weight. Returns None when the native kernels are unavailable or do not
    apply (see ``_weight_pass_ok``).
    """
    if not _weight_pass_ok(weight, p_min, p_max):
        return None
    ext = load_extension()
    if ext is None:
        return None
    return ext.q_round(weight.contiguous(), 2.0**p_min, 2.0**p_max, threshold)


def ps_round(shift: Tensor, sign: Tensor, p_min: int, p_max: int) -> Tensor | None:
    """DeepShift-PS's deterministic weight ``sign(round(sign)) * 2**round(clamp(shift))`` in one native
    pass: the forward of :func:`deepshift.quantize.ps_weight`, bit for bit its torch path. Returns None
    when the native kernels are unavailable or do not apply."""
    if (not _weight_pass_ok(shift, p_min, p_max) or sign.dtype != shift.dtype or sign.shape != shift.shape
            or sign.device != shift.device):
        return None
    ext = load_extension()
    if ext is None:
        return None
    return ext.ps_round(shift.contiguous(), sign.contiguous(), float(p_min), float(p_max))


def quantize_input(x: Tensor, act_bits: tuple[int, int], rounding: str, dtype: torch.dtype) -> Tensor | None:
    """Fused fixed-point rounding of a frozen layer's input: ``clamp(round(x * 2**F), lo, hi)`` as ``dtype``.

    Equal, element for element, to ``to_fixed_point_int(x.double(), act_bits, rounding).to(dtype)``
    for float32/float64 CPU tensors (a power-of-two scale, rounding and clamping are exact in
    float64), in one pass instead of several. Raises ValueError on NaN. Returns None when the
    native kernels are unavailable or ``x`` is of another dtype/device (use the torch path then).
    Offered to :mod:`deepshift.modules` (the frozen layers), whose float64 path dominates a frozen
    model's time outside the shift ops.
    """
    ext = load_extension()
    if (
        ext is None
        or not eager()
        or x.device.type != "cpu"
        or x.dtype not in _FLOAT_DTYPES
        or dtype not in (torch.int32, torch.int64)
        or rounding not in ("nearest", "floor")
    ):
        return None
    total = act_bits[0] + act_bits[1]
    q, has_nan = ext.quantize(
        x, act_bits[1], -(2 ** (total - 1)), 2 ** (total - 1) - 1, rounding == "floor", dtype == torch.int64
    )
    if has_nan:
        raise _nan_error()
    return q


def scale_output(y: Tensor, exponent: int, dtype: torch.dtype) -> Tensor | None:
    """Fused ``(y.double() * 2**exponent).to(dtype)`` for int32/int64 ``y`` and float32/float64 ``dtype``.

    Returns None when the native kernels are unavailable or the dtypes are others.
    """
    ext = load_extension()
    if (
        ext is None
        or not eager()
        or y.device.type != "cpu"
        or y.dtype not in (torch.int32, torch.int64)
        or dtype not in (torch.float32, torch.float64)
    ):
        return None
    return ext.scale(y, exponent, dtype == torch.float64)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor | None:
    """``torch.add(torch.mul(x, scale[c]), shift[c])`` over x's channel dimension 1, in one native pass
    (bit for bit the same: a multiply, then an add, each rounded): :class:`deepshift.FrozenBatchNorm`'s
    forward. ``scale`` and ``shift``: contiguous (C,) tensors of x's dtype on one device (the native op
    checks shape and dtype). None when the native kernels are unavailable or x or ``scale`` is not on
    the CPU, or x is not float32/float64 (torch then raises on a device mismatch)."""
    if (not eager() or x.device.type != "cpu" or scale.device.type != "cpu" or x.dtype not in _FLOAT_DTYPES
            or x.dim() < 2):
        return None
    ext = load_extension()
    if ext is None:
        return None
    return ext.channel_affine(x.contiguous(), scale, shift)


def register() -> None:
    """Register the CPU kernels for the two ops (done once, at import)."""
    torch.library.register_kernel("deepshift::shift_linear", "cpu", shift_linear_cpu)
    torch.library.register_kernel("deepshift::shift_conv", "cpu", shift_conv_cpu)


register()
