"""pack_codes / unpack_codes: exact round trips, exact sizes, the documented bit layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepshift
from deepshift.ops.codes import packed_numel


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_round_trip_any_width(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = deepshift.pack_codes(t, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (len(codes) * bits + 7) // 8
    assert deepshift.unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_across_chunks_and_shapes(bits, monkeypatch):
    # A tiny chunk size exercises the chunk boundaries that large layers hit.
    monkeypatch.setattr("deepshift.ops.codes._CHUNK", 16)
    codes = torch.randint(0, 2**bits, (3, 5, 7), dtype=torch.int64)  # any integer dtype, any shape
    packed = deepshift.pack_codes(codes, bits)
    assert packed.numel() == packed_numel(105, bits)
    assert torch.equal(deepshift.unpack_codes(packed, bits, 105).reshape(3, 5, 7), codes.to(torch.uint8))


def test_documented_layout_lsb_first_stream():
    # 5-bit codes 1, 2, 3, 0, 31 -> stream bits (LSB first): 10000 01000 11000 00000 11111.
    packed = deepshift.pack_codes(torch.tensor([1, 2, 3, 0, 31]), 5)
    assert packed.tolist() == [0b01000001, 0b00001100, 0b11110000, 0b00000001]
    # 4-bit: two codes per byte, the first in the low nibble.
    assert deepshift.pack_codes(torch.tensor([0xA, 0x3]), 4).tolist() == [0x3A]
    # Padding bits are zero.
    assert deepshift.pack_codes(torch.tensor([3]), 2).tolist() == [3]


def test_errors():
    with pytest.raises(ValueError, match="lie in"):
        deepshift.pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="lie in"):
        deepshift.pack_codes(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="integer"):
        deepshift.pack_codes(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="bits"):
        deepshift.pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="need"):
        deepshift.unpack_codes(torch.zeros(3, dtype=torch.uint8), 5, 10)
    with pytest.raises(ValueError, match="uint8"):
        deepshift.unpack_codes(torch.zeros(4, dtype=torch.int32), 8, 4)
