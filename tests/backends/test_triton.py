"""Triton shift kernels against the pure-torch reference ops, bit for bit.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1`` must
be set before the kernels are imported, so this module sets it (only when CUDA is unavailable) and
leaves it set for the session (triton reads it again at launch). Other test modules do not import
triton, so this changes nothing for them. With CUDA the compiled kernels run on the GPU instead.

The interpreter's cost is per operation, not per element: shapes are small and the launch
wrappers' interpreter tiles are large; a few tests force small tiles to cover tile edges.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from deepshift import pack_codes
from deepshift.ops.codes import decode_codes
from deepshift.ops.reference import accumulator_bound, shift_conv_reference, shift_linear_reference

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not installed: pip install -r requirements-triton.txt")

from deepshift.backends.triton import register as triton_ops  # noqa: E402

if not triton_ops.triton_available():
    pytest.skip(f"the Triton kernels do not load: {triton_ops._import_error}", allow_module_level=True)
if not CUDA and not triton_ops.interpreted():
    pytest.skip(
        "no CUDA, and the Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True
    )

DEVICE = torch.device("cuda" if CUDA else "cpu")
INT_LIMIT = {torch.int32: 2**31, torch.int64: 2**63}


def random_codes(numel: int, bits: int, max_field: int, gen: torch.Generator) -> torch.Tensor:
    """Packed codes: random sign bits, shift fields uniform in [0, max_field]."""
    field = torch.randint(0, max_field + 1, (numel,), generator=gen)
    sign = torch.randint(0, 2, (numel,), generator=gen)
    return pack_codes(field | (sign << (bits - 1)), bits)


def safe_max_field(
    bits: int, dtype: torch.dtype, fan_in: int, max_x: int, shift_lo: int, has_bias: bool
) -> int:
    """The largest shift field for which nothing can overflow ``dtype`` (the ops' contract)."""
    u = min(shift_lo, 0)
    for field in range(2 ** (bits - 1) - 1, -1, -1):
        amount = field + shift_lo - u
        if accumulator_bound(fan_in, max_x, amount, max_x if has_bias else 0, u) < INT_LIMIT[dtype]:
            return field
    raise AssertionError("no safe field")


def make_case(
    weight_numel: int,
    fan_in: int,
    x_shape,
    bias_len: int | None,
    bits: int,
    has_zero: bool,
    dtype: torch.dtype,
    shift_lo: int,
    seed: int,
    max_x: int = 120,
):
    gen = torch.Generator().manual_seed(seed)
    max_field = safe_max_field(bits, dtype, fan_in, max_x, shift_lo, bias_len is not None)
    codes = random_codes(weight_numel, bits, max_field, gen)
    x = torch.randint(-max_x, max_x + 1, tuple(x_shape), generator=gen).to(dtype)
    bias = None
    if bias_len is not None:
        bias = torch.randint(-max_x, max_x + 1, (bias_len,), generator=gen).to(dtype)
    return x, codes, bias


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def check_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got.cpu(), want), f"max |diff| {(got.cpu() - want).abs().max()}"


@pytest.mark.parametrize("has_zero", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_decode_every_code(bits, has_zero):
    # Every code value, at every in-byte offset (odd count: the last byte is partial).
    values = torch.arange(2**bits).repeat(9)[: 9 * 2**bits - 3]
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(bits))]
    codes = pack_codes(values, bits)
    rel, sign = triton_ops.decode_codes_triton(codes.to(DEVICE), values.numel(), bits, has_zero)
    want_rel, want_sign = decode_codes(codes, [values.numel()], bits, has_zero)
    check_equal(sign, want_sign)
    check_equal(rel, want_rel)


LINEAR_SHAPES = [((1, 1), 1, 1), ((3,), 5, 11), ((2, 3), 7, 9), ((5,), 33, 17), ((1,), 64, 40)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("has_zero", [False, True], ids=["q", "ps"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_matches_reference(bits, has_zero, dtype):
    seed = bits * 4 + 2 * has_zero + (dtype == torch.int64)
    lead, out_f, in_f = LINEAR_SHAPES[seed % len(LINEAR_SHAPES)]
    shift_lo = (-6, -1, 0, 2, 5)[seed % 5]
    with_bias = seed % 3 != 0
    x, codes, bias = make_case(
        out_f * in_f, in_f, (*lead, in_f), out_f if with_bias else None, bits, has_zero, dtype, shift_lo, seed
    )
    args = (codes, [out_f, in_f], bits, has_zero, shift_lo)
    want = shift_linear_reference(x, *args, bias)
    xd, cd, bd = on_device(x, codes, bias)
    check_equal(triton_ops.shift_linear_triton(xd, cd, *args[1:], bd), want)


@pytest.mark.parametrize(
    ("config", "multiply"),
    [((1, 2, 4, 1), False), ((2, 4, 8, 1), True), ((4, 8, 16, 1), False), ((8, 1, 32, 1), True)],
    ids=["1x2x4", "2x4x8-multiply", "4x8x16", "8x1x32-multiply"],
)
def test_linear_small_tiles(config, multiply):
    # Tiles smaller than the problem in every dimension (partial tiles, several K steps).
    out_f, in_f = 5, 11
    for bits, has_zero, dtype, shift_lo in ((5, True, torch.int32, -3), (3, False, torch.int64, 1)):
        x, codes, bias = make_case(out_f * in_f, in_f, (3, in_f), out_f, bits, has_zero, dtype, shift_lo, 7)
        want = shift_linear_reference(x, codes, [out_f, in_f], bits, has_zero, shift_lo, bias)
        xd, cd, bd = on_device(x, codes, bias)
        got = triton_ops.shift_linear_triton(
            xd, cd, [out_f, in_f], bits, has_zero, shift_lo, bd, multiply=multiply, config=config
        )
        check_equal(got, want)


def test_linear_one_dimensional_input_and_errors():
    x, codes, bias = make_case(15, 5, (5,), 3, 4, True, torch.int32, 0, 1)
    want = shift_linear_reference(x, codes, [3, 5], 4, True, 0, bias)
    xd, cd, bd = on_device(x, codes, bias)
    check_equal(triton_ops.shift_linear_triton(xd, cd, [3, 5], 4, True, 0, bd), want)
    with pytest.raises(ValueError, match="int32 or int64"):
        triton_ops.shift_linear_triton(xd.float(), cd, [3, 5], 4, True, 0, None)
    with pytest.raises(ValueError, match="bias"):
        triton_ops.shift_linear_triton(xd, cd, [3, 5], 4, True, 0, bd.long())
    with pytest.raises(ValueError, match="bytes"):
        triton_ops.shift_linear_triton(xd, cd[:-1], [3, 5], 4, True, 0, None)
    with pytest.raises(ValueError, match="does not fit"):
        triton_ops.shift_linear_triton(xd, cd, [5, 3], 4, True, 0, None)


# (name, x shape, weight shape, stride, padding, dilation, groups, transposed, output_padding)
CONV_CASES = [
    ("conv1d_stride_pad", (2, 3, 11), (5, 3, 3), [2], [1], [1], 1, False, [0]),
    ("conv1d_dilated_groups", (1, 4, 9), (6, 2, 2), [1], [2], [3], 2, False, [0]),
    ("conv2d_grouped_dilated", (2, 4, 7, 6), (6, 2, 3, 3), [1, 1], [2, 2], [2, 2], 2, False, [0, 0]),
    ("conv2d_depthwise", (1, 6, 5, 5), (6, 1, 3, 3), [1, 1], [1, 1], [1, 1], 6, False, [0, 0]),
    ("conv2d_depthwise_multiplier", (1, 3, 6, 5), (6, 1, 3, 2), [2, 1], [1, 0], [1, 1], 3, False, [0, 0]),
    ("conv2d_asym_stride", (2, 3, 7, 6), (4, 3, 3, 2), [2, 1], [1, 2], [1, 1], 1, False, [0, 0]),
    ("conv2d_stem_7x7_s2", (1, 3, 9, 9), (8, 3, 7, 7), [2, 2], [3, 3], [1, 1], 1, False, [0, 0]),
    ("conv2d_1x1_s2", (2, 5, 5, 4), (7, 5, 1, 1), [2, 2], [0, 0], [1, 1], 1, False, [0, 0]),
    ("conv3d", (1, 2, 5, 6, 4), (4, 2, 3, 1, 2), [1, 2, 1], [1, 0, 1], [1, 1, 1], 1, False, [0, 0, 0]),
    (
        "conv3d_grouped_dilated",
        (1, 4, 4, 5, 3),
        (2, 2, 2, 2, 2),
        [2, 1, 1],
        [0, 1, 1],
        [1, 2, 1],
        2,
        False,
        [0, 0, 0],
    ),
    ("convT1d_groups_outpad", (2, 4, 5), (4, 3, 3), [2], [0], [1], 2, True, [1]),
    ("convT1d_crop", (1, 3, 6), (3, 2, 2), [3], [2], [1], 1, True, [2]),
    ("convT2d_dilated", (1, 3, 4, 5), (3, 2, 3, 3), [2, 2], [1, 1], [2, 2], 1, True, [0, 0]),
    ("convT2d_depthwise", (1, 4, 3, 4), (4, 1, 2, 3), [2, 3], [0, 1], [1, 1], 4, True, [1, 2]),
    ("convT3d", (1, 2, 3, 3, 2), (2, 3, 2, 2, 2), [2, 1, 1], [0, 0, 0], [1, 1, 1], 1, True, [0, 0, 0]),
]


def conv_case(index: int, case, bits: int, has_zero: bool, dtype: torch.dtype, with_bias: bool):
    _, x_shape, w_shape, stride, padding, dilation, groups, transposed, output_padding = case
    c_out = w_shape[1] * groups if transposed else w_shape[0]
    fan_in = (w_shape[0] // groups if transposed else w_shape[1]) * math.prod(w_shape[2:])
    shift_lo = (-4, 0, 3, -1)[index % 4]
    x, codes, bias = make_case(
        math.prod(w_shape),
        fan_in,
        x_shape,
        c_out if with_bias else None,
        bits,
        has_zero,
        dtype,
        shift_lo,
        100 + index,
    )
    rest = (list(w_shape), bits, has_zero, shift_lo)
    conv = (stride, padding, dilation, groups, transposed, output_padding)
    return x, codes, bias, rest, conv


@pytest.mark.parametrize("index", range(len(CONV_CASES)), ids=[c[0] for c in CONV_CASES])
def test_conv_matches_reference(index):
    # Bit widths, methods, dtypes and bias rotate over the cases so that each appears several times.
    bits = 2 + index % 7
    has_zero = index % 2 == 0
    dtype = torch.int64 if index % 3 == 1 else torch.int32
    x, codes, bias, rest, conv = conv_case(index, CONV_CASES[index], bits, has_zero, dtype, index % 4 != 3)
    want = shift_conv_reference(x, codes, *rest, bias, *conv)
    xd, cd, bd = on_device(x, codes, bias)
    check_equal(triton_ops.shift_conv_triton(xd, cd, *rest, bd, *conv), want)


@pytest.mark.parametrize(
    ("index", "multiply"),
    [(2, True), (9, False), (13, False), (13, True)],
    ids=[
        "conv2d_grouped_dilated-multiply",
        "conv3d_grouped_dilated",
        "convT2d_depthwise",
        "convT2d_depthwise-multiply",
    ],
)
def test_conv_small_tiles(index, multiply):
    x, codes, bias, rest, conv = conv_case(index, CONV_CASES[index], 5, index != 9, torch.int32, True)
    want = shift_conv_reference(x, codes, *rest, bias, *conv)
    xd, cd, bd = on_device(x, codes, bias)
    got = triton_ops.shift_conv_triton(xd, cd, *rest, bd, *conv, multiply=multiply, config=(64, 2, 8, 1))
    check_equal(got, want)


def test_conv_errors_match_reference():
    x, codes, bias, rest, conv = conv_case(0, CONV_CASES[0], 4, True, torch.int32, True)
    xd, cd, bd = on_device(x, codes, bias)
    with pytest.raises(ValueError):
        triton_ops.shift_conv_triton(xd[:, :2], cd, *rest, bd, *conv)
    with pytest.raises(ValueError, match="int32 or int64"):
        triton_ops.shift_conv_triton(xd.double(), cd, *rest, None, *conv)


def test_kernels_compile_for_a_cuda_gpu():
    # The interpreter does not type-check like the compiler: compile for sm_90 (no GPU needed)
    # in a fresh process where the kernels are imported without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from deepshift.backends.triton import register as t; print(*t.compile_for_cuda(90), sep=chr(10))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("cubin") == 4, out.stdout


def test_register_cuda_kernels():
    registered = triton_ops.register_cuda_kernels()
    assert registered == (CUDA and os.environ.get("DEEPSHIFT_NO_NATIVE", "0") in ("", "0"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: frozen layers dispatch to the kernels on CUDA")
def test_frozen_layers_on_cuda_use_the_kernels():
    import deepshift

    if not triton_ops.register_cuda_kernels():
        pytest.skip("kernels disabled by DEEPSHIFT_NO_NATIVE")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
    )
    deepshift.convert_(model, deepshift.PSConfig(weight_bits=5))
    model = deepshift.freeze_(model.eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        got = model.to("cuda")(x.to("cuda"))
    assert torch.equal(got.cpu(), want)
    assert triton_ops._kernels is not None  # the CUDA calls went through the Triton kernels
