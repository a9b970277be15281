"""Native C++ CPU kernels: bit-exact against the reference ops, used by frozen models, safe fallback."""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import isa_paths
from torch import nn

import deepshift
from deepshift.backends.cpu import build, cache, conv, elementwise, linear, machine, register
from deepshift.ops import reference as ops
from deepshift.ops.codes import encode_codes, pack_codes
from deepshift.ops.reference import ShiftConvArgs, quantize_input_reference


def _has_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++"))


@pytest.fixture(scope="session")
def native():
    """The extension, built once per test run (cached on disk across runs)."""
    if not _has_compiler():
        pytest.skip("no C++ compiler: the native CPU kernels cannot be built here")
    if build.native_disabled():
        pytest.skip("DEEPSHIFT_NO_NATIVE is set")
    ext = build.load_extension()
    assert ext is not None, f"native build failed: {build._state['error']!r}"
    return ext


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _random_codes(rng: random.Random, numel: int, bits: int, max_field: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    c = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.int64)
    if max_field is not None:
        sign_bit = 1 << (bits - 1)
        c = (c & sign_bit) | ((c & (sign_bit - 1)) % (max_field + 1))
    return pack_codes(c.to(torch.uint8), bits)


def _rand_int(rng: random.Random, shape, mag: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randint(-mag, mag + 1, tuple(shape), generator=g, dtype=torch.int64).to(dtype)


# Magnitudes: tiny, 8-bit, 16-bit, near int32's range (int32 x wraps exactly like the reference),
# and for int64 values beyond int32.
_MAGS = [1, 127, 2**8, 2**15, 2**20, 2**30]


def _linear_case(rng: random.Random):
    bits = rng.randint(2, 8)
    has_zero = rng.random() < 0.5
    shift_lo = rng.choice([-15, -9, -3, -1, 0, 0, 2, 5, 29, 40])
    dtype = rng.choice([torch.int32, torch.int64])
    mags = _MAGS + ([2**40] if dtype == torch.int64 else [])
    mag = rng.choice(mags)
    out_f, in_f = rng.randint(1, 37), rng.randint(1, 75)
    lead = rng.choice([(1,), (2,), (3,), (4,), (5,), (9,), (2, 3), (70,), (133,)])
    x = _rand_int(rng, (*lead, in_f), mag, dtype)
    codes = _random_codes(rng, out_f * in_f, bits)
    bias = _rand_int(rng, (out_f,), mag, dtype) if rng.random() < 0.5 else None
    return (x, codes, [out_f, in_f], bits, has_zero, shift_lo, bias)


def _conv_case(rng: random.Random):
    dims = rng.choice([1, 1, 2, 2, 2, 3])
    bits = rng.randint(2, 8)
    has_zero = rng.random() < 0.5
    shift_lo = rng.choice([-15, -7, -2, 0, 0, 3, 33])
    dtype = rng.choice([torch.int32, torch.int64])
    mag = rng.choice(_MAGS)
    transposed = rng.random() < 0.25
    kind = rng.random()
    if kind < 0.2:  # depthwise
        groups = rng.randint(1, 6)
        cin_g, cout_g = 1, rng.choice([1, 1, 2])
    else:
        groups = rng.choice([1, 1, 1, 2, 3])
        cin_g, cout_g = rng.randint(1, 5), rng.randint(1, 5)
    kernel = [rng.randint(1, 3 if dims < 3 else 2) for _ in range(dims)]
    stride = [rng.choice([1, 1, 2, 3]) for _ in range(dims)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(dims)]
    padding = [rng.randint(0, 2) for _ in range(dims)]
    if dims == 1:
        sizes = [rng.choice([5, 9, 17, 70, 140])]
    elif dims == 2:
        sizes = [rng.randint(3, 12), rng.choice([4, 7, 11, 33, 75])]
    else:
        sizes = [rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 7)]
    n = rng.choice([1, 1, 2, 3])
    if transposed:
        weight_shape = [cin_g * groups, cout_g, *kernel]
        output_padding = [rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation, strict=True)]
    else:
        weight_shape = [cout_g * groups, cin_g, *kernel]
        output_padding = [0] * dims
    x = _rand_int(rng, (n, cin_g * groups, *sizes), mag, dtype)
    codes = _random_codes(rng, math.prod(weight_shape), bits)
    bias = _rand_int(rng, (cout_g * groups,), mag, dtype) if rng.random() < 0.5 else None
    return (x, codes, weight_shape, bits, has_zero, shift_lo, bias, stride, padding, dilation, groups,
            transposed, output_padding)


@pytest.mark.parametrize("isa", build.ISAS)
def test_every_isa_path(native, isa):
    """Each instruction-set path the kernels have is tested where the CPU runs it; said when not."""
    if isa not in isa_paths():
        pytest.skip(f"this CPU lacks {isa}: its kernels are not run here")
    try:
        assert build.set_isa(isa) == isa
        assert build.current_isa() == isa
    finally:
        build.set_isa("auto")


def test_benchmark_header_names_the_cpu_and_the_path_in_use(native):
    assert build.set_isa("portable") == "portable"
    try:
        line = machine.describe()  # reports the forced path, and leaves it forced
        assert machine.cpu_model() in line and "ISA path portable" in line
        assert build.current_isa() == "portable"
    finally:
        build.set_isa("auto")


def _check(op, reference, args, label):
    expected = reference(*args)
    for isa in isa_paths():
        assert build.set_isa(isa) == isa  # the path really runs (set_isa falls back where the CPU lacks it)
        try:
            got = op(*args)
        finally:
            build.set_isa("auto")
        assert got.dtype == expected.dtype and got.shape == expected.shape, label
        assert torch.equal(got, expected), f"{label} ({isa}): {(got != expected).sum()} elements differ"


@pytest.mark.parametrize("chunk", range(4))
def test_linear_bit_exact_random(native, chunk):
    rng = random.Random(1000 + chunk)
    for i in range(40):
        args = _linear_case(rng)
        _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference, args,
               f"linear case {chunk}/{i}: {args[2:6]} x {tuple(args[0].shape)} {args[0].dtype}")


@pytest.mark.parametrize("chunk", range(6))
def test_conv_bit_exact_random(native, chunk):
    rng = random.Random(2000 + chunk)
    done = 0
    while done < 40:
        args = _conv_case(rng)
        try:
            ops.shift_conv_reference(*args)
        except (ValueError, RuntimeError):
            continue  # an invalid combination (e.g. no output): the reference rejects it
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args,
               f"conv case {chunk}/{done}: {args[2:]} x {tuple(args[0].shape)} {args[0].dtype}")
        done += 1


@pytest.mark.parametrize("chunk", range(4))
def test_table_lookup_linear_bit_exact(native, chunk):
    """The table-lookup kernel (AVX-512) through the op against the reference: output counts
    across its block edges (16 x 8 and 16 x 6 outputs), odd K, 1-8 rows and batches past them,
    int32 wrap-around, 2-8 bit codes whose layers use up to 32 distinct weights (4- and 5-bit
    indices) or more (no layout: the other kernels run)."""
    if "avx512" not in isa_paths():
        pytest.skip("this CPU lacks AVX-512 F/BW/VL: the table-lookup kernel is not run here")
    rng = random.Random(9000 + chunk)
    layouts = set()
    for i in range(80):
        bits = rng.randint(2, 8)
        out_f = rng.choice([1, 5, 16, 17, 95, 96, 97, 127, 128, 129, 191, 300])
        in_f = rng.choice([1, 2, 3, 7, 64, 101, 257])
        rows = rng.choice([1, 2, 3, 4, 5, 8, 9, 33])
        max_field = rng.choice([None, 0, 3, 7, 15, 20])  # distinct amounts per sign
        codes = _random_codes(rng, out_f * in_f, bits, max_field)
        has_zero, shift_lo = rng.random() < 0.5, rng.choice([-15, -4, 0, 3, 29])
        x = _rand_int(rng, (rows, in_f), rng.choice([1, 127, 2**15, 2**31 - 1]), torch.int32)
        bias = _rand_int(rng, (out_f,), 2**20, torch.int32) if rng.random() < 0.5 else None
        args = (x, codes, [out_f, in_f], bits, has_zero, shift_lo, bias)
        build.set_isa("avx512")
        try:
            lut = linear._lut(native, codes, [out_f, in_f], bits, has_zero, shift_lo)
            layouts.add(None if lut is None else lut[2])
            got = torch.ops.deepshift.shift_linear(*args)
        finally:
            build.set_isa("auto")
        expected = ops.shift_linear_reference(*args)
        assert torch.equal(got, expected), f"case {chunk}/{i}: {args[2:6]} x {tuple(x.shape)}"
    assert layouts == {None, 4, 5}  # both index widths and the fallback were exercised
    # A full 5-bit DeepShift-Q layer: 32 distinct weights and no zero fill the 32-entry table.
    codes = pack_codes(torch.arange(32, dtype=torch.uint8).repeat(40), 5)
    x = _rand_int(rng, (3, 64), 2**15, torch.int32)
    build.set_isa("avx512")
    try:
        assert linear._lut(native, codes, [20, 64], 5, False, -20)[2] == 5
        got = torch.ops.deepshift.shift_linear(x, codes, [20, 64], 5, False, -20, None)
    finally:
        build.set_isa("auto")
    assert torch.equal(got, ops.shift_linear_reference(x, codes, [20, 64], 5, False, -20, None))


def test_prepared_int32_linear_follows_its_weights_bias_shape_and_isa(native):
    """int32 shift_linear calls keep their prepared table-lookup call per (codes, bias, arguments,
    input shape): changing the codes or bias in place, another batch or another ISA path must not
    reuse a stale one."""
    if "avx512" not in isa_paths():
        pytest.skip("this CPU lacks AVX-512 F/BW/VL: the table-lookup kernel is not run here")
    rng = random.Random(77)
    codes = _random_codes(rng, 37 * 53, 5, None)
    bias = _rand_int(rng, (37,), 2**20, torch.int32)
    x = _rand_int(rng, (2, 53), 2**15, torch.int32)

    def check(inp):
        args = (inp, codes, [37, 53], 5, False, -6, bias)
        assert torch.equal(torch.ops.deepshift.shift_linear(*args), ops.shift_linear_reference(*args))

    build.set_isa("avx512")
    try:
        check(x)
        check(x)  # the prepared call
        codes[3] ^= 0x5A
        check(x)
        bias.add_(12345)
        check(x)
        check(_rand_int(rng, (5, 53), 2**15, torch.int32))
        check(_rand_int(rng, (53,), 2**15, torch.int32))
        build.set_isa("avx2")
        check(x)
    finally:
        build.set_isa("auto")


@pytest.mark.parametrize("chunk", range(2))
def test_wide_table_lookup_linear_bit_exact(native, chunk):
    """int64 accumulators through the table-lookup kernel's wide form (int32 tables and lane sums
    added to int64 outputs every few columns): sums far past int32, flush intervals from 1 column
    up, and the calls it must refuse (an |x| << shift beyond int32) falling back, all exact."""
    if "avx512" not in isa_paths():
        pytest.skip("this CPU lacks AVX-512 F/BW/VL: the table-lookup kernel is not run here")
    rng = random.Random(9500 + chunk)
    used = refused = past_int32 = 0
    for i in range(80):
        bits = rng.randint(3, 5)
        out_f = rng.choice([1, 17, 96, 97, 129, 300])
        in_f = rng.choice([3, 64, 257, 1500])
        rows = rng.choice([1, 2, 5, 33])
        codes = _random_codes(rng, out_f * in_f, bits, rng.choice([None, 7, 15]))
        has_zero, shift_lo = rng.random() < 0.5, rng.choice([-15, -4, 0, 12])
        x = _rand_int(rng, (rows, in_f), rng.choice([2**8, 2**15, 2**20, 2**40]), torch.int64)
        bias = _rand_int(rng, (out_f,), 2**40, torch.int64) if rng.random() < 0.5 else None
        args = (x, codes, [out_f, in_f], bits, has_zero, shift_lo, bias)
        build.set_isa("avx512")
        try:
            lut = linear._wide_layout(native, codes, [out_f, in_f], bits, has_zero, shift_lo)
            if lut is not None:
                u = min(shift_lo, 0)
                bias64 = None if bias is None else torch.bitwise_left_shift(bias, -u)
                wide = native.gemv_lut(x, *lut, out_f, bias64, True)  # int64 x, as the op passes it
                used, refused = used + (wide is not None), refused + (wide is None)
            got = torch.ops.deepshift.shift_linear(*args)
        finally:
            build.set_isa("auto")
        expected = ops.shift_linear_reference(*args)
        past_int32 += int(expected.abs().max()) >= 2**31
        assert torch.equal(got, expected), f"case {chunk}/{i}: {args[2:6]} x {tuple(x.shape)}"
    assert used >= 10 and refused >= 5 and past_int32 >= 10, (used, refused, past_int32)


@pytest.mark.parametrize("act_bits", [(8, 8), (16, 8)])
def test_frozen_int64_layers_take_the_wide_kernel_or_fall_back_exactly(native, act_bits):
    """A frozen 5-bit Linear whose worst case needs int64 (fan-in 1500, 13 shifts, 16-bit inputs):
    inputs from tiny to saturating, through the op (wide kernel; with 24-bit inputs the large ones
    are refused and run the reference composition) against the reference, on every ISA path."""
    torch.manual_seed(3)
    layer = deepshift.convert_(nn.Linear(1500, 97), deepshift.QConfig(weight_bits=5, act_bits=act_bits))
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(torch.logspace(0, 4, 1500, base=2))
    frozen = deepshift.freeze_(layer.eval())
    assert frozen.accumulator == "int64" and frozen.shift_hi - frozen.shift_lo >= 10
    for scale in (1e-3, 1.0, 30.0, 1e6):
        x = torch.randn(3, 1500) * scale
        for isa in isa_paths():
            build.set_isa(isa)
            try:
                got = frozen(x)
            finally:
                build.set_isa("auto")
            expected = ops.frozen_linear_reference(x, frozen.codes, frozen.bias_int, frozen._spec_json)
            assert torch.equal(got, expected), (scale, isa)
        if "avx512" in isa_paths():  # the wide kernel runs, and refuses only the 24-bit saturating input
            build.set_isa("avx512")
            try:
                run = linear._prepare_linear_wide(x, frozen.codes, [97, 1500], 5, False, frozen.shift_lo,
                                                  frozen.bias_int, list(act_bits), "nearest")
                assert run is not None and (run.run(x)[0] is None) == (act_bits == (16, 8) and scale == 1e6)
            finally:
                build.set_isa("auto")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("has_zero", [False, True])
def test_every_bit_width_and_code(native, bits, has_zero):
    # Every code value of the width appears; shifts from shift_lo = -(2**(bits-1)) + 1 upwards.
    numel = 2**bits
    codes = pack_codes(torch.arange(numel, dtype=torch.uint8).repeat(3), bits)
    for dtype in (torch.int32, torch.int64):
        x = torch.arange(-7, 7, dtype=dtype).reshape(2, 7).repeat(1, 3 * numel // 7 + 1)[:, : 3 * numel]
        args = (x.contiguous(), codes, [1, 3 * numel], bits, has_zero, -(2 ** (bits - 1)) + 1, None)
        _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference, args, f"codes {bits}")
        wide = (x.contiguous(), pack_codes(torch.arange(numel, dtype=torch.uint8).repeat(3 * 8), bits),
                [8, 3 * numel], bits, has_zero, 0, torch.arange(8, dtype=dtype))
        _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference, wide, f"codes8 {bits}")


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_int64_fast_path_boundary(native, rows):
    # fan_in * max|x| * 2**max_amount + max|bias| crosses 2**31 by one: int32 lanes just below,
    # int64 lanes at and above; both exact. Weights: all +2**3 (code field 3, Q, shift_lo 0).
    fan_in = 4
    codes = pack_codes(torch.full((5 * fan_in,), 3, dtype=torch.uint8), 3)
    for max_x in (2**26 - 1, 2**26, 2**26 + 1):
        x = torch.full((rows, fan_in), max_x, dtype=torch.int64)
        x[0, 0] = -max_x
        for bias in (None, torch.full((5,), 1, dtype=torch.int64)):
            args = (x, codes, [5, fan_in], 3, False, 0, bias)
            _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference, args, f"boundary {max_x}")
    conv_codes = pack_codes(torch.full((2 * 2 * 3,), 3, dtype=torch.uint8), 3)
    for max_x in (2**27 // 3 - 1, 2**27 // 3 + 1):
        x = torch.full((1, 2, 9), max_x, dtype=torch.int64)
        args = (x, conv_codes, [2, 2, 3], 3, False, 0, None, [1], [1], [1], 1, False, [0])
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, f"conv boundary {max_x}")


def test_int32_overflow_wraps_like_reference(native):
    x = torch.full((2, 300), 2**30, dtype=torch.int32)
    codes = pack_codes(torch.full((7 * 300,), 5, dtype=torch.uint8), 4)
    args = (x, codes, [7, 300], 4, False, 0, torch.full((7,), 2**30, dtype=torch.int32))
    _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference, args, "overflow")


def test_large_shapes(native):
    rng = random.Random(7)
    x = _rand_int(rng, (2, 16, 20, 37), 127, torch.int32)
    codes = _random_codes(rng, 24 * 16 * 9, 5)
    args = (x, codes, [24, 16, 3, 3], 5, True, -9, None, [1, 1], [1, 1], [1, 1], 1, False, [0, 0])
    _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, "conv 16->24")
    x = _rand_int(rng, (3, 300), 2**10, torch.int64)
    codes = _random_codes(rng, 129 * 300, 5)
    _check(torch.ops.deepshift.shift_linear, ops.shift_linear_reference,
           (x, codes, [129, 300], 5, False, -15, None), "linear 300->129")


def test_cache_follows_in_place_weight_changes(native):
    rng = random.Random(3)
    x = _rand_int(rng, (2, 40), 100, torch.int32)
    codes = _random_codes(rng, 9 * 40, 5)
    args = [x, codes, [9, 40], 5, True, -4, None]
    first = torch.ops.deepshift.shift_linear(*args)
    assert torch.equal(first, ops.shift_linear_reference(*args))
    codes.copy_(_random_codes(rng, 9 * 40, 5))  # bumps codes._version
    second = torch.ops.deepshift.shift_linear(*args)
    assert torch.equal(second, ops.shift_linear_reference(*args))
    assert not torch.equal(first, second)
    x64 = _rand_int(rng, (70, 40), 100, torch.int32)
    args[0] = x64
    assert torch.equal(torch.ops.deepshift.shift_linear(*args), ops.shift_linear_reference(*args))


def test_caches_let_go_of_a_deleted_model(native):
    # Prepared forwards and weight tiles are keyed by the codes tensor; they must be freed with the
    # model, not kept until eviction (a server that loads models in turn would otherwise grow).
    import gc

    cache.clear_cache()
    for _ in range(3):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
        deepshift.freeze_(deepshift.convert_(net, deepshift.PSConfig(weight_bits=5)), act_bits=(8, 4))
        net.eval()
        with torch.no_grad():
            net(torch.randn(1, 3, 8, 8))
            net(torch.randn(16, 3, 8, 8))
        assert len(cache._fused) + len(cache._cache) > 0  # the model did use the caches
        assert native.remembered_count() == len(cache._fused)  # the op kernels find every prepared forward
        del net
        gc.collect()
        assert (len(cache._fused), len(cache._cache), cache._cache_bytes[0]) == (0, 0, 0)
        assert native.remembered_count() == 0


def test_frozen_ops_dispatch_to_native(native, monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(native, name)
            return lambda *a, **k: (calls.append(name), attr(*a, **k))[1]

    monkeypatch.setitem(build._state, "ext", Spy())
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(nn.Linear(6, 3)), deepshift.QConfig()))
    layer(torch.randn(2, 6))
    conv = deepshift.freeze_(deepshift.convert_(nn.Sequential(nn.Conv2d(2, 3, 3)), deepshift.QConfig()))
    x = torch.randn(1, 2, 5, 5)
    conv(x)
    # Eager frozen layers take the fused native forward (prepared once, run in C++: see
    # test_frozen_op_kernels_run_remembered_forwards); the op itself dispatches to the native conv.
    small_batch = "lut_layout" if build.current_isa() == "avx512" else "gemv_layout"
    assert small_batch in calls and {"PreparedLinear", "PreparedConv", "conv_plan"} <= set(calls)
    assert "conv" not in calls
    layer = conv[0]
    q = torch.ops.deepshift.quantize_input(x, list(layer.act_bits), layer.act_rounding, torch.int32)
    torch.ops.deepshift.shift_conv(q, layer.codes, list(layer.weight_shape), 5, False, layer.shift_lo,
                                   layer.bias_int, [1, 1], [0, 0], [1, 1], 1, False, [0, 0])
    assert "quantize" in calls and "conv" in calls


def _digits_cnn():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    return net, x[1400:]


@pytest.mark.parametrize("config", [deepshift.QConfig(weight_bits=5, act_bits=(4, 8)),
                                    deepshift.PSConfig(weight_bits=4), deepshift.QConfig(weight_bits=8)])
def test_frozen_model_logits_equal_native_on_and_off(native, monkeypatch, config):
    net, x_test = _digits_cnn()
    deepshift.convert_(net, config)
    net.eval()
    frozen = deepshift.freeze_(net)
    if config.weight_bits != 5:
        x_test = x_test[:100]  # the whole test set once (5 bits); a slice for the other configs
    with torch.no_grad():
        on = frozen(x_test)
        for x in (x_test[:1], x_test[:3]):
            assert torch.equal(frozen(x), on[: len(x)])
        monkeypatch.setenv("DEEPSHIFT_NO_NATIVE", "1")
        assert build.load_extension() is None
        off = frozen(x_test)
    assert torch.equal(on, off)


def test_build_failure_warns_once_and_falls_back(native, monkeypatch):
    saved = dict(build._state)

    def broken():
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(build, "_build", broken)
    build.reset_state()
    try:
        rng = random.Random(5)
        args = _linear_case(rng)
        conv_args = (_rand_int(rng, (1, 2, 6), 9, torch.int32), _random_codes(rng, 12, 4), [2, 2, 3], 4,
                     False, -2, None, [1], [1], [1], 1, False, [0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = torch.ops.deepshift.shift_linear(*args)
            y2 = torch.ops.deepshift.shift_conv(*conv_args)
            y3 = torch.ops.deepshift.shift_linear(*args)
        ours = [w for w in caught if "native CPU kernels unavailable" in str(w.message)]
        assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
        assert torch.equal(y1, ops.shift_linear_reference(*args)) and torch.equal(y1, y3)
        assert torch.equal(y2, ops.shift_conv_reference(*conv_args))
        assert not build.native_available()
    finally:
        build.reset_state()
        build._state.update(saved)


def test_env_var_disables_native_without_warning():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, deepshift\n"
        "from deepshift.backends.cpu import build\n"
        "x = torch.arange(6, dtype=torch.int32).reshape(2, 3)\n"
        "c = deepshift.pack_codes(torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.uint8), 4)\n"
        "y = torch.ops.deepshift.shift_linear(x, c, [2, 3], 4, False, -1, None)\n"
        "from deepshift.ops.reference import shift_linear_reference as ref\n"
        "assert torch.equal(y, ref(x, c, [2, 3], 4, False, -1, None))\n"
        "assert not build.native_available() and build._state['tried'] is False\n"
        "print('ok')\n"
    )
    env = dict(os.environ, DEEPSHIFT_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_frozen_ops_get_their_cpp_kernels_when_the_extension_loads(native):
    # In a new process the frozen ops run their reference until some op loads the extension (here
    # the model's first forward), and their C++ kernels from then on; the results are the same.
    code = (
        "import torch, deepshift\n"
        "def cpu_kernel():\n"
        "    table = torch._C._dispatch_dump_table('deepshift::frozen_conv').splitlines()\n"
        "    return [line for line in table if line.startswith('CPU:')]\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(27, 4))\n"
        "x = torch.randn(1, 2, 5, 5)\n"
        "with torch.no_grad():\n"
        "    before = cpu_kernel()\n"
        "    net = deepshift.freeze_(deepshift.convert_(net, deepshift.QConfig(act_bits=(4, 4))))\n"
        "    first, second, third = net(x), net(x), net(x)\n"
        "assert 'schemas.py' in before[0] and 'csrc/frozen.cpp' in cpu_kernel()[0], (before, cpu_kernel())\n"
        "assert torch.equal(first, second) and torch.equal(first, third)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("act_bits", [(4, 4), (8, 8), (3, 5), (16, 16)])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_fused_quantize_and_scale_equal_the_module_path(native, act_bits, rounding):
    from deepshift.core.quantize import to_fixed_point_int

    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 1000, generator=g, dtype=torch.float64) * 2 ** act_bits[0]
        halves = (torch.arange(-600, 600, dtype=torch.float64) + 0.5) * 2.0 ** -act_bits[1]
        specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e30, -1e30, 2.0**-30])
        x = torch.cat([x.reshape(-1), halves, specials]).to(dtype)
        for out in (torch.int32, torch.int64):
            expected = to_fixed_point_int(x.double(), act_bits, rounding).to(out)
            got = elementwise.quantize_input_cpu(x, list(act_bits), rounding, out)
            assert got.dtype == out and torch.equal(got, expected)
            for exponent in (-act_bits[1], -20, 3):
                want = (expected.double() * 2.0**exponent).to(dtype)
                assert torch.equal(elementwise.scale_output_cpu(expected, exponent, dtype), want)
    with pytest.raises(ValueError, match="NaN"):
        elementwise.quantize_input_cpu(torch.tensor([1.0, float("nan")]), list(act_bits), rounding,
                                       torch.int32)
    half = torch.ones(2, dtype=torch.float16)  # not the native pass's dtype: the reference computes
    assert torch.equal(elementwise.quantize_input_cpu(half, list(act_bits), rounding, torch.int32),
                       quantize_input_reference(half, list(act_bits), rounding, torch.int32))


def _fixed_point_torch(x, frac_bits, lo, hi, floor):
    y = x * 2.0**frac_bits
    y = y.floor_() if floor else y.round_()
    return y.clamp_(lo, hi).mul_(2.0**-frac_bits)


@pytest.mark.parametrize("act_bits", [(1, 0), (4, 4), (8, 8), (1, 7), (16, 16), (12, 20), (2, 30)])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_fused_fake_quantize_equals_the_torch_path_bit_for_bit(native, act_bits, rounding):
    from deepshift.core.quantize import fixed_point, fixed_point_limits

    lo, hi = fixed_point_limits(act_bits)
    floor = rounding == "floor"
    frac = act_bits[1]
    band = ((lo if floor else lo - 0.5) * 2.0**-frac, (hi + 1 if floor else hi + 0.5) * 2.0**-frac)
    g = torch.Generator().manual_seed(sum(act_bits) * 2 + floor)
    for n in (1, 7, 8, 9, 1000, 70001):  # vector body, scalar tail, several threads' chunks
        for special in (True, False):
            x = torch.randn(n, generator=g) * 2.0 ** torch.randint(-12, 12, (n,), generator=g).float()
            k = torch.randint(lo - 3, hi + 4, (n // 3,), generator=g).double()
            x[: n // 3] = ((k + 0.5) * 2.0**-frac).float()  # ties and saturation bounds
            if special:
                x[::11] = float("nan")
                x[1::13], x[2::17], x[3::19] = float("inf"), -float("inf"), -0.0
            else:  # everything strictly inside the gradient's band
                x = x.clamp(band[0] * 0.99, band[1] * 0.99).nan_to_num(0.0)
            want = _fixed_point_torch(x, frac, lo, hi, floor)
            lo_f, hi_f = torch.tensor(band, dtype=torch.float32)
            want_outside = bool(((x <= lo_f) | (x >= hi_f)).any())
            for isa in isa_paths():
                assert build.set_isa(isa) == isa
                try:
                    got, outside = elementwise.fake_quantize_cpu(x, frac, lo, hi, floor, *band)
                finally:
                    build.set_isa("auto")
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, n)
                assert bool(outside) == want_outside, (isa, n, special)
            # deepshift.fixed_point takes this path for float32 CPU tensors: the same bits, and the
            # same gradient as the torch path's masked backward (an identity when nothing is outside).
            xr = x.clone().requires_grad_()
            y = fixed_point(xr, act_bits, rounding)
            assert torch.equal(y.view(torch.int32), want.view(torch.int32))
            upstream = torch.randn(n, generator=g)
            y.backward(upstream)
            expected = torch.ops.aten.hardtanh_backward(upstream, x, band[0], band[1])
            assert torch.equal(xr.grad, expected)
    # float64 is not the native pass's: the kernel hands it to the reference
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(elementwise.fake_quantize_cpu(ones, 4, -8, 7, False, -math.inf, math.inf)[0],
                       _fixed_point_torch(ones, 4, -8, 7, False))
    strided = torch.randn(6, 5, generator=g).t()  # non-contiguous input
    assert torch.equal(elementwise.fake_quantize_cpu(strided, 4, -128, 127, False, -math.inf, math.inf)[0],
                       _fixed_point_torch(strided, 4, -128, 127, False))


# --- Flat mode (stride 1, rows narrower than a vector computed as one long row) -------------------


@pytest.mark.parametrize("mag", [127, 2**15, 2**40])  # int16 tables, int32 lanes, int64 lanes
@pytest.mark.parametrize("shape", [(1, 70, 8, 8), (2, 5, 4, 9), (3, 3, 2, 6), (1, 9, 7, 3)])
def test_conv_flat_rows_bit_exact(native, mag, shape):
    # 8x8 planes (16-lane vectors half idle row by row), odd widths, one-row planes; 70 channels
    # split into several channel blocks, so the flat partial sums are accumulated across blocks.
    rng = random.Random(mag + shape[1])
    dtype = torch.int64 if mag > 2**31 else torch.int32
    n, c, h, w = shape
    for kernel, pad, dil in (([3, 3], [1, 1], [1, 1]), ([1, 3], [0, 2], [1, 2]), ([2, 1], [0, 0], [1, 1])):
        x = _rand_int(rng, (n, c, h, w), mag, dtype)
        codes = _random_codes(rng, 6 * c * kernel[0] * kernel[1], 5)
        bias = _rand_int(rng, (6,), mag, dtype)
        args = (x, codes, [6, c, *kernel], 5, True, -3, bias, [1, 1], pad, dil, 1, False, [0, 0])
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, f"flat {shape} {kernel}")
    x3 = _rand_int(rng, (2, 4, 3, 5, 6), mag, dtype)  # 3-d: flat over (depth, rows) planes
    codes = _random_codes(rng, 5 * 4 * 8, 4)
    args = (x3, codes, [5, 4, 2, 2, 2], 4, False, 0, None, [1, 1, 1], [1, 0, 1], [1, 2, 1], 1, False,
            [0, 0, 0])
    _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, "flat 3-d")


@pytest.mark.parametrize("mag", [127, 2**15, 2**40])  # int16 tables, int32 lanes, int64 lanes
@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (1, 2), (2, 1), (2, 3)])
def test_conv_flat_strided_bit_exact(native, mag, stride):
    # Strided convolutions over the phase-split table (output rows RW apart whatever the stride):
    # narrow outputs go flat (asserted on the plan for int16 tables), wider ones row by row; both
    # orders on every ISA path, with dilation, odd sizes, several channel blocks, biases, 1-d and 3-d.
    rng = random.Random(mag + 10 * stride[0] + stride[1])
    dtype = torch.int64 if mag > 2**31 else torch.int32
    for (n, c, h, w), kernel, pad, dil in (((2, 70, 15, 15), [3, 3], [1, 1], [1, 1]),
                                           ((1, 9, 7, 6), [3, 3], [1, 1], [1, 1]),
                                           ((2, 5, 13, 11), [3, 2], [2, 0], [2, 3]),
                                           ((1, 6, 9, 40), [1, 3], [0, 1], [1, 1]),
                                           ((1, 4, 6, 7), [1, 1], [0, 0], [1, 1])):
        x = _rand_int(rng, (n, c, h, w), mag, dtype)
        codes = _random_codes(rng, 6 * c * kernel[0] * kernel[1], 5)
        bias = _rand_int(rng, (6,), mag, dtype)
        args = (x, codes, [6, c, *kernel], 5, True, -3, bias, list(stride), pad, dil, 1, False, [0, 0])
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args,
               f"strided {stride} {(n, c, h, w)} {kernel}")
    w5 = torch.zeros(6, 70, 1, 3, 3, dtype=torch.int8)
    plan = native.conv_plan(w5, [2, 70, 1, 15, 15], 1, [1, *stride], [0, 1, 1], [1, 1, 1], 2,
                            conv.TABLE_BLOCK_BYTES, conv.INT16_MAX_GROUP)
    # The 70-channel case above ran flat where its rows were half-empty vectors (8 outputs wide);
    # with 15 outputs per row (width stride 1) whole rows need fewer vectors than the flat row.
    assert plan[4].tolist()[2] == (stride[1] > 1), stride
    x3 = _rand_int(rng, (2, 4, 3, 7, 8), mag, dtype)  # 3-d: depth stride 1, flat over (depth, rows)
    codes = _random_codes(rng, 5 * 4 * 8, 4)
    args = (x3, codes, [5, 4, 2, 2, 2], 4, False, 0, None, [1, *stride], [1, 0, 1], [1, 2, 1], 1, False,
            [0, 0, 0])
    _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, f"strided 3-d {stride}")


@pytest.mark.parametrize("mag", [128, 2**15, 2**20])  # int16 / int32 tables with int64 sums; int64 lanes
@pytest.mark.parametrize("chunk", range(3))
def test_conv_int64_accumulators_on_narrow_tables_bit_exact(native, monkeypatch, mag, chunk):
    """int64 inputs whose worst case needs int64 (large shifts) but whose values fit an int16 or int32
    table: each shift group summed in the table's lanes in chunks (255 / 65535 terms), Horner's rule
    in int64 (conv_wide); bit for bit the reference, on every ISA path. Shapes: channel counts that
    make several chunks per group (70 x 3 x 3 = 630 terms) and channel blocks, strides (half rows),
    flat planes, groups, dilation, 1-d and 3-d, sums near the int64 range (wrapping like torch)."""
    ext = native
    wide, calls = ext.conv_wide, []

    def counted(x, *rest):
        calls.append(x.dtype)
        return wide(x, *rest)

    monkeypatch.setattr(ext, "conv_wide", counted)
    rng = random.Random(7000 + 10 * chunk + (mag % 97))
    cases = 0
    for _ in range(12):
        dims = rng.choice([1, 2, 2, 2, 3])
        groups = rng.choice([1, 1, 2, 5])
        cin_g, cout_g = rng.choice([(70, 3), (1, 2), (4, 5), (33, 2)])
        kernel = [rng.choice([1, 3]) for _ in range(dims)]
        stride = [rng.choice([1, 1, 2]) for _ in range(dims)]
        dilation = [rng.choice([1, 2]) for _ in range(dims)]
        padding = [rng.randint(0, 2) for _ in range(dims)]
        sizes = {1: [rng.choice([9, 40])], 2: [rng.randint(3, 9), rng.choice([5, 8, 17, 30])],
                 3: [3, 4, rng.choice([5, 9])]}[dims]
        bits = rng.choice([4, 5, 6, 8])
        shift_lo = rng.choice([20, 33, 45])  # shifts up to 2**(shift_lo + 2**(bits-1)): int64 needed
        x = _rand_int(rng, (rng.choice([1, 2]), cin_g * groups, *sizes), mag, torch.int64)
        codes = _random_codes(rng, cout_g * groups * cin_g * math.prod(kernel), bits)
        bias = _rand_int(rng, (cout_g * groups,), 2**50, torch.int64) if rng.random() < 0.5 else None
        args = (x, codes, [cout_g * groups, cin_g, *kernel], bits, rng.random() < 0.5, shift_lo, bias, stride,
                padding, dilation, groups, False, [0] * dims)
        try:
            ops.shift_conv_reference(*args)
        except (ValueError, RuntimeError):
            continue
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args,
               f"wide {mag} {args[2:]} x {tuple(x.shape)}")
        cases += 1
    assert cases >= 8
    # The narrow tables took the calls their inputs fit (some inputs may prove int32 enough).
    expected = {128: torch.int16, 2**15: torch.int32}.get(mag)
    assert set(calls) == ({expected} if expected else set()), calls


def _narrow_bound_codes(has_zero: bool) -> tuple[torch.Tensor, list[int]]:
    """5-bit codes of a (6, 257) 1x1 conv weight whose shift groups put the int16 Horner sums of
    conv_item_n at the plan's fold bound (255 * 128) and one term past it: output 0, 127 weights
    at 2**7 then one at each lower power (bound 127, 255: no fold; then a fold); output 1 the same
    negative; output 2, 255 at 2**7 (a whole chunk) then 2 at 2**6 (fold); output 3, 64 at 2**9,
    127 at 2**8 (bound 255) then the rest at 2**7, 2**1 and 2**0 alternating signs; outputs 4 and 5
    random shifts. Unused weights are zero (PS) or 2**0 (Q)."""
    cin = 257
    shift = torch.zeros(6, cin, dtype=torch.int64)
    sign = torch.zeros(6, cin, dtype=torch.int64) if has_zero else torch.ones(6, cin, dtype=torch.int64)

    def put(o, start, n, p, s=1):
        shift[o, start:start + n] = p
        sign[o, start:start + n] = s

    for o, s in ((0, 1), (1, -1)):
        put(o, 0, 127, 7, s)
        for i in range(7):
            put(o, 127 + i, 1, 6 - i, s)
    put(2, 0, 255, 7)
    put(2, 255, 2, 6)
    put(3, 0, 64, 9)
    put(3, 64, 127, 8)
    for i in range(191, cin):
        put(3, i, 1, (7, 1, 0)[i % 3], 1 if i % 2 else -1)
    g = torch.Generator().manual_seed(11)
    shift[4:] = torch.randint(0, 15, (2, cin), generator=g)
    sign[4:] = torch.randint(0, 2, (2, cin), generator=g) * 2 - 1
    codes = pack_codes(encode_codes(shift, sign, 5, has_zero, 0).flatten(), 5)
    return codes, [6, cin, 1, 1]


@pytest.mark.parametrize("has_zero", [False, True])
def test_conv_int16_horner_at_the_fold_bound_bit_exact(native, monkeypatch, has_zero):
    """The 8-bit path's Horner steps run on int16 sums until the plan's bound says the next could
    overflow: inputs of magnitude 128 (every one -128, every one +127, alternating) on weights that
    take the sums exactly to that bound and one group past it, every ISA path, bit for bit; the int16
    table really ran."""
    calls = []
    conv = native.conv

    def counted(x, *rest):
        calls.append(x.dtype)
        return conv(x, *rest)

    monkeypatch.setattr(native, "conv", counted)
    codes, shape = _narrow_bound_codes(has_zero)
    cin = shape[1]
    alternating = torch.tensor([-128, 127] * cin)[:cin].reshape(1, cin, 1, 1)
    inputs = (torch.full((1, cin, 3, 5), -128), torch.full((1, cin, 3, 5), 127),
              alternating.expand(2, cin, 3, 5), -alternating.expand(1, cin, 4, 17))
    for x in inputs:
        x = x.to(torch.int32).contiguous()
        args = (x, codes, shape, 5, has_zero, 0, None, [1, 1], [0, 0], [1, 1], 1, False, [0, 0])
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args, f"fold bound {tuple(x.shape)}")
    assert set(calls) == {torch.int16}, calls


@pytest.mark.parametrize("oh", [1, 2, 3, 5, 7, 8, 9, 13, 15])  # row blocks of 8, 6, 4, 3, 2, 1 and remainders
def test_conv_half_width_rows_bit_exact(native, oh):
    # Rows of at most 8 outputs on int16 tables, with stride 2 and stride 1 (flat or half, by CPU
    # and geometry): 8-lane items, one row each; 70 channels make several channel blocks.
    rng = random.Random(oh)
    for stride, width, channels in ((2, 15, 70), (2, 6, 3), (1, 8, 70), (1, 5, 4)):
        h = (oh - 1) * stride + 1
        x = _rand_int(rng, (2, channels, h, width), 127, torch.int32)  # padding 1: oh output rows
        codes = _random_codes(rng, 5 * channels * 9, 6)
        bias = _rand_int(rng, (5,), 127, torch.int32)
        args = (x, codes, [5, channels, 3, 3], 6, rng.random() < 0.5, -4, bias, [stride, stride], [1, 1],
                [1, 1], 1, False, [0, 0])
        _check(torch.ops.deepshift.shift_conv, ops.shift_conv_reference, args,
               f"half oh={oh} s{stride} w{width}")


# --- The frozen layers' fused native forward ------------------------------------------------------

# act_bits with I + F <= 8 take the int16 tables, the others int32 ones.
_FUSED_ACT_BITS = [(4, 4), (1, 7), (3, 3), (2, 6), (8, 8), (6, 10), (12, 4), (1, 0)]


@contextlib.contextmanager
def _op_path():
    """Frozen layers run as the reference composes them (quantize_input, shift op, scale_output: each
    the op's own CPU kernel), not as one fused native call."""
    build.set_fused(False)
    try:
        yield
    finally:
        build.set_fused(True)


def _fused_used(layer, x) -> bool:
    """Whether the layer's op takes the fused native forward for x."""
    args = (x, layer.codes, list(layer.weight_shape), layer.weight_bits, layer.has_zero, layer.shift_lo,
            layer.bias_int)
    act = (list(layer.act_bits), layer.act_rounding, layer.accumulator)
    if isinstance(layer, deepshift.ShiftLinear):
        return linear._prepare_linear_fused(*args, *act) is not None
    if x.dim() == len(layer.kernel_size) + 1:  # unbatched: the layer adds the batch dimension
        args = (x.unsqueeze(0), *args[1:])
    if layer.transposed or layer._pad_outside:
        return False
    conv_args = ShiftConvArgs(*args[1:], list(layer.stride), list(layer.padding), list(layer.dilation),
                              layer.groups, False, [0] * len(layer.kernel_size))
    return conv._prepare_conv_fused(args[0], conv_args, *act) is not None


def _random_float_input(rng: random.Random, shape, act_bits, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    scale = rng.choice([0.05, 1.0, 4.0, 300.0])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    flat = x.view(-1)
    step = 2.0 ** -act_bits[1]
    # Exact halves between fixed-point steps (round half to even), and saturating values.
    for i in range(0, flat.numel(), 7):
        flat[i] = (rng.randint(-300, 300) + 0.5) * step
    for i in range(3, flat.numel(), 29):
        flat[i] = rng.choice([float("inf"), float("-inf"), 1e30, -1e30, -0.0, 2.0 ** act_bits[0]])
    return x


def _fused_conv_case(rng: random.Random):
    dims = rng.choice([1, 2, 2, 2, 3])
    groups = rng.choice([1, 1, 2, 3])
    depthwise = rng.random() < 0.2
    # Few or many input channels: int16 tables need at least 2**weight_bits terms per output.
    cin = groups * (1 if depthwise else rng.choice([rng.randint(1, 6), rng.randint(16, 40)]))
    cout = groups * rng.randint(1, 4)
    kernel = [rng.randint(1, 3 if dims < 3 else 2) for _ in range(dims)]
    stride = [rng.choice([1, 1, 2]) for _ in range(dims)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(dims)]
    padding = [rng.randint(0, 2) for _ in range(dims)]
    sizes = {1: lambda: [rng.choice([5, 8, 17, 40])],
             2: lambda: rng.choice([[8, 8], [16, 16], [5, 11], [7, 33], [3, 4]]),
             3: lambda: [rng.randint(2, 4), rng.randint(2, 6), rng.randint(3, 8)]}[dims]()
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = conv_type(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=rng.random() < 0.6)
    cfg_type = rng.choice([deepshift.QConfig, deepshift.PSConfig])
    act_bits = rng.choice(_FUSED_ACT_BITS)
    cfg = cfg_type(weight_bits=rng.randint(2, 8), act_bits=act_bits,
                   act_rounding=rng.choice(["nearest", "floor"]))
    with torch.no_grad():
        conv.weight.mul_(rng.choice([0.5, 4.0, 40.0]))
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(conv), cfg))[0].eval()
    batch = rng.choice([[1], [2], [3], [5], []])  # [] = unbatched
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    return layer, _random_float_input(rng, (*batch, cin, *sizes), act_bits, dtype)


def _op_path_output(monkeypatch, layer, x):
    """``layer(x)`` through the op path (no fused kernel), or None where these options have no output."""
    monkeypatch.undo()
    try:
        with torch.no_grad(), _op_path():
            return layer(x)
    except (ValueError, RuntimeError):
        return None


class _SpiedConv:
    """A PreparedConv that records the arguments of each ``run`` in ``runs``."""

    def __init__(self, prepared, runs: list):
        self.prepared, self.runs, self.out_shape = prepared, runs, prepared.out_shape

    def run(self, *args):
        self.runs.append(args)
        return self.prepared.run(*args)

    def remember(self, *args):
        self.prepared.remember(*args)


def _on_every_isa(monkeypatch, layer, spy, module, *args):
    """{isa: module(*args)} for every instruction set the CPU has, each preparing ``layer``'s fused
    forward anew, with ``spy`` in place of the extension's PreparedConv."""
    monkeypatch.setattr(build.load_extension(), "PreparedConv", spy)
    results = {}
    for isa in isa_paths():
        assert build.set_isa(isa) == isa
        try:
            cache.clear_cache()  # prepare the fused forward anew
            with torch.no_grad():
                results[isa] = module(*args)
        finally:
            build.set_isa("auto")
    monkeypatch.undo()
    return results


@pytest.mark.parametrize("chunk", range(3))
def test_fused_conv_forward_equals_the_op_path(native, monkeypatch, chunk):
    rng = random.Random(7000 + chunk)
    done = fused = 0
    lanes_used = []  # the table width of every fused call: both must stay covered
    real = build.load_extension().PreparedConv

    def spy(*args):
        lanes_used.append(args[11])
        return real(*args)

    while done < 25:
        layer, x = _fused_conv_case(rng)
        expected = _op_path_output(monkeypatch, layer, x)
        if expected is None:
            continue  # no output for these options
        for isa, got in _on_every_isa(monkeypatch, layer, spy, layer, x).items():
            label = f"case {chunk}/{done} {layer.extra_repr()} {tuple(x.shape)} {x.dtype} ({isa})"
            assert got.dtype == expected.dtype and got.shape == expected.shape, label
            assert torch.equal(got, expected), f"{label}: {(got != expected).sum()} elements differ"
        fused += _fused_used(layer, x)
        # int32 layers take the fused path; int64 ones too where the inputs fit 16 bits (int16 / int32 tables)
        narrow = layer.accumulator == "int32" or sum(layer.act_bits) <= 16
        assert _fused_used(layer, x) == narrow, "int32 layers and narrow inputs take the fused path"
        done += 1
    assert fused >= 10  # most random layers need only int32 accumulators
    assert lanes_used.count(16) >= 8 and lanes_used.count(32) >= 8, lanes_used  # int16 and int32 tables


@pytest.mark.parametrize("act_bits", [(4, 4), (1, 7), (8, 8), (6, 10)])
def test_fused_conv_with_int64_accumulators_equals_the_op_path(native, monkeypatch, act_bits):
    """Layers whose worst case needs int64 accumulators (weights over a wide range of powers, large
    fan-in) run fused on int16 (8-bit activations) or int32 (16-bit) tables with int64 sums, bit for
    bit the op path on every ISA path: biases, strides, groups, 1-d to 3-d, sums past the int32 range,
    float32 and float64, with BatchNorm, residual and ReLU fused."""
    real = build.load_extension().PreparedConv
    lanes_used = []

    def spy(*args):
        lanes_used.append(args[11])
        return real(*args)

    rng = random.Random(sum(act_bits) * 31 + act_bits[0])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    cases = [(nn.Conv2d, 70, 6, 3, 1, 1, 1, (2, 9, 11)), (nn.Conv2d, 64, 4, 1, 2, 0, 1, (1, 8, 8)),
             (nn.Conv1d, 40, 6, 3, 1, 2, 2, (3, 17)), (nn.Conv3d, 33, 3, 2, 1, 1, 1, (1, 3, 4, 5)),
             (nn.Conv2d, 300, 5, 1, 1, 0, 1, (2, 7, 7))]
    for conv_type, cin, cout, k, stride, pad, groups, shape in cases:
        conv = conv_type(cin, cout, k, stride=stride, padding=pad, groups=groups)
        with torch.no_grad():  # powers of two from 2**-24 to 2**4: the int32 worst case overflows
            w = conv.weight
            power = torch.randint(-24, 5, w.shape, generator=g)
            w.copy_(torch.sign(torch.randn(w.shape, generator=g)) * 2.0**power)
        layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(conv), deepshift.QConfig(
            weight_bits=6, act_bits=act_bits)))[0].eval()
        assert layer.accumulator == "int64", layer.extra_repr()
        dtype = rng.choice([torch.float32, torch.float64])
        x = _random_float_input(rng, (shape[0], cin, *shape[1:]), act_bits, dtype)
        x[0].clamp_(2.0 ** -act_bits[1], None)  # one image of positive inputs: sums far past int32's range
        expected = _op_path_output(monkeypatch, layer, x)
        bn = _random_frozen_bn(rng, cout)
        residual = _random_float_input(rng, expected.shape, (4, 4), expected.dtype).clamp(-1e3, 1e3)
        with_bn = torch.relu(ops.channel_affine_reference(expected, *bn.affine(expected.dtype)) + residual)
        lanes_used.clear()
        fused = deepshift.ShiftConvBatchNorm(layer, bn, relu=True)
        for module, args, want in ((layer, (x,), expected), (fused, (x, residual), with_bn)):
            for isa, got in _on_every_isa(monkeypatch, layer, spy, module, *args).items():
                label = f"{layer.extra_repr()} {tuple(x.shape)} {x.dtype} ({isa})"
                assert torch.equal(got.nan_to_num(), want.nan_to_num()), f"{label}: {(got != want).sum()}"
        exponent = min(layer.shift_lo, 0) - act_bits[1]  # output = integer sum * 2**exponent
        assert expected.abs().max() * 2.0**-exponent > 2**31, "sums past the int32 range"
        wide = -16 if sum(act_bits) <= 8 else -32  # 8-bit activations: int16 tables, however few terms
        assert lanes_used and set(lanes_used) == {wide}, lanes_used


@pytest.mark.parametrize("at_bound", [False, True])
def test_int64_layers_run_in_int32_lanes_where_the_weight_sums_prove_it(native, monkeypatch, at_bound):
    """A layer frozen with int64 accumulators (fan-in times the largest power over int32's range)
    whose weights' sum of powers per output proves every value below 2**31 runs in int32 lanes (the
    int16 tables), bit for bit the op path's int64 result; one power more and it keeps int64 sums.
    Inputs all at -128 and output 0's weights all negative: its sum is 128 * (the weight sum), at the
    bound either 2**31 - 128 (int32 holds it) or exactly 2**31 (it does not: int32 would wrap)."""
    real = build.load_extension().PreparedConv
    lanes_used = []

    def spy(*args):
        lanes_used.append(args[11])
        return real(*args)

    cin = 64 if at_bound else 81
    float_conv = nn.Conv2d(cin, 2, 1, bias=False)
    with torch.no_grad():  # powers relative to the smallest used one, 2**-18: 1.0 is 2**18 units
        w = float_conv.weight.view(2, cin)
        w[0] = -1.0  # 64 of them: 2**24 units, or 63 and then -2**-1 ... -2**-18: 2**24 - 1 units
        if not at_bound:
            w[0, 63:] = -(2.0 ** -torch.arange(1, 19, dtype=torch.float32))
        w[1] = 2.0**-18
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(float_conv), deepshift.QConfig(
        weight_bits=6, act_bits=(4, 4))))[0].eval()
    assert layer.accumulator == "int64" and layer.shift_lo == -18, layer.extra_repr()
    x = torch.full((2, cin, 3, 5), -8.0)  # rounds to -128
    expected = _op_path_output(monkeypatch, layer, x)
    units = 2**31 if at_bound else 2**31 - 128
    assert torch.equal(expected[:, 0], torch.full_like(expected[:, 0], units * 2.0 ** (-18 - 4)))
    for isa, got in _on_every_isa(monkeypatch, layer, spy, layer, x).items():
        assert torch.equal(got, expected), f"({isa}): {(got != expected).sum()} differ"
    assert lanes_used and set(lanes_used) == {conv.WIDE16 if at_bound else 16}, lanes_used


@pytest.mark.parametrize("act_bits", [(4, 4), (8, 8)])
def test_fused_strided_pointwise_conv_runs_on_the_subsampled_input(native, monkeypatch, act_bits):
    """A 1x1 conv with stride and no padding (ResNet's shortcuts) runs as the stride-1 conv of every
    stride-th input: bit for bit the op path on every ISA path, odd sizes (the last partial step),
    1-d to 3-d, unbatched; the prepared call subsamples, and a padded one does not."""
    real = build.load_extension().PreparedConv
    subsampled = []

    def spy(*args):
        subsampled.append(args[-1])
        return real(*args)

    rng = random.Random(31)
    cases = [(nn.Conv2d, [2, 2], 0, (2, 70, 9, 11)), (nn.Conv2d, [3, 1], 0, (1, 40, 8, 5)),
             (nn.Conv1d, [2], 0, (3, 33, 17)), (nn.Conv3d, [1, 2, 3], 0, (2, 20, 3, 7, 8)),
             (nn.Conv2d, [2, 3], 0, (40, 13, 14)), (nn.Conv2d, [2, 2], 1, (1, 40, 9, 9))]
    for conv_type, stride, padding, shape in cases:
        cin = shape[1] if len(shape) == len(stride) + 2 else shape[0]
        conv = conv_type(cin, 5, 1, stride=stride, padding=padding)
        cfg = deepshift.QConfig(weight_bits=5, act_bits=act_bits)
        layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(conv), cfg))[0].eval()
        x = _random_float_input(rng, shape, act_bits, torch.float32)
        expected = _op_path_output(monkeypatch, layer, x)
        subsampled.clear()
        for isa, got in _on_every_isa(monkeypatch, layer, spy, layer, x).items():
            label = f"{layer.extra_repr()} {shape} ({isa})"
            assert got.shape == expected.shape and torch.equal(got, expected), label
        assert subsampled and all(s == ([] if padding else stride) for s in subsampled), subsampled


@pytest.mark.parametrize("act_bits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (4,), (5,), (2, 7), (47,), (2, 24)])
def test_fused_linear_forward_equals_the_op_path(native, act_bits, lead):
    # With AVX-512: the table lookup (8-bit activations: up to LUT_MAX_ROWS_INT16 = 47 rows, then the
    # fused 1x1 convolution); else up to 4 rows quantize + small-batch kernel + scale, more rows the
    # fused 1x1 convolution.
    rng = random.Random(len(lead) * 10 + sum(lead))
    lin = nn.Linear(37, 11)
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(lin), deepshift.PSConfig(
        weight_bits=6, act_bits=act_bits)))[0].eval()
    for dtype in (torch.float32, torch.float64):
        x = _random_float_input(rng, (*lead, 37), act_bits, dtype)
        with torch.no_grad():
            got = layer(x)
            assert _fused_used(layer, x)
            with _op_path():
                expected = layer(x)
        assert got.shape == (*lead, 11) and got.dtype == dtype
        assert torch.equal(got, expected)


@pytest.mark.parametrize("act_bits", [(4, 4), (8, 8)])
def test_frozen_linear_path_by_rows(native, monkeypatch, act_bits):
    # AVX-512: the table lookup up to LUT_MAX_ROWS_INT16 rows, then (int16 tables, 8-bit activations)
    # the fused 1x1 convolution; 16-bit activations keep the lookup at any batch.
    if build.current_isa() != "avx512":
        pytest.skip(f"the table-lookup kernel needs the avx512 path (this CPU: {build.current_isa()})")
    ext = build.load_extension()
    real, modes = ext.PreparedLinear, []
    monkeypatch.setattr(ext, "PreparedLinear", lambda *a: (modes.append(a[0]), real(*a))[1])
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(nn.Linear(64, 24)), deepshift.QConfig(
        weight_bits=5, act_bits=act_bits)))[0].eval()
    rng = random.Random(sum(act_bits))
    for rows in (linear.LUT_MAX_ROWS_INT16, linear.LUT_MAX_ROWS_INT16 + 1):
        x = _random_float_input(rng, (rows, 64), act_bits, torch.float32)
        with torch.no_grad():
            got = layer(x)
            with _op_path():
                assert torch.equal(got, layer(x))
    # (8, 8): the wide lookup (int64 accumulators) where the layer needs them, at both row counts.
    lookup = modes[0]
    assert lookup in (linear._LUT, linear._WIDE), modes
    assert modes == [lookup, linear._CONV if sum(act_bits) <= 8 else lookup], modes


def test_fused_forward_nan_error_and_weight_changes(native):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    deepshift.convert_(net, deepshift.QConfig(weight_bits=5, act_bits=(4, 4)))
    frozen = deepshift.freeze_(net.eval())
    x = torch.randn(2, 3, 6, 6)
    bad = x.clone()
    bad[1, 2, 3, 3] = float("nan")
    frozen(x), frozen[3](torch.zeros(1, 4 * 36))  # prepared: the NaNs below reach the op's C++ kernels
    with pytest.raises(ValueError, match="NaN"):
        frozen(bad)
    with pytest.raises(ValueError, match="NaN"):
        frozen[3](torch.full((1, 4 * 36), float("nan")))
    # New codes / bias through load_state_dict (in place): the cached fused forward follows them.
    before = frozen(x)
    other = deepshift.freeze_(deepshift.convert_(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)),
        deepshift.QConfig(weight_bits=5, act_bits=(4, 4))).eval())
    frozen.load_state_dict(other.state_dict())
    after = frozen(x)
    # (shift_lo is part of the layer's spec, not its state: the loaded codes mean other weights
    # here than in `other`; what matters is that both paths agree on them.)
    assert not torch.equal(before, after)
    with _op_path():
        assert torch.equal(after, frozen(x))
    # Pickled and copied modules compute the same.
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(frozen)), copy.deepcopy(frozen)):
        assert torch.equal(clone(x), after)


def test_frozen_op_kernels_run_remembered_forwards(native, monkeypatch):
    # The frozen ops' C++ kernels run the forward the Python kernel prepared for the same codes, bias,
    # spec, input shape and dtype, and hand every other call to the Python kernel.
    for op in register.NATIVE_KERNELS:
        cpu = [line for line in torch._C._dispatch_dump_table(f"deepshift::{op}").splitlines()
               if line.startswith("CPU:")]
        assert len(cpu) == 1 and "csrc/frozen.cpp" in cpu[0], (op, cpu)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    deepshift.convert_(net, deepshift.QConfig(weight_bits=5, act_bits=(4, 4)))
    frozen = deepshift.fuse_frozen(deepshift.freeze_(net.eval()))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = frozen(x)
        python_calls = []

        def spy(*args):
            if args[0].is_floating_point():  # the frozen layers' calls (not shift_linear's on int32)
                python_calls.append(args[0].shape)
            return None  # no fused forward: the Python kernel takes the reference

        monkeypatch.setattr(conv, "fused_forward", spy)
        monkeypatch.setattr(linear, "fused_forward", spy)
        assert torch.equal(frozen(x), expected) and python_calls == []  # both layers: C++ only
        assert torch.equal(frozen(x[:1]), expected[:1]) and len(python_calls) == 2  # a new shape
        python_calls.clear()
        # In place: the version counter moves, the C++ kernel misses.
        next(m for m in frozen.modules() if isinstance(m, deepshift.ShiftLinear)).bias_int.add_(1)
        changed = frozen(x)
        assert python_calls == [(2, 64)] and not torch.equal(changed, expected)
        monkeypatch.undo()
        assert torch.equal(frozen(x), changed)


def test_fused_forward_is_not_traced(native):
    # Tracing records the op (and the torch rounding / scaling), never the native helpers' results
    # as constants: the traced module computes the same on new inputs.
    net = deepshift.freeze_(deepshift.convert_(nn.Sequential(nn.Conv2d(2, 3, 3)),
                                               deepshift.QConfig(act_bits=(4, 4))).eval())
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        x = torch.randn(1, 2, 5, 5)
        assert "deepshift::frozen_conv" in str(traced.inlined_graph)  # the op, not opaque native calls
        assert torch.equal(traced(x), net(x))


def test_traced_fixed_point_is_not_a_constant(native):
    # Training-time rounding: tracing records the torch operations, not the native pass's result.
    def f(x):
        return deepshift.fixed_point(x, (4, 4))

    traced = torch.jit.trace(f, torch.randn(3, 8), check_trace=False)
    x = torch.randn(3, 8)
    assert torch.equal(traced(x), f(x))


def _random_frozen_bn(rng: random.Random, channels: int) -> deepshift.FrozenBatchNorm:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    bn = nn.BatchNorm2d(channels, eps=rng.choice([1e-5, 1e-3]), affine=rng.random() < 0.8).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 3, generator=g)
        bn.running_var.uniform_(0, 5, generator=g)  # includes variances near 0: large scales
        if bn.affine:
            bn.weight.normal_(0, 2, generator=g)  # negative scales too
            bn.bias.normal_(0, 2, generator=g)
    return deepshift.FrozenBatchNorm.from_batchnorm(bn)


@pytest.mark.parametrize("chunk", range(2))
def test_fused_conv_batchnorm_equals_the_two_modules(native, monkeypatch, chunk):
    # ShiftConvBatchNorm's one native call (BatchNorm, residual add and ReLU applied per output run
    # while in cache) against the op path and those operations in torch, for both table widths and
    # both ISAs.
    rng = random.Random(9100 + chunk)
    real = build.load_extension().PreparedConv
    runs = []

    def spy(*args):
        return _SpiedConv(real(*args), runs)

    done, kinds = 0, set()
    while done < 20:
        layer, x = _fused_conv_case(rng)
        wide_inputs = layer.accumulator != "int32" and sum(layer.act_bits) > 16
        if x.dim() != len(layer.kernel_size) + 2 or wide_inputs:
            continue  # unbatched input / int64 layers on wide inputs: no fused kernel (tested in test_fuse)
        bn = _random_frozen_bn(rng, layer.out_channels)
        y = _op_path_output(monkeypatch, layer, x)
        if y is None:
            continue
        expected = ops.channel_affine_reference(y, *bn.affine(y.dtype))
        residual = relu = None
        if rng.random() < 0.5:
            residual = _random_float_input(rng, y.shape, (4, 4), y.dtype).clamp(-1e3, 1e3)
            expected = expected + residual
        if rng.random() < 0.5:
            relu = True
            expected = torch.relu(expected)
        fused = deepshift.ShiftConvBatchNorm(layer, bn, relu=bool(relu))
        for isa, got in _on_every_isa(monkeypatch, layer, spy, fused, x, residual).items():
            label = (f"case {chunk}/{done} {layer.extra_repr()} {tuple(x.shape)} {x.dtype} ({isa}) "
                     f"residual {residual is not None} relu {relu}")
            # torch.equal: NaN (an infinite BatchNorm scale times 0) is unequal to itself.
            assert torch.equal(got.nan_to_num(), expected.nan_to_num()), \
                f"{label}: {(got != expected).sum()} elements differ"
            assert torch.equal(got.isnan(), expected.isnan()), label
        done += 1
        kinds.add((residual is not None, bool(relu)))
    # Every case went through the fused kernel, with the BatchNorm's affine.
    assert [args[1] is not None for args in runs] == [True] * (len(isa_paths()) * done)
    assert len(kinds) == 4, kinds  # with and without residual, with and without ReLU


def test_conv_fused_rejects_bad_affine(native):
    layer = deepshift.freeze_(deepshift.convert_(nn.Sequential(nn.Conv2d(3, 4, 3)), deepshift.QConfig()))[0]
    x = torch.randn(2, 3, 6, 6)
    conv_args = ShiftConvArgs(layer.codes, list(layer.weight_shape), layer.weight_bits, layer.has_zero,
                              layer.shift_lo, layer.bias_int, [1, 1], [0, 0], [1, 1], 1, False, [0, 0])
    prepared = conv._prepare_conv_fused(x, conv_args, list(layer.act_bits), layer.act_rounding,
                                        layer.accumulator)
    good = torch.ones(4)
    for scale in (torch.ones(5), torch.ones(4, dtype=torch.float64), torch.ones(8)[::2]):
        with pytest.raises(RuntimeError, match="affine scale / shift"):
            prepared.run(x, [scale, good], None, False)
    assert torch.equal(prepared.run(x, [good, torch.zeros(4)], None, False)[0], layer(x))
    # The op's CPU kernel never hands the native call such an affine: the reference computes it.
    strided = torch.arange(8.0)[::2]
    expected = torch.ops.deepshift.channel_affine(layer(x), strided.contiguous(), good)
    assert torch.equal(layer.forward_fused(x, strided, good), expected)


def test_l1_data_cache_size_from_sysfs(tmp_path):
    # The conv kernels' table blocks follow the L1 data cache the OS reports (Linux sysfs layout);
    # instruction caches and other levels are skipped, sizes in K / M or bytes, clamped to a sane
    # range, and anything unreadable gives the 32 KiB default.
    def cache_dir(name, entries):
        root = tmp_path / name
        for i, (level, kind, size) in enumerate(entries):
            d = root / f"index{i}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "type").write_text(f"{kind}\n")
            (d / "size").write_text(f"{size}\n")
        return root

    xeon = cache_dir("xeon", [(1, "Instruction", "32K"), (1, "Data", "48K"), (2, "Unified", "2048K")])
    assert machine.l1d_bytes(xeon) == 48 * 1024
    assert machine.l1d_bytes(cache_dir("unified", [(1, "Unified", "65536")])) == 64 * 1024
    assert machine.l1d_bytes(cache_dir("huge", [(1, "Data", "1M")])) == 256 * 1024
    assert machine.l1d_bytes(cache_dir("garbled", [(1, "Data", "lots")])) == machine.DEFAULT_L1D_BYTES
    assert machine.l1d_bytes(cache_dir("no_l1", [(2, "Unified", "1024K")])) == machine.DEFAULT_L1D_BYTES
    assert machine.l1d_bytes(tmp_path / "missing") == machine.DEFAULT_L1D_BYTES
    assert conv.POINTWISE_BLOCK_BYTES == machine.l1d_bytes() * 3 // 4


def test_conv_plan_channel_blocks(native):
    # The channel block keeps the table slice one work item reads near TABLE_BLOCK_BYTES: in flat
    # mode the item's consecutive outputs plus the kernel's reach (in each phase block it reads),
    # row by row whole padded rows; blocks are of equal size. plan[4] = [block, blocks, flat,
    # aligned rows]: int16 tables by rows store each row in a multiple of 16 elements.
    def blocks(cin, hw, stride, budget=16 * 1024, elem=2):  # TABLE_BLOCK_BYTES with a 32 KiB L1
        w5 = torch.zeros(8, cin, 1, 3, 3, dtype=torch.int8)
        plan = native.conv_plan(w5, [1, cin, 1, hw, hw], 1, [1, stride, stride], [0, 1, 1], [1, 1, 1], elem,
                                budget, conv.INT16_MAX_GROUP if elem == 2 else 0)
        block, nblocks, flat, aligned = plan[4].tolist()
        assert aligned == (elem == 2 and not flat)
        return [block, nblocks, flat]

    assert conv.TABLE_BLOCK_BYTES == machine.l1d_bytes() // 2
    assert blocks(64, 56, 1) == [32, 2, 1]  # flat: (2 * 58 + 2 + 80) * 2 bytes per channel, 41 fit
    # flat (14x14 outputs: 14 vectors either way): (2 * 16 + 2 + 80) * 2 bytes per channel, 71 fit
    assert blocks(256, 14, 1) == [64, 4, 1]
    # rows (32x32 outputs: 64 vectors row by row, 68 flat): 2 output rows need 4 padded rows of 34
    # elements, each stored in 48 (rows start on 16-element boundaries: 384 bytes), 42 fit: 7 blocks
    # of 37
    assert blocks(256, 32, 1) == [37, 7, 0]
    # flat with stride 2 (28x28 outputs, phase rows of 29: 51 vectors, not 56 row by row): 4 phase
    # blocks of (29 + 1 + 80) elements, 880 bytes: 18 fit, but a block keeps >= 288 terms
    assert blocks(64, 56, 2) == [32, 2, 1]
    assert blocks(64, 56, 2, 24 * 1024) == [32, 2, 1]  # 27 fit: 32 + 32, not 27 + 27 + 10
    assert blocks(32, 112, 1) == [32, 1, 0]  # 21 fit (3 rows of 128: 768 bytes), but not 2 blocks of 16
    # int32 tables keep rows packed: 3 output rows of 4 vectors need 5 rows of 34 (680 bytes), 24 fit,
    # but a block keeps >= 288 terms: 8 blocks
    assert blocks(256, 32, 1, elem=4) == [32, 8, 0]
    assert blocks(16, 32, 1) == [16, 1, 0]
    # flat with stride 2 (14x14 outputs: 14 vectors either way): 4 phase blocks of (15 + 1 + 80)
    # elements (768 bytes), 21 fit; a block keeps >= 288 terms: 8 blocks
    assert blocks(256, 28, 2) == [32, 8, 1]
    assert blocks(512, 14, 2)[2] == 1  # 7x7 outputs: 4 vectors flat, 7 row by row
    # 1x1 convolutions take the larger pointwise budget (1024 channels of 14x14: 160 bytes each).
    codes = pack_codes(torch.zeros(8 * 1024, dtype=torch.uint8), 5)
    for k, budget in ((1, conv.POINTWISE_BLOCK_BYTES), (3, conv.TABLE_BLOCK_BYTES)):
        a = ShiftConvArgs(codes.repeat(k * k) if k > 1 else codes, [8, 1024, k, k], 5, False, 0, None, [1, 1],
                          [k // 2] * 2, [1, 1], 1, False, [0, 0])
        plan = conv._ConvCall(native, a).prepared(native, a.codes, 16, [1, 1024, 1, 14, 14])[1]
        per_channel = 80 * 2 if k == 1 else (2 * 16 + 2 + 80) * 2  # flat: 5 vectors (and the 3x3's reach)
        assert plan[4].tolist()[1] == -(-1024 // min(1024, budget // per_channel)), (k, plan[4])


def _segment_weights(cout, cin, k, plain_min, seed):
    """Signed shift codes (v = +-(amount + 1)) for the plan's segment cases, one output each: one
    amount's 300 positive terms (plain segments, split where int16 sums would overflow); amounts
    one apart below plain_min per bucket, both signs (one shift segment each); drops of 9 and 20
    (past TERM_MAX_SHIFT: new segments); amounts >= 32 (0 mod 2**32 in int32 lanes); random."""
    g = torch.Generator().manual_seed(seed)
    n = cin * k * k
    w = torch.zeros(cout, n, dtype=torch.int64)
    w[0, :min(n, 300)] = 4  # amount 3
    for i in range(n):
        w[1, i] = (1 if i % 2 else -1) * (1 + (i // 2) % 12) if i < 12 * (plain_min - 1) else 0
    w[2, :20] = torch.tensor([41, 40, 31, 22, 2, -41, -40, -31, -22, -2] * 2)  # segments at 40, 31, 22, 2
    w[3] = torch.randint(-41, 42, (n,), generator=g)
    w[4] = torch.randint(-6, 7, (n,), generator=g)
    perm = torch.randperm(n, generator=g)  # terms spread over the channels and kernel positions
    return w[:, perm].reshape(cout, cin, 1, k, k).to(torch.int8)


def _check_pair_segments(plan, pairs: bool) -> None:
    """Two terms per shift (conv.cpp's pad_pairs): in 1x1 kernels' int16 / int32 plans every Horner
    segment is flagged SEG_PAIRS, has an even count and a shift (d > 0) only on terms at even positions;
    other plans have no such segment."""
    terms, segs = plan[0].tolist(), plan[3]
    flagged = (segs[:, 2] & 4) != 0
    horner = (segs[:, 2] & 2) == 0
    if not pairs:
        assert not flagged.any()
        return
    assert flagged.any() and torch.equal(flagged, horner)
    starts = torch.cumsum(segs[:, 0], 0) - segs[:, 0]
    for (count, _, flags), at in zip(segs.tolist(), starts.tolist(), strict=True):
        if flags & 4:
            assert count % 2 == 0
            assert all(terms[i] & 7 == 0 for i in range(at + 1, at + count, 2))


@pytest.mark.parametrize("k", [1, 3])
def test_conv_plan_segments_bit_exact(native, k):
    """The term lists' segments (plain runs of one amount, Horner runs with a shift per term or, 1x1
    kernels on int16 / int32 tables, per two terms, breaks at sign changes, at drops past
    TERM_MAX_SHIFT and at the int16 / int32 sums' bounds, amounts past the lanes' width) on every lane
    configuration and ISA path, against int64 arithmetic."""
    plain_min = 32 if k == 1 else 8
    cin = 80 if k == 1 else 40
    w5 = _segment_weights(5, cin, k, plain_min, seed=k)
    n, hw = 2, 9
    amount = w5.abs().long() - 1
    weff = torch.where(w5 == 0, 0, w5.sign().long() << amount.clamp(min=0)).reshape(5, -1)
    rng = random.Random(k)
    lanes = ((torch.int16, 2, 255, False, 128), (torch.int32, 4, 0, False, 128),
             (torch.int64, 8, 0, False, 2**14),
             (torch.int16, 2, 255, True, 128), (torch.int32, 4, 2**16 - 1, True, 2**15))
    for dtype, elem, max_group, wide, mag in lanes:
        x = _rand_int(rng, (n, cin, 1, hw, hw), mag, dtype)
        x[0] = mag  # the sums' worst case: where the plan's bounds are tight
        plan = native.conv_plan(w5, list(x.shape), 1, [1, 1, 1], [0, k // 2, k // 2], [1, 1, 1], elem,
                                conv.TABLE_BLOCK_BYTES, max_group)
        segs = plan[3]
        assert ((segs[:, 2] & 2) != 0).any() and ((segs[:, 2] & 2) == 0).any()  # plain and Horner runs
        assert ((segs[:, 2] & 1) != 0).any() and (segs[:, 1] >= 32).any()  # negative; past 32 bits
        _check_pair_segments(plan, pairs=k == 1 and elem <= 4)
        cols = torch.nn.functional.unfold(x.reshape(n, cin, hw, hw).double(), k, padding=k // 2).long()
        exact = (weff @ cols).reshape(n, 5, 1, hw, hw)
        bits = 64 if wide or dtype == torch.int64 else 32
        expected = exact if bits == 64 else ((exact + 2**31) % 2**32 - 2**31).to(torch.int32)
        for isa in isa_paths():
            assert build.set_isa(isa) == isa
            try:
                run = native.conv_wide if wide else native.conv
                got = run(x, list(w5.shape), plan, None, 1, [1, 1, 1], [0, k // 2, k // 2], [1, 1, 1])
            finally:
                build.set_isa("auto")
            assert torch.equal(got, expected), (dtype, wide, isa)


def test_a_build_lock_left_by_a_killed_builder_does_not_hang(tmp_path):
    # A process killed while building (kill -9, OOM, a timeout) leaves torch's "lock" file behind;
    # every later process used to wait for it forever without a word.
    if not build.native_available():
        pytest.skip("native kernels do not build on this machine")
    name = f"deepshift_cpu_{build._source_digest()}"
    shutil.copytree(build.build_dir() / name, tmp_path / name,
                    ignore=shutil.ignore_patterns("lock", "deepshift.lock"))
    (tmp_path / name / "lock").touch()
    code = "from deepshift.backends.cpu import build\nassert build.native_available()\nprint('ok')\n"
    env = dict(os.environ, DEEPSHIFT_BUILD_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert not (tmp_path / name / "lock").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("chunk", range(3))
def test_int_epilogue_bit_exact_random(native, chunk, dtype):
    """deepshift::int_epilogue (integer-only BatchNorm as shifts, residual, clamp) against its
    reference, on int64 and int32 tensors (int32: computed in int64, the result's low 32 bits): per
    channel and per tensor, 1-4 terms with zero signs, every rounding direction, ties, residuals and
    clamps, wrapping values near int64's ends, runs of every length modulo the vector width."""
    rng = random.Random(7000 + chunk)
    for case in range(40):
        per_channel = rng.random() < 0.75
        shape = [rng.randint(1, 3), rng.randint(2, 9), rng.randint(1, 7), rng.randint(1, 9)]
        c = shape[1] if per_channel else 1
        k = rng.randint(1, 4)
        big = case % 10 == 0  # values whose shifts wrap: the native pass must wrap as torch does
        mag = min(2**62 if big else 2 ** rng.randint(1, 40), torch.iinfo(dtype).max)
        x = torch.randint(-mag, mag, shape, generator=torch.Generator().manual_seed(case), dtype=dtype)
        signs = torch.tensor([[rng.choice((-1, 0, 1)) for _ in range(c)] for _ in range(k)])
        lefts = torch.tensor([[rng.randint(0, 12) for _ in range(c)] for _ in range(k)], dtype=torch.int64)
        bias = torch.tensor([rng.randint(-(2**30), 2**30) for _ in range(c)]) if rng.random() < 0.7 else None
        rights = torch.tensor([rng.randint(-3, 20) for _ in range(c)], dtype=torch.int64)
        pre = rng.choice((0, 0, 1, 5))
        residual = (torch.randint(-(2**20), 2**20, shape, dtype=dtype) if rng.random() < 0.5 else None)
        rshift = rng.randint(0, 6)
        lo = rng.choice((None, 0, -(2**15), -(2**31 - 1)))
        hi = rng.choice((None, 2**15 - 1, 6 << 8, 2**31 - 1))
        args = (x, signs, lefts, bias, rights, pre, residual, rshift, lo, hi)
        _check(torch.ops.deepshift.int_epilogue, ops.int_epilogue_reference, args, f"case {case}")
    ties = torch.tensor([[[[3, 5, -3, -5, -1, 1, 7, -7]]]], dtype=dtype)
    args = (ties, torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), None,
            torch.ones(1, dtype=torch.int64), 0, None, 0, None, None)
    _check(torch.ops.deepshift.int_epilogue, ops.int_epilogue_reference, args, "ties")
    assert torch.ops.deepshift.int_epilogue(*args).flatten().tolist() == [2, 2, -2, -2, 0, 0, 4, -4]
    # the calls above reached the extension, not the reference fallback
    direct = native.int_epilogue(ties, *args[1:3], None, args[4], 0, None, 0, -(2**63), 2**63 - 1)
    assert direct.flatten().tolist() == [2, 2, -2, -2, 0, 0, 4, -4]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("chunk", range(2))
def test_int_conv_bit_exact_random(native, monkeypatch, chunk, dtype):
    """deepshift::int_conv (an integer-only conv layer: requantisation in the table build, the conv,
    the integer epilogue per output run, or per channel's rows in the flat mode) against its
    reference composition, on every ISA path, for int64 and int32 inputs (and residuals, and
    results): int32 and int64 accumulators (the latter native only where the input proves int32
    lanes exact), int16 and int32 tables, strides, groups, padding, bias, residual, clamps (int32's
    saturation among them), left and right requantising shifts."""
    ext = build.load_extension()
    real, native_calls = ext.PreparedIntConv, []  # each ISA prepares its native call anew
    monkeypatch.setattr(ext, "PreparedIntConv", lambda *a: native_calls.append(1) or real(*a))
    rng = random.Random(8100 + chunk)
    for case in range(30):
        cin, cout = rng.choice([1, 3, 4, 8]), rng.choice([2, 5, 8])
        groups = rng.choice([1, 2]) if cin % 2 == 0 and cout % 2 == 0 else 1
        layer = nn.Conv2d(cin, cout, rng.choice([1, 3]), stride=rng.choice([1, 2]),
                          padding=rng.choice([0, 1]), groups=groups, bias=rng.random() < 0.5)
        act = rng.choice([(4, 4), (8, 8), (3, 5)])
        cfg = deepshift.QConfig(weight_bits=rng.choice([3, 4, 5]), act_bits=act)
        frozen = deepshift.freeze_(deepshift.convert_(nn.Sequential(layer), cfg))[0]
        small = frozen.accumulator == "int64" and rng.random() < 0.5
        hw = rng.choice([5, 8, 11, 13, 28])
        mag = 2 ** (14 if small else 20)
        x = torch.randint(-mag, mag, (rng.choice([1, 2, 3]), cin, hw, hw),
                          generator=torch.Generator().manual_seed(case)).to(dtype)
        total = sum(act)
        head = (x, frozen.codes, frozen.bias_int, frozen._spec_json, rng.choice([0, 3, 9, -2, 12]),
                -(2 ** (total - 1)), 2 ** (total - 1) - 1)
        k = rng.choice([1, 2, 3])
        signs = torch.tensor([[rng.choice((-1, 0, 1)) for _ in range(cout)] for _ in range(k)])
        lefts = torch.tensor([[rng.randint(0, 8) for _ in range(cout)] for _ in range(k)])
        ebias = torch.randint(-1000, 1000, (cout,)) if rng.random() < 0.5 else None
        rights = torch.tensor([rng.randint(-2, 12) for _ in range(cout)])
        out_shape = ops.frozen_conv_output_shape(frozen.spec(), x.shape)
        residual = torch.randint(-1000, 1000, out_shape, dtype=dtype) if rng.random() < 0.5 else None
        lo, hi = rng.choice([(None, None), (0, None), (0, 2**15 - 1), (-(2**31 - 1), 2**31 - 1)])
        tail = ((signs, lefts, ebias, rights, rng.choice([0, 2]), residual, rng.randint(0, 3), lo, hi)
                if rng.random() < 0.8 else (None, None, None, None, 0, None, 0, None, None))
        _check(torch.ops.deepshift.int_conv, ops.int_conv_reference, head + tail, f"int_conv case {case}")
        # Again: now from the C++ kernel's table (int32 layers); then another requantisation of the
        # same layer, which that entry must not serve.
        assert torch.equal(torch.ops.deepshift.int_conv(*head, *tail), ops.int_conv_reference(*head, *tail))
        other = (*head[:4], head[4] + 1, *head[5:])
        assert torch.equal(torch.ops.deepshift.int_conv(*other, *tail), ops.int_conv_reference(*other, *tail))
    assert len(native_calls) >= 20 * len(isa_paths()), len(native_calls)  # most ran natively
