"""The code format of shift weights, in one place: encode, pack, unpack, decode (pure torch).

A weight ``s * 2**p`` is stored as a ``b``-bit code (``b = weight_bits``, 2..8): bit ``b-1`` is the
sign (1 = negative), the low ``b-1`` bits are the shift field ``f``; the weight is
``(-1)**sign * 2**(shift_lo + f - z)`` with ``z = 1`` for DeepShift-PS, where ``f == 0`` is the
reserved zero code, and ``z = 0`` for Q. Every native kernel (C++, Triton) reads this format.

Packing layout (the contract native kernels read): the codes of a tensor, flattened in row-major order,
form one little-endian bit stream. Code ``i`` occupies stream bits ``i*b .. i*b + b - 1`` (its
least significant bit first), and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. The last
byte is padded with zero bits. ``n`` codes take exactly ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Codes handled per step: a multiple of 8, so every chunk starts on a byte boundary, and small
# enough that the (chunk, bits) bit matrix stays a few MiB.
_CHUNK = 1 << 20


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor, ``bits`` bits per code.

    Example:
        >>> import torch, deepshift
        >>> codes = torch.tensor([1, 2, 3, 0, 31], dtype=torch.uint8)
        >>> packed = deepshift.pack_codes(codes, 5)
        >>> packed.numel()  # ceil(5 * 5 / 8)
        4
        >>> deepshift.unpack_codes(packed, 5, 5).tolist()
        [1, 2, 3, 0, 31]
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    out = torch.empty(packed_numel(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    weights = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    byte_pos = torch.arange(8, dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        # (n, bits) matrix of the code bits, LSB first, flattened = the bit stream of this chunk.
        stream = ((chunk.unsqueeze(1) >> weights) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        # Bits are 0/1 and land on distinct positions, so the sum of shifted bits is their OR.
        packed = (stream.reshape(-1, 8) << byte_pos).sum(1, dtype=torch.uint8)
        first = start * bits // 8  # exact: start is a multiple of 8
        out[first : first + packed.numel()] = packed
    return out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a flat uint8 tensor.

    Raises ValueError when ``packed`` is not a uint8 tensor of exactly
    ``ceil(numel * bits / 8)`` bytes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    expected = packed_numel(numel, bits)
    flat = packed.detach().reshape(-1)
    if flat.numel() != expected:
        raise ValueError(
            f"{numel} codes of {bits} bits need {expected} bytes, got {flat.numel()}"
        )
    out = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    weights = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    byte_pos = torch.arange(8, dtype=torch.uint8, device=flat.device)
    for start in range(0, numel, _CHUNK):
        n = min(_CHUNK, numel - start)
        first = start * bits // 8
        nbytes = packed_numel(n, bits)
        stream = ((flat[first : first + nbytes].unsqueeze(1) >> byte_pos) & 1).reshape(-1)
        code_bits = stream[: n * bits].reshape(n, bits)
        out[start : start + n] = (code_bits << weights).sum(1, dtype=torch.uint8)
    return out


def decode_codes(
    codes: Tensor, weight_shape: list[int] | tuple[int, ...], weight_bits: int, has_zero: bool
) -> tuple[Tensor, Tensor]:
    """Unpack and decode packed codes: ``(rel, sign)`` in the weight's shape.

    ``rel = p - shift_lo`` (int64, >= 0) and ``sign`` in {-1, 0, +1} (int64; 0 only for PS zeros).
    """
    if not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be in 2..8, got {weight_bits}")
    numel = math.prod(weight_shape)
    c = unpack_codes(codes, weight_bits, numel).reshape(tuple(weight_shape)).to(torch.int64)
    field = c & (2 ** (weight_bits - 1) - 1)
    negative = (c >> (weight_bits - 1)) != 0
    sign = torch.where(negative, -1, 1)
    if has_zero:
        sign = torch.where(field == 0, 0, sign)
        rel = (field - 1).clamp_min(0)
    else:
        rel = field
    return rel, sign


def encode_codes(shift: torch.Tensor, sign: torch.Tensor, weight_bits: int, has_zero: bool,
                 shift_lo: int) -> torch.Tensor:
    """uint8 codes (unpacked, weight's shape): sign bit ``b-1``, field ``p - shift_lo + z``.

    ``z = 1`` with a zero code (PS: field 0 is the zero weight), else ``z = 0``.
    """
    field = shift.to(torch.int64) - shift_lo + (1 if has_zero else 0)
    if has_zero:
        field = torch.where(sign == 0, 0, field)
    if bool((field < 0).any()) or bool((field >= 2 ** (weight_bits - 1)).any()):
        raise ValueError(f"shifts do not fit {weight_bits}-bit codes above shift_lo={shift_lo}")
    negative = (sign < 0).to(torch.int64)
    return ((negative << (weight_bits - 1)) | field).to(torch.uint8)
