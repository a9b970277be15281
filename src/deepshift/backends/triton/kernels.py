"""Triton kernels for the integer shift ops (imported only through :mod:`deepshift.backends.triton.register`).

Importing this module requires triton. Whether the kernels are compiled for a GPU or run by
Triton's CPU interpreter is decided when this module is imported (``TRITON_INTERPRET=1``).

Both kernels share one structure: a program owns a (BLOCK_M rows) x (BLOCK_N outputs) tile of the
result and walks the reduction dimension in BLOCK_K steps. For each step it loads the packed
codes of a (BLOCK_N, BLOCK_K) weight tile, decodes them in registers (sign bit + shift field,
``BITS`` bits each in the canonical little-endian bit stream of :func:`deepshift.pack_codes`) and
accumulates ``s * (x << amount)`` over a (BLOCK_M, BLOCK_N, BLOCK_K) broadcast, summed over K.
No activation is multiplied by a weight: the terms are left shifts, a select between the value
and its negation, and additions. ``MULTIPLY=True`` compiles the same kernel with the decoded
weight ``+-2**amount`` materialised and multiplied instead: the "same structure, multiplication"
baseline the benchmarks compare against (bit-exact too, as long as nothing overflows).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_tile(codes_ptr, idx, mask, nbytes, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Decode the codes at flat weight indices ``idx``: (rel, negative, nonzero).

    Code ``i`` occupies stream bits ``i*BITS .. i*BITS + BITS - 1``: it lies in the 16-bit
    little-endian window starting at byte ``(i*BITS) >> 3`` (BITS <= 8 and the in-byte offset is
    <= 7, so offset + BITS <= 15). When BITS divides 8 no code straddles a byte and one byte load
    suffices.
    """
    bit = idx * BITS
    byte = bit >> 3
    offset = bit & 7
    word = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:
        high = tl.load(codes_ptr + byte + 1, mask=mask & (byte + 1 < nbytes), other=0).to(tl.int32)
        word = word | (high << 8)
    code = (word >> offset) & ((1 << BITS) - 1)
    field = code & ((1 << (BITS - 1)) - 1)
    negative = (code >> (BITS - 1)) != 0
    if HAS_ZERO:
        nonzero = field != 0
        rel = tl.maximum(field - 1, 0)
    else:
        nonzero = field >= 0  # always true: Q weights are never zero
        rel = field
    return rel, negative, nonzero


@triton.jit
def _shift_terms(x, amount, negative, nonzero, HAS_ZERO: tl.constexpr, MULTIPLY: tl.constexpr):
    """Sum over K of the (BLOCK_M, BLOCK_N, BLOCK_K) terms ``s * (x << amount)``: (BLOCK_M, BLOCK_N).

    ``x`` is (BLOCK_M, BLOCK_K); ``amount``, ``negative``, ``nonzero`` are (BLOCK_N, BLOCK_K).
    """
    if MULTIPLY:
        # Baseline: materialise the weight +-2**amount (0 for PS zeros) and multiply.
        one = tl.full(amount.shape, 1, amount.dtype)
        w = one << amount
        w = tl.where(negative, -w, w)
        if HAS_ZERO:
            w = tl.where(nonzero, w, 0)
        terms = x[:, None, :] * w[None, :, :]
    else:
        terms = x[:, None, :] << amount[None, :, :]
        terms = tl.where(negative[None, :, :], -terms, terms)
        if HAS_ZERO:
            terms = tl.where(nonzero[None, :, :], terms, 0)
    return tl.sum(terms, axis=2)


@triton.jit
def shift_linear_kernel(
    x_ptr,
    codes_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    nbytes,
    amount_base,
    bias_shift,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MULTIPLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y[m, n] = sum_k s[n, k] * (x[m, k] << amount[n, k]) + (bias[n] << bias_shift)``.

    ``x`` (M, K) and ``y`` (M, N) are contiguous; the weight is (N, K) row-major in the codes.
    ``amount = rel + amount_base`` with ``amount_base = shift_lo - min(shift_lo, 0)``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    x_rows = x_ptr + rm[:, None] * K
    w_rows = rn[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        rel, negative, nonzero = _decode_tile(
            codes_ptr, w_rows + kk[None, :], n_ok[:, None] & k_ok[None, :], nbytes, BITS, HAS_ZERO
        )
        amount = (rel + amount_base).to(x.dtype)
        acc += _shift_terms(x, amount, negative, nonzero, HAS_ZERO, MULTIPLY)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=n_ok, other=0)
        acc += (b << bias_shift)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _input_index(o, k, out_stride, dil, offset, in_stride, size, TRANSPOSED: tl.constexpr):
    """Input index along one spatial dimension and whether it holds a value (else zero padding).

    Plain convolution: ``i = o*stride + k*dilation - padding``. Transposed convolution, as the
    stride-1 convolution over the zero-dilated, padded input (the reference's rewrite, done in
    index arithmetic): position ``q = o + k*dilation - edge`` is input ``q / stride`` when it is a
    multiple of ``stride``, else an inserted zero.
    """
    q = o * out_stride + k * dil - offset
    ok = q >= 0
    q = tl.where(ok, q, 0)
    if TRANSPOSED:
        ok = ok & (q % in_stride == 0)
        q = q // in_stride
    ok = ok & (q < size)
    return q, ok


@triton.jit
def shift_conv_kernel(
    x_ptr,
    codes_ptr,
    bias_ptr,
    y_ptr,
    M,
    C_IN,
    C_OUT,
    CIN_G,
    COUT_G,
    FAN_IN,
    nbytes,
    amount_base,
    bias_shift,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    KD,
    KH,
    KW,
    SD,
    SH,
    SW,
    DD,
    DH,
    DW,
    PD,
    PH,
    PW,
    ID,
    IH,
    IW,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MULTIPLY: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM shift convolution over three spatial dimensions (1d/2d use size-1 dims).

    Rows are (batch, output position), columns the output channels of group ``program_id(2)``,
    the reduction runs over (c_in of the group, kd, kh, kw) in the weight's row-major order.
    ``x`` is (N, C_IN, D, H, W) and ``y`` (N, C_OUT, OD, OH, OW), contiguous. S*/D*/P* are the
    output stride, dilation and offset (padding, or the transposed rewrite's edge) per dimension,
    I* the input stride of a transposed convolution (1 otherwise).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < COUT_G
    # Row -> (n, od, oh, ow).
    positions = OD * OH * OW
    n = rm // positions
    p = rm % positions
    od = p // (OH * OW)
    ohw = p % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    x_base = (n * C_IN + g * CIN_G) * (D * H * W)
    kernel = KD * KH * KW
    co = g * COUT_G + rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    for k0 in range(0, FAN_IN, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < FAN_IN
        # Reduction index -> (ci, kd, kh, kw).
        ci = kk // kernel
        r = kk % kernel
        kd = r // (KH * KW)
        khw = r % (KH * KW)
        kh = khw // KW
        kw = khw % KW
        id_, ok_d = _input_index(od[:, None], kd[None, :], SD, DD, PD, ID, D, TRANSPOSED)
        ih, ok_h = _input_index(oh[:, None], kh[None, :], SH, DH, PH, IH, H, TRANSPOSED)
        iw, ok_w = _input_index(ow[:, None], kw[None, :], SW, DW, PW, IW, W, TRANSPOSED)
        x_ok = m_ok[:, None] & k_ok[None, :] & ok_d & ok_h & ok_w
        x_off = x_base[:, None] + ci[None, :] * (D * H * W) + (id_ * H + ih) * W + iw
        x = tl.load(x_ptr + x_off, mask=x_ok, other=0)
        if TRANSPOSED:
            # Weight (C_IN, COUT_G, *k): channel g*CIN_G + ci, output co, kernel flipped.
            w_idx = ((g * CIN_G + ci[None, :]) * COUT_G + rn[:, None]) * kernel + (kernel - 1 - r[None, :])
        else:
            # Weight (C_OUT, CIN_G, *k): row co holds FAN_IN consecutive codes.
            w_idx = co[:, None] * FAN_IN + kk[None, :]
        rel, negative, nonzero = _decode_tile(
            codes_ptr, w_idx, n_ok[:, None] & k_ok[None, :], nbytes, BITS, HAS_ZERO
        )
        amount = (rel + amount_base).to(x.dtype)
        acc += _shift_terms(x, amount, negative, nonzero, HAS_ZERO, MULTIPLY)
    if HAS_BIAS:
        b = tl.load(bias_ptr + co, mask=n_ok, other=0)
        acc += (b << bias_shift)[None, :]
    y_off = (n[:, None] * C_OUT + co[None, :]) * positions + p[:, None]
    tl.store(y_ptr + y_off, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def decode_kernel(
    codes_ptr,
    rel_ptr,
    sign_ptr,
    numel,
    nbytes,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Decode every code (tests the in-register decoding over the full code range)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    rel, negative, nonzero = _decode_tile(codes_ptr, idx, ok, nbytes, BITS, HAS_ZERO)
    sign = tl.where(negative, -1, 1)
    sign = tl.where(nonzero, sign, 0)
    tl.store(rel_ptr + idx, rel.to(tl.int64), mask=ok)
    tl.store(sign_ptr + idx, sign.to(tl.int64), mask=ok)
