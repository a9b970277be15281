// deepshift::shift_linear's table-lookup kernel (AVX-512, any batch): for one input value x[k], the
// layer's distinct weights (at most 32 signed powers of two) times x[k] form a table of 16 or 32
// int32 entries, built with one variable shift and one masked negation; each weight's index into that
// table picks its term, 16 output features at a time, with one lane permute (vpermd / vpermi2d) from
// the table and one add. No multiplication, and no per-weight shift or sign step.
//
// Indices are packed in 32-bit words (8 of 4 bits or 6 of 5 bits): word lane l of tile (block, k)
// holds the indices of weights (o, k) for o = block * B + p * 16 + l, p = 0 .. P-1, so a tile is one
// 64-byte load for B = 16 P outputs, and one right shift brings index p to the low bits the permute
// reads (it ignores the rest). Index 0 is the zero weight where the layer has zeros.
//
// Sums wrap mod 2**32 exactly as torch's int32 arithmetic: a table entry is (x << a) or its negation
// mod 2**32, the same term the reference op adds.
//
// The wide form (int64 accumulators, y int64) keeps the int32 tables and int32 lane sums, but adds
// the lane sums into int64 outputs every W columns, W chosen from the call's largest |x| and the
// layer's largest shift so that no table entry and no W-term sum can leave int32: exact without any
// 64-bit lane arithmetic in the inner loop.
#include "common.h"

namespace deepshift_cpu {

// The kernel's layout of scode (O, K) int8: (tiles int32 [ceil(O / B)][K][16], values int32 [16 or
// 32], bits 4 or 5); empty tensors and bits 0 where the layer has more than 32 distinct weights.
std::tuple<torch::Tensor, torch::Tensor, int64_t> lut_layout(const torch::Tensor& scode) {
  TORCH_CHECK(scode.dim() == 2 && scode.dtype() == torch::kInt8 && scode.is_contiguous(), "bad scode");
  const int64_t O = scode.size(0), K = scode.size(1);
  const int8_t* s = scode.data_ptr<int8_t>();
  // Distinct weights (index 0: the zero weight) and each scode's index. scode comes from decode
  // with width 32: an amount that int32 lanes shift out entirely is already the zero weight.
  bool seen[256] = {};
  for (int64_t i = 0; i < O * K; ++i) seen[s[i] + 128] = true;
  // The zero weight takes index 0 where the layer has one; a layer without (DeepShift-Q) gets all 32
  // entries for its weights (a full 5-bit Q layer has 32). Padding outputs read index 0 whatever it
  // holds: their lanes are never stored.
  std::vector<int32_t> distinct;
  if (seen[128]) distinct.push_back(0);
  uint8_t index[256] = {};
  for (int v = -128; v < 128; ++v)
    if (v != 0 && seen[v + 128]) {
      index[v + 128] = static_cast<uint8_t>(distinct.size());  // <= 255
      distinct.push_back(v);
    }
  const int64_t n = static_cast<int64_t>(distinct.size());
  if (n > 32) return {torch::Tensor(), torch::Tensor(), 0};
  const int bits = n <= 16 ? 4 : 5, T = 1 << bits, P = bits == 4 ? 8 : 6, B = 16 * P;
  auto values = torch::zeros({T}, torch::kInt32);
  std::copy(distinct.begin(), distinct.end(), values.data_ptr<int32_t>());
  const int64_t NB = (O + B - 1) / B;
  auto tiles = torch::zeros({NB, K, 16}, torch::kInt32);
  uint32_t* t = reinterpret_cast<uint32_t*>(tiles.data_ptr<int32_t>());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int p = 0; p < P; ++p)
        for (int l = 0; l < 16; ++l) {
          const int64_t o = b * B + p * 16 + l;
          if (o >= O) continue;
          const int8_t* row = s + o * K;
          uint32_t* dst = t + b * K * 16 + l;
          for (int64_t k = 0; k < K; ++k)
            dst[k * 16] |= static_cast<uint32_t>(index[row[k] + 128]) << (bits * p);
        }
  });
  return {tiles, values, bits};
}

namespace {

// Shift amount (>= 32: the zero weight) and sign of table entry i.
inline void entry(int32_t v, uint32_t* amount, bool* negative) {
  *amount = v == 0 ? 32u : static_cast<uint32_t>((v < 0 ? -v : v) - 1);
  *negative = v < 0;
}

#ifdef DS_X86
// The AVX-512 code (lambdas included, which a function attribute would not cover); run only where
// use_avx512() says the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,bmi2")

// The tables of rows [0, rows) and columns [k0, k1) of x (row stride K): tbl[(m * (k1 - k0) + k - k0) * T
// ..], entry i = +-(x[m, k] << amount_i) mod 2**32 (one variable shift, one masked negation).
void lut_tables(const uint32_t* x, int64_t K, int64_t rows, int64_t k0, int64_t k1, const int32_t* values, int T,
                uint32_t* tbl) {
  alignas(64) uint32_t amount[32];
  uint32_t negbits = 0;
  for (int i = 0; i < 32; ++i) {
    bool neg = false;
    amount[i] = 32;
    if (i < T) entry(values[i], &amount[i], &neg);
    negbits |= static_cast<uint32_t>(neg) << i;
  }
  const __m512i a0 = _mm512_load_si512(amount), a1 = _mm512_load_si512(amount + 16);
  const __mmask16 n0 = static_cast<__mmask16>(negbits), n1 = static_cast<__mmask16>(negbits >> 16);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = k0; k < k1; ++k, tbl += T) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(x[m * K + k]));
      __m512i t = _mm512_sllv_epi32(xb, a0);  // counts >= 32 give 0
      _mm512_store_si512(tbl, _mm512_mask_sub_epi32(t, n0, zero, t));
      if (T == 32) {
        t = _mm512_sllv_epi32(xb, a1);
        _mm512_store_si512(tbl + 16, _mm512_mask_sub_epi32(t, n1, zero, t));
      }
    }
}

// How many 64-byte tiles ahead of the one in use the loop prefetches.
constexpr int kPrefetchTiles = 64;

// One block b (outputs b B + 16 p + lane) over columns [k0, k1), MB rows: acc[m][p] sums the terms;
// then y (row stride O) += acc, or y = acc + bias for the first chunk of columns. tbl: the rows'
// tables of columns k0 .., row m's at tbl + m * rs.
template <int BITS, int MB, bool WIDE>
void lut_block(const uint32_t* tiles, int64_t K, const uint32_t* tbl, int64_t rs, int64_t b, int64_t k0, int64_t k1,
               int64_t O, const void* bias, void* y) {
  constexpr int P = BITS == 4 ? 8 : 6, T = 1 << BITS, B = 16 * P;
  __m512i acc[MB][P];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[m][p] = _mm512_setzero_si512();
  const uint32_t* ct = tiles + (b * K + k0) * 16;
  for (int64_t k = k0; k < k1; ++k, ct += 16) {
    // The tiles stream from memory: ask for them a few hundred cycles early.
    _mm_prefetch(reinterpret_cast<const char*>(ct + 16 * kPrefetchTiles), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(ct);
    // Fully unrolled, so that indices and accumulators live in registers: the P indices once, then
    // per row its table (one or two registers) against each.
    __m512i idx[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) idx[p] = p ? _mm512_srli_epi32(v, BITS * p) : v;
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const uint32_t* t = tbl + m * rs + (k - k0) * T;
      const __m512i lo = _mm512_load_si512(t);
      const __m512i hi = BITS == 4 ? lo : _mm512_load_si512(t + 16);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const __m512i term =
            BITS == 4 ? _mm512_permutexvar_epi32(idx[p], lo) : _mm512_permutex2var_epi32(lo, idx[p], hi);
        acc[m][p] = _mm512_add_epi32(acc[m][p], term);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t o = b * B + p * 16;
    if (o >= O) break;
    const int64_t n = std::min<int64_t>(16, O - o);
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
    for (int m = 0; m < MB; ++m) {
      if (WIDE) {
        // Two halves of 8 lanes, sign-extended to int64 and added to the outputs (or the bias).
        int64_t* dst = static_cast<int64_t*>(y) + m * O + o;
        const int64_t* src = k0 ? dst : static_cast<const int64_t*>(bias) + o;
        const __mmask8 k_lo = static_cast<__mmask8>(keep), k_hi = static_cast<__mmask8>(keep >> 8);
        const bool from = k0 || bias;
        const __m512i p_lo = from ? _mm512_maskz_loadu_epi64(k_lo, src) : _mm512_setzero_si512();
        const __m512i p_hi = from ? _mm512_maskz_loadu_epi64(k_hi, src + 8) : _mm512_setzero_si512();
        const __m512i a_lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[m][p]));
        const __m512i a_hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[m][p], 1));
        _mm512_mask_storeu_epi64(dst, k_lo, _mm512_add_epi64(p_lo, a_lo));
        _mm512_mask_storeu_epi64(dst + 8, k_hi, _mm512_add_epi64(p_hi, a_hi));
      } else {
        uint32_t* dst = static_cast<uint32_t*>(y) + m * O + o;
        const uint32_t* bp = static_cast<const uint32_t*>(bias);
        const __m512i prev = k0 ? _mm512_maskz_loadu_epi32(keep, dst)
                                : (bp ? _mm512_maskz_loadu_epi32(keep, bp + o) : _mm512_setzero_si512());
        _mm512_mask_storeu_epi32(dst, keep, _mm512_add_epi32(prev, acc[m][p]));
      }
    }
  }
}

using LutBlockFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t,
                            int64_t, const void*, void*);

// Rows per pass: P indices, P accumulators per row and the row's table within the 32 vector
// registers (more rows spill accumulators to the stack: slower than another pass over the indices,
// which the chunking below keeps in L1).
constexpr int kRows = 2;

template <bool WIDE>
LutBlockFn lut_block_fn(int bits, int mb) {
  static_assert(kRows == 2, "one instance per row count");
  if (bits == 4) return mb == 1 ? &lut_block<4, 1, WIDE> : &lut_block<4, 2, WIDE>;
  return mb == 1 ? &lut_block<5, 1, WIDE> : &lut_block<5, 2, WIDE>;
}

// Level-2 cache bytes per core from the OS (the chunk of K whose tables a pass re-reads per block).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(512) * 1024;
  }();
  return bytes;
}
#pragma GCC pop_options
#endif

}  // namespace

// y (M, O) = x (M, K) times the weights of lut_layout's (tiles, values, bits), plus bias (O,) if given.
// Narrow (wide false): int32 x, bias and y, mod 2**32. Wide: int32 or int64 x, int64 bias and y,
// exact; returns an undefined tensor (None in Python: the caller takes another path) where some
// |x| << shift leaves int32. AVX-512 only: the Python side calls it where current_isa() is 2.
torch::Tensor gemv_lut(const torch::Tensor& x_in, const torch::Tensor& tiles, const torch::Tensor& values,
                       int64_t bits, int64_t O, const c10::optional<torch::Tensor>& bias, bool wide) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous() &&
                  (x_in.dtype() == torch::kInt32 || (wide && x_in.dtype() == torch::kInt64)),
              "bad x");
  TORCH_CHECK(bits == 4 || bits == 5, "bad bits");
  TORCH_CHECK(use_avx512(), "gemv_lut needs the AVX-512 path");
  const int64_t M = x_in.size(0), K = x_in.size(1), T = int64_t(1) << bits, B = 16 * (bits == 4 ? 8 : 6);
  const int64_t NB = (O + B - 1) / B;
  TORCH_CHECK(tiles.dtype() == torch::kInt32 && tiles.is_contiguous() && tiles.numel() == NB * K * 16, "bad tiles");
  TORCH_CHECK(values.dtype() == torch::kInt32 && values.numel() == T, "bad values");
  const auto bias_dtype = wide ? torch::kInt64 : torch::kInt32;
  const void* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dtype() == bias_dtype && bias->numel() == O && bias->is_contiguous(), "bad bias");
    bp = bias->data_ptr();
  }
  const int32_t* vp = values.data_ptr<int32_t>();
  int64_t columns = K;  // columns summed in int32 before the int64 outputs take the sums
  if (wide) {
    int64_t max_amount = -1, max_x = 0;
    for (int64_t i = 0; i < T; ++i)
      if (vp[i] != 0) max_amount = std::max<int64_t>(max_amount, std::abs(vp[i]) - 1);
    // One scan of x for its largest magnitude (stopping once past int32: refused anyway).
    const int64_t limit = (int64_t(1) << 31) - 1;
    auto scan = [&](const auto* xs) {
      for (int64_t i = 0; i < M * K && max_x <= limit; ++i) {
        const int64_t v = xs[i];
        max_x = std::max<int64_t>(max_x, v == INT64_MIN ? INT64_MAX : (v < 0 ? -v : v));
      }
    };
    if (x_in.dtype() == torch::kInt64) scan(x_in.data_ptr<int64_t>());
    else scan(x_in.data_ptr<int32_t>());
    if (max_x > limit || max_amount >= 31 || (max_amount >= 0 && (max_x << max_amount) > limit))
      return torch::Tensor();
    const int64_t term = max_amount < 0 ? 0 : (max_x << max_amount);
    columns = term == 0 ? K : std::max<int64_t>(1, limit / term);
  }
  const torch::Tensor x = x_in.dtype() == torch::kInt32 ? x_in : x_in.to(torch::kInt32);
  auto y = torch::empty({M, O}, wide ? torch::kInt64 : torch::kInt32);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  const uint32_t* tp = reinterpret_cast<const uint32_t*>(tiles.data_ptr<int32_t>());
  void* yp = y.data_ptr();
  const int64_t y_bytes = wide ? 8 : 4;
#ifdef DS_X86
  {
    // Work in chunks of rows and columns whose tables fit half of L2, built by each thread for
    // itself (a few percent of the work): memory sees each index tile once per row chunk, and a
    // block's tiles of one column chunk stay in L1 across the passes over the rows. Wide: a chunk
    // is at most `columns` long (each chunk's int32 sums go to the int64 outputs).
    const int64_t half_l2 = l2_bytes() / 2 / (T * 4);  // table entries of T
    const int64_t mc = std::clamp<int64_t>(half_l2 / 64, 1, M);
    const int64_t kc = std::min(columns, std::clamp<int64_t>(half_l2 / mc, 16, 1024));
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kSerialWork / std::max<int64_t>(1, K * M * 8)));
    const int ib = static_cast<int>(bits);
    const LutBlockFn pass = wide ? lut_block_fn<true>(ib, kRows) : lut_block_fn<false>(ib, kRows);
    const LutBlockFn last = wide ? lut_block_fn<true>(ib, 1) : lut_block_fn<false>(ib, 1);
    at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
      // 64-byte aligned, kept per thread (a fresh allocation of this size is a fresh mapping whose
      // page faults cost more than a small call).
      thread_local std::vector<uint32_t> buf;
      const size_t need = static_cast<size_t>(mc * kc * T + 16);
      if (buf.size() < need) buf.resize(need);
      uint32_t* tbl = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
      for (int64_t r0 = 0; r0 < M; r0 += mc) {
        const int64_t rows = std::min(mc, M - r0);
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t k1 = std::min(K, k0 + kc), rs = (k1 - k0) * T;
          lut_tables(xp + r0 * K, K, rows, k0, k1, vp, static_cast<int>(T), tbl);
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t m = 0; m < rows; m += kRows)
              (rows - m >= kRows ? pass : last)(tp, K, tbl + m * rs, rs, b, k0, k1, O, bp,
                                                static_cast<char*>(yp) + (r0 + m) * O * y_bytes);
        }
      }
    });
  }
#endif
  return y;
}

}  // namespace deepshift_cpu
