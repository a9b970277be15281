// The integer-only models' epilogue (int_epilogue_run in kernels.h) built for AVX-512 (F, VL): eight
// int64 lanes per step, with the 64-bit arithmetic shift, min / max and int64 -> int32 narrowing that
// AVX2 lacks (there each is several instructions). The same arithmetic, bit for bit; run only where
// use_avx512() says the CPU has it (IntEpilogue::apply). The arithmetic is epilogue_lanes.h's.
#include "epilogue.h"

#ifdef DS_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,bmi2")

namespace deepshift_cpu {
namespace {

#include "epilogue_lanes.h"  // this copy compiled for AVX-512

typedef int64_t I64x8 __attribute__((vector_size(64), aligned(8), may_alias));
typedef uint64_t U64x8 __attribute__((vector_size(64), aligned(8), may_alias));

// The first m (1 to 8) values at p as int64 lanes (int32 sign-extended); the rest of the lanes 0.
template <typename S>
inline I64x8 load8(const S* p, __mmask8 m) {
  if constexpr (sizeof(S) == 8) return reinterpret_cast<I64x8>(_mm512_maskz_loadu_epi64(m, p));
  else return reinterpret_cast<I64x8>(_mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(m, p)));
}

// Stores the lanes of m (int32: the low 32 bits, as the scalar cast).
template <typename S>
inline void store8(S* p, I64x8 v, __mmask8 m) {
  if constexpr (sizeof(S) == 8) _mm512_mask_storeu_epi64(p, m, reinterpret_cast<__m512i>(v));
  else _mm512_mask_cvtepi64_storeu_epi32(p, m, reinterpret_cast<__m512i>(v));
}

// K > 0 terms (0: k_dyn of them), with or without a residual; `rows` runs of n values, x's at stride
// xs, y's and r's at stride ys (the parameters set up once for all of them).
template <int K, bool R, typename XI, typename XO, typename XR>
void run8(const XI* x, int64_t xs, XO* y, int64_t ys, int64_t rows, int64_t n, int k_dyn, const int64_t* left,
          const int64_t* neg, int64_t bias, int64_t right, const XR* r, int64_t rs, int64_t lo, int64_t hi) {
  const EpilogueTerms terms(K > 0 ? K : k_dyn, left, neg);
  const uint64_t half = right > 0 ? (uint64_t(1) << (right - 1)) - 1 : 0;
  const I64x8 lov = I64x8{} + lo, hiv = I64x8{} + hi;
  auto step = [&](const XI* src, const XR* rsrc, XO* dst, __mmask8 mask) {
    const U64x8 v = reinterpret_cast<U64x8>(load8(src, mask));
    I64x8 t = epilogue_lanes<U64x8, I64x8>(v, K > 0 ? K : terms.kk, terms.ls, terms.ns, static_cast<uint64_t>(bias),
                                           right, half);
    if constexpr (R)
      t = reinterpret_cast<I64x8>(reinterpret_cast<U64x8>(t) + (reinterpret_cast<U64x8>(load8(rsrc, mask)) << rs));
    t = t < lov ? lov : t;
    t = t > hiv ? hiv : t;
    store8(dst, t, mask);
  };
  const __mmask8 last = static_cast<__mmask8>((1u << (n % 8)) - 1);
  for (int64_t row = 0; row < rows; ++row, x += xs, y += ys, r = R ? r + ys : r) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) step(x + i, R ? r + i : nullptr, y + i, 0xFF);
    if (i < n)  // the last 1-7 values: masked loads and stores (each output depends on its own inputs only)
      step(x + i, R ? r + i : nullptr, y + i, last);
  }
}

template <int K, typename XI, typename XO, typename XR>
void run(const XI* x, int64_t xs, XO* y, int64_t ys, int64_t rows, int64_t n, int k_dyn, const int64_t* left,
         const int64_t* neg, int64_t bias, int64_t right, int64_t pre, const XR* r, int64_t rs, int64_t lo,
         int64_t hi) {
  if (pre != 0 || k_dyn > 8 || right < -63 || right > 63) {  // the general case: the AVX2 build's loops
    for (int64_t row = 0; row < rows; ++row)
      ds_avx2::int_epilogue_run<K>(x + row * xs, y + row * ys, n, k_dyn, left, neg, bias, right, pre,
                                   r ? r + row * ys : nullptr, rs, lo, hi);
    return;
  }
  if (r) run8<K, true>(x, xs, y, ys, rows, n, k_dyn, left, neg, bias, right, r, rs, lo, hi);
  else run8<K, false>(x, xs, y, ys, rows, n, k_dyn, left, neg, bias, right, r, rs, lo, hi);
}

}  // namespace

template <typename XI, typename XO, typename XR>
void int_epilogue_avx512(const XI* x, int64_t xs, XO* y, int64_t ys, int64_t rows, int64_t n, int k,
                         const int64_t* left, const int64_t* neg, int64_t bias, int64_t right, int64_t pre,
                         const XR* r, int64_t rs, int64_t lo, int64_t hi) {
  if (k == 1) run<1>(x, xs, y, ys, rows, n, k, left, neg, bias, right, pre, r, rs, lo, hi);
  else if (k == 2) run<2>(x, xs, y, ys, rows, n, k, left, neg, bias, right, pre, r, rs, lo, hi);
  else if (k == 3) run<3>(x, xs, y, ys, rows, n, k, left, neg, bias, right, pre, r, rs, lo, hi);
  else run<0>(x, xs, y, ys, rows, n, k, left, neg, bias, right, pre, r, rs, lo, hi);
}

#define DS_INSTANTIATE(XI, XO, XR)                                                                       \
  template void int_epilogue_avx512(const XI*, int64_t, XO*, int64_t, int64_t, int64_t, int, const int64_t*, \
                                    const int64_t*, int64_t, int64_t, int64_t, const XR*, int64_t, int64_t,   \
                                    int64_t);
DS_INSTANTIATE(int32_t, int32_t, int32_t)
DS_INSTANTIATE(int32_t, int64_t, int64_t)
DS_INSTANTIATE(int64_t, int64_t, int64_t)
#undef DS_INSTANTIATE

}  // namespace deepshift_cpu

#pragma GCC pop_options
#endif
