// The integer-only models' epilogue (deepshift::int_epilogue, on int32 or int64 tensors) prepared once
// per call: per channel, its active terms' left shifts and negation masks, bias, right shift; shared by
// the element-wise op (elementwise.cpp) and the integer conv's finish step (conv.cpp).
#pragma once

#include "common.h"

namespace deepshift_cpu {

#ifdef DS_X86
// epilogue512.cpp: the AVX-512 build of int_epilogue_run (instantiated for the (XI, XO, XR) below).
// Takes `rows` runs of n values: x's at stride xs, y's and r's at stride ys.
template <typename XI, typename XO, typename XR>
void int_epilogue_avx512(const XI* x, int64_t xs, XO* y, int64_t ys, int64_t rows, int64_t n, int k,
                         const int64_t* left, const int64_t* neg, int64_t bias, int64_t right, int64_t pre,
                         const XR* r, int64_t rs, int64_t lo, int64_t hi);
#endif

struct IntEpilogue {
  int64_t K = 0, C = 0, pre = 0, rs = 0, lo = INT64_MIN, hi = INT64_MAX;
  std::vector<int64_t> left, neg, count;
  const int64_t* bias = nullptr;
  const int64_t* rights = nullptr;

  // signs / lefts (K, C), bias and rights (C): contiguous int64 (checked); the tensors must outlive
  // this record.
  IntEpilogue(const torch::Tensor& signs, const torch::Tensor& lefts, const c10::optional<torch::Tensor>& b,
              const torch::Tensor& r, int64_t pre_, int64_t residual_shift, int64_t lo_, int64_t hi_)
      : pre(pre_), rs(residual_shift), lo(lo_), hi(hi_) {
    TORCH_CHECK(signs.dim() == 2 && lefts.sizes() == signs.sizes() && signs.dtype() == torch::kInt64 &&
                    lefts.dtype() == torch::kInt64 && signs.is_contiguous() && lefts.is_contiguous(),
                "signs / lefts must be contiguous int64 (K, C)");
    K = signs.size(0);
    C = signs.size(1);
    TORCH_CHECK(r.dtype() == torch::kInt64 && r.is_contiguous() && r.numel() == C, "bad rights");
    if (b.has_value() && b->defined()) {
      TORCH_CHECK(b->dtype() == torch::kInt64 && b->is_contiguous() && b->numel() == C, "bad bias");
      bias = b->data_ptr<int64_t>();
    }
    TORCH_CHECK(pre >= 0 && pre < 63 && rs >= 0 && rs < 63, "bad shift");
    rights = r.data_ptr<int64_t>();
    left.assign(K * C, 0);
    neg.assign(K * C, 0);
    count.assign(C, 0);
    const int64_t* sp = signs.data_ptr<int64_t>();
    const int64_t* lp = lefts.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t sg = sp[k * C + c];
        TORCH_CHECK(sg >= -1 && sg <= 1 && lp[k * C + c] >= 0 && lp[k * C + c] < 63, "bad sign / left shift");
        if (sg == 0) continue;
        left[c * K + count[c]] = lp[k * C + c];
        neg[c * K + count[c]] = sg < 0 ? -1 : 0;
        ++count[c];
      }
  }

  // y[0, n) = the epilogue of x[0, n), all in channel c (0 when per tensor); r: the residual or null.
  // XI, XO, XR: int32_t or int64_t (computed in int64; see int_epilogue_run).
  template <typename XI, typename XO, typename XR>
  void apply(const XI* x, XO* y, int64_t n, int64_t c, const XR* r, bool avx) const {
    apply_rows(x, n, y, n, 1, n, c, r, avx);
  }

  // apply on `rows` runs of n values of channel c: x's at stride xs, y's and r's at stride ys.
  template <typename XI, typename XO, typename XR>
  void apply_rows(const XI* x, int64_t xs, XO* y, int64_t ys, int64_t rows, int64_t n, int64_t c, const XR* r,
                  bool avx) const {
    const int kc = static_cast<int>(count[c]);
    const int64_t* lc = left.data() + c * K;
    const int64_t* nc = neg.data() + c * K;
    const int64_t bias_c = bias ? bias[c] : 0;
#ifdef DS_X86
    if (avx && use_avx512() && (sizeof(XI) == 4 || sizeof(XO) == 8) && sizeof(XO) == sizeof(XR))
      return int_epilogue_avx512(x, xs, y, ys, rows, n, kc, lc, nc, bias_c, rights[c], pre, r, rs, lo, hi);
#endif
    auto run = [&](auto ns) {
      constexpr int N = decltype(ns)::value;
      for (int64_t row = 0; row < rows; ++row) {
        const XR* rr = r ? r + row * ys : nullptr;
#ifdef DS_X86
        if (avx) {
          ds_avx2::int_epilogue_run<N>(x + row * xs, y + row * ys, n, kc, lc, nc, bias_c, rights[c], pre, rr, rs,
                                       lo, hi);
          continue;
        }
#endif
        ds_portable::int_epilogue_run<N>(x + row * xs, y + row * ys, n, kc, lc, nc, bias_c, rights[c], pre, rr, rs,
                                         lo, hi);
      }
    };
    if (kc == 1) run(std::integral_constant<int, 1>());
    else if (kc == 2) run(std::integral_constant<int, 2>());
    else if (kc == 3) run(std::integral_constant<int, 3>());
    else run(std::integral_constant<int, 0>());
    (void)avx;
  }
};

}  // namespace deepshift_cpu
