"""The integer reference ops: exact against float64 torch, multiplication-free, opcheck-clean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import deepshift
from deepshift.ops.codes import decode_codes
from deepshift.ops.reference import shift_conv_reference, shift_linear_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _codes(shape, bits, max_field=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64)
    if max_field is not None:  # keep 8-bit shift spans inside exact float64 for the comparison
        sign_bit = 1 << (bits - 1)
        c = (c & sign_bit) | ((c & (sign_bit - 1)) % (max_field + 1))
    return c.to(torch.uint8)


def _weight(codes, bits, has_zero, shift_lo):
    rel, sign = decode_codes(deepshift.pack_codes(codes, bits), list(codes.shape), bits, has_zero)
    return sign.double() * torch.exp2((rel + shift_lo).double())


def test_decode_matches_documented_code_meaning():
    # 4 bits: sign bit 3, field bits 0-2. Q: p = lo + f; PS: f = 0 is zero, p = lo + f - 1.
    codes = torch.tensor([0b0000, 0b0011, 0b1000, 0b1111], dtype=torch.uint8)
    packed = deepshift.pack_codes(codes, 4)
    rel, sign = decode_codes(packed, [4], 4, has_zero=False)
    assert rel.tolist() == [0, 3, 0, 7] and sign.tolist() == [1, 1, -1, -1]
    rel, sign = decode_codes(packed, [4], 4, has_zero=True)
    assert sign.tolist() == [0, 1, 0, -1] and rel[1].item() == 2 and rel[3].item() == 6


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bits,has_zero,shift_lo", [(2, True, 0), (3, False, -2), (5, True, -9),
                                                    (8, False, -20), (4, False, 3)])
def test_linear_exact(bits, has_zero, shift_lo, dtype):
    codes = _codes((6, 9), bits, max_field=12)
    x = torch.randint(-300, 300, (2, 3, 9), dtype=dtype)
    bias = torch.randint(-1000, 1000, (6,), dtype=dtype)
    for b in (bias, None):
        y = torch.ops.deepshift.shift_linear(x, deepshift.pack_codes(codes, bits), [6, 9], bits, has_zero,
                                             shift_lo, b)
        assert y.dtype == dtype and y.shape == (2, 3, 6)
        u = min(shift_lo, 0)
        w = _weight(codes, bits, has_zero, shift_lo)
        expected = F.linear(x.double(), w, None if b is None else b.double()) * 2.0**-u
        assert torch.equal(y.double(), expected)


CONV_CASES = [
    # (weight shape, input shape, stride, padding, dilation, groups, transposed, output_padding)
    ([5, 3, 3], (2, 3, 11), [2], [1], [1], 1, False, [0]),
    ([6, 2, 3, 3], (2, 4, 9, 7), [1, 1], [2, 2], [2, 2], 2, False, [0, 0]),
    ([6, 1, 3, 3], (1, 6, 5, 5), [2, 1], [1, 1], [1, 1], 6, False, [0, 0]),  # depthwise
    ([4, 2, 3, 1, 2], (1, 2, 5, 6, 4), [1, 2, 1], [1, 0, 1], [1, 1, 1], 1, False, [0, 0, 0]),
    ([4, 3, 3], (2, 4, 5), [2], [0], [1], 2, True, [1]),
    ([3, 2, 3, 3], (1, 3, 4, 5), [2, 2], [1, 1], [2, 2], 1, True, [0, 1]),
    ([2, 3, 2, 2, 2], (1, 2, 3, 3, 2), [2, 1, 1], [0, 0, 0], [1, 1, 1], 1, True, [0, 0, 0]),
    ([4, 2, 5], (1, 4, 6), [3], [4], [1], 2, True, [2]),  # padding beyond the kernel reach: crop
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("bits,has_zero,shift_lo", [(5, True, -3), (3, False, 1), (8, False, -12)])
def test_conv_exact(case, bits, has_zero, shift_lo):
    ws, xs, stride, padding, dilation, groups, transposed, output_padding = CONV_CASES[case]
    codes = _codes(tuple(ws), bits, max_field=10, seed=case)
    x = torch.randint(-200, 200, xs, dtype=torch.int64)
    c_out = ws[1] * groups if transposed else ws[0]
    bias = torch.randint(-500, 500, (c_out,), dtype=torch.int64)
    y = torch.ops.deepshift.shift_conv(x, deepshift.pack_codes(codes, bits), ws, bits, has_zero, shift_lo,
                                       bias, stride, padding, dilation, groups, transposed, output_padding)
    w = _weight(codes, bits, has_zero, shift_lo)
    dims = len(ws) - 2
    if transposed:
        fn = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][dims - 1]
        expected = fn(x.double(), w, bias.double(), stride, padding, output_padding, groups, dilation)
    else:
        fn = [F.conv1d, F.conv2d, F.conv3d][dims - 1]
        expected = fn(x.double(), w, bias.double(), stride, padding, dilation, groups)
    assert y.shape == expected.shape
    assert torch.equal(y.double(), expected * 2.0 ** -min(shift_lo, 0))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


FORBIDDEN = ("mul", "mm", "matmul", "conv", "dot", "mv", "linear", "einsum", "pow", "prod", "div",
             "addcmul", "lerp", "exp", "ldexp")


def test_reference_has_no_multiplication():
    x = torch.randint(-50, 50, (2, 4, 6, 6), dtype=torch.int32)
    codes = deepshift.pack_codes(_codes((4, 2, 3, 3), 5), 5)
    bias = torch.randint(-9, 9, (4,), dtype=torch.int32)
    with _RecordOps() as rec:
        shift_conv_reference(x, codes, [4, 2, 3, 3], 5, True, -3, bias, [2, 1], [1, 1], [1, 2], 2,
                             False, [0, 0])
        shift_conv_reference(x, codes, [4, 2, 3, 3], 5, True, -3, None, [2, 2], [1, 0], [1, 1], 2,
                             True, [1, 0])
        shift_linear_reference(x[:, :, 0], codes[:12], [4, 6], 4, False, 2, bias)
    # The recording works (it sees the shifts and sums), and no multiplying op is among them.
    assert {"bitwise_left_shift", "sum", "neg"} <= rec.names, rec.names
    bad = sorted(n for n in rec.names if any(f in n for f in FORBIDDEN))
    assert not bad, bad


def test_opcheck():
    x = torch.randint(-50, 50, (2, 4, 6, 6), dtype=torch.int32)
    packed = deepshift.pack_codes(_codes((4, 2, 3, 3), 5), 5)
    bias = torch.randint(-9, 9, (4,), dtype=torch.int32)
    samples = [
        (torch.ops.deepshift.shift_conv.default,
         (x, packed, [4, 2, 3, 3], 5, True, -3, bias, [2, 1], [1, 1], [1, 2], 2, False, [0, 0])),
        (torch.ops.deepshift.shift_conv.default,
         (x, packed, [4, 2, 3, 3], 5, False, 1, None, [2, 2], [1, 0], [1, 1], 2, True, [1, 0])),
        (torch.ops.deepshift.shift_conv.default,
         (x[:, :, 0].to(torch.int64), deepshift.pack_codes(_codes((4, 2, 3), 3), 3), [4, 2, 3], 3, False,
          0, None, [1], [0], [1], 2, False, [0])),
        (torch.ops.deepshift.shift_linear.default,
         (x[:, :, 0], packed[:23], [6, 6], 5, True, -2, bias[:1].expand(6).contiguous())),
        (torch.ops.deepshift.shift_linear.default, (x[0, 0, 0], packed[:23], [6, 6], 5, False, 0, None)),
    ]
    for op, args in samples:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_fake_shapes_match_reference():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = ([3, 2, 3, 3], 4, False, -1, None, [2, 2], [1, 1], [2, 1], 1, True, [1, 0])
    x = torch.randint(-5, 5, (1, 3, 5, 4), dtype=torch.int32)
    packed = deepshift.pack_codes(_codes((3, 2, 3, 3), 4), 4)
    real = torch.ops.deepshift.shift_conv(x, packed, *args)
    with FakeTensorMode() as mode:
        fake = torch.ops.deepshift.shift_conv(mode.from_tensor(x), mode.from_tensor(packed), *args)
    assert fake.shape == real.shape and fake.dtype == real.dtype == torch.int32


def test_input_validation():
    packed = deepshift.pack_codes(_codes((2, 3), 5), 5)
    with pytest.raises(ValueError, match="int32 or int64"):
        shift_linear_reference(torch.zeros(1, 3), packed, [2, 3], 5, True, 0, None)
    with pytest.raises(ValueError, match="does not fit"):
        shift_linear_reference(torch.zeros(1, 4, dtype=torch.int32), packed, [2, 3], 5, True, 0, None)
    with pytest.raises(ValueError, match="bias"):
        shift_linear_reference(torch.zeros(1, 3, dtype=torch.int32), packed, [2, 3], 5, True, 0,
                               torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="need"):  # codes of another size
        shift_linear_reference(torch.zeros(1, 3, dtype=torch.int32), packed[:-1], [2, 3], 5, True, 0, None)


def test_row_chunking_is_exact(monkeypatch):
    # Large inputs are processed in row chunks; a tiny budget puts chunk edges everywhere.
    x = torch.randint(-300, 300, (37, 9), dtype=torch.int64)
    codes = deepshift.pack_codes(_codes((5, 9), 5), 5)
    full = shift_linear_reference(x, codes, [5, 9], 5, True, -4, None)
    monkeypatch.setattr("deepshift.ops.reference._GATHER_BUDGET", 50)
    assert torch.equal(shift_linear_reference(x, codes, [5, 9], 5, True, -4, None), full)
