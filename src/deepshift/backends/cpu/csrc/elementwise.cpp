// The element-wise kernels: fixed-point rounding and output scaling of frozen layers, BatchNorm's
// affine, training-time fake quantization, DeepShift-Q / -PS weight rounding.
#include "common.h"
#include "epilogue.h"

namespace deepshift_cpu {

// Fixed-point rounding of a float input, fused: clamp(round(x * 2**F), lo, hi) as int32/int64 (round
// = half to even, or floor). Equal to the frozen modules' float64 path for float32/float64 input:
// x * 2**F is exact in double (a power-of-two scale), and so are rounding and clamping. Returns
// (q, has_nan); a NaN element makes has_nan true (the caller raises).
std::tuple<torch::Tensor, bool> quantize(const torch::Tensor& x, int64_t frac_bits, int64_t lo, int64_t hi,
                                         bool floor_mode, bool out64) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kFloat64, "x must be float32/float64");
  auto xc = x.contiguous();
  auto q = torch::empty(xc.sizes(), out64 ? torch::kInt64 : torch::kInt32);
  const int64_t n = xc.numel();
  const double scale = std::ldexp(1.0, static_cast<int>(frac_bits));
  const double dlo = static_cast<double>(lo), dhi = static_cast<double>(hi);
  std::atomic<bool> nan(false);
  auto body = [&](auto* xp, auto* qp) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      bool local_nan = false;
      for (int64_t i = b; i < e; ++i) {
        const double v = static_cast<double>(xp[i]) * scale;
        if (v != v) {
          local_nan = true;
          qp[i] = 0;
          continue;
        }
        double r = floor_mode ? std::floor(v) : std::nearbyint(v);
        r = r < dlo ? dlo : (r > dhi ? dhi : r);
        qp[i] = static_cast<std::remove_pointer_t<decltype(qp)>>(r);
      }
      if (local_nan) nan.store(true);
    });
  };
  if (xc.dtype() == torch::kFloat32) {
    if (out64) body(xc.data_ptr<float>(), q.data_ptr<int64_t>());
    else body(xc.data_ptr<float>(), q.data_ptr<int32_t>());
  } else {
    if (out64) body(xc.data_ptr<double>(), q.data_ptr<int64_t>());
    else body(xc.data_ptr<double>(), q.data_ptr<int32_t>());
  }
  return std::make_tuple(q, nan.load());
}

// float(double(y) * 2**exponent) into float32 / float64: the frozen modules' output scaling, fused.
torch::Tensor scale(const torch::Tensor& y, int64_t exponent, bool out64) {
  TORCH_CHECK(y.dtype() == torch::kInt32 || y.dtype() == torch::kInt64, "y must be int32/int64");
  auto yc = y.contiguous();
  auto out = torch::empty(yc.sizes(), out64 ? torch::kFloat64 : torch::kFloat32);
  const int64_t n = yc.numel();
  const double s = std::ldexp(1.0, static_cast<int>(exponent));
  auto body = [&](auto* yp, auto* op) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        op[i] = static_cast<std::remove_pointer_t<decltype(op)>>(static_cast<double>(yp[i]) * s);
    });
  };
  if (yc.dtype() == torch::kInt32) {
    if (out64) body(yc.data_ptr<int32_t>(), out.data_ptr<double>());
    else body(yc.data_ptr<int32_t>(), out.data_ptr<float>());
  } else {
    if (out64) body(yc.data_ptr<int64_t>(), out.data_ptr<double>());
    else body(yc.data_ptr<int64_t>(), out.data_ptr<float>());
  }
  return out;
}

// out[n, c, ...] = x[n, c, ...] * scale[c] + shift[c] as two separately rounded operations (a multiply,
// then an add; built with -ffp-contract=off, so never one FMA): FrozenBatchNorm's forward in one pass,
// bit for bit torch.add(torch.mul(x, scale), shift). x: contiguous (N, C, ...) float32/float64.
torch::Tensor channel_affine(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& shift) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "x must be contiguous (N, C, ...)");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kFloat64, "x must be float32/float64");
  const int64_t C = x.size(1);
  TORCH_CHECK(scale.dtype() == x.dtype() && shift.dtype() == x.dtype() && scale.is_contiguous() &&
                  shift.is_contiguous() && scale.numel() == C && shift.numel() == C,
              "scale / shift must be contiguous (C,) of x's dtype");
  auto out = torch::empty_like(x);
  const int64_t planes = x.size(0) * C, inner = C ? x.numel() / std::max<int64_t>(1, planes) : 0;
  const bool avx = use_avx2();
  auto body = [&](auto* xp, auto* op, auto* sp, auto* hp) {
    at::parallel_for(0, planes, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, inner)),
                     [&](int64_t b, int64_t e) {
      const decltype(xp) no_residual = nullptr;
      // The channel advances with the plane (no division per plane: 8x8 planes are only 64 values).
      for (int64_t p = b, c = b % C; p < e; ++p, c = c + 1 == C ? 0 : c + 1) {
#ifdef DS_X86
        if (avx) {
          ds_avx2::epilogue_run<false>(xp + p * inner, op + p * inner, inner, sp[c], hp[c], no_residual);
          continue;
        }
#endif
        ds_portable::epilogue_run<false>(xp + p * inner, op + p * inner, inner, sp[c], hp[c], no_residual);
      }
    });
  };
  if (x.dtype() == torch::kFloat32)
    body(x.data_ptr<float>(), out.data_ptr<float>(), scale.data_ptr<float>(), shift.data_ptr<float>());
  else
    body(x.data_ptr<double>(), out.data_ptr<double>(), scale.data_ptr<double>(), shift.data_ptr<double>());
  (void)avx;
  return out;
}

// deepshift::int_epilogue on contiguous int32 or int64 x (the result in x's dtype, computed in int64):
// per channel (dimension 1) when signs has more than one column, else one set of parameters for the
// whole tensor; signs / lefts (K, C), bias and rights (C), all int64 contiguous; residual (x's shape
// and dtype, contiguous) or None; lo / hi the clamp. Bit for bit int_epilogue_reference
// (deepshift/ops/reference.py).
torch::Tensor int_epilogue(const torch::Tensor& x, const torch::Tensor& signs, const torch::Tensor& lefts,
                           const c10::optional<torch::Tensor>& bias, const torch::Tensor& rights, int64_t pre,
                           const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                           int64_t hi) {
  TORCH_CHECK((x.dtype() == torch::kInt64 || x.dtype() == torch::kInt32) && x.is_contiguous(),
              "x must be contiguous int32 / int64");
  const IntEpilogue ep(signs, lefts, bias, rights, pre, residual_shift, lo, hi);
  const int64_t C = ep.C;
  const bool per_channel = C > 1;
  TORCH_CHECK(!per_channel || (x.dim() >= 2 && x.size(1) == C), "x's dimension 1 must have C channels");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res)
    TORCH_CHECK(residual->dtype() == x.dtype() && residual->is_contiguous() && residual->sizes() == x.sizes(),
                "residual must be contiguous, of x's shape and dtype");
  auto out = torch::empty_like(x);
  const int64_t n = x.numel();
  const int64_t planes = per_channel ? x.size(0) * C : std::max<int64_t>(1, (n + 4095) / 4096);
  const int64_t inner = per_channel ? (planes ? n / planes : 0) : 4096;
  const bool avx = use_avx2();
  auto go = [&](auto tag) {
    using X = decltype(tag);
    const X* xp = x.data_ptr<X>();
    X* op = out.data_ptr<X>();
    const X* resp = has_res ? residual->data_ptr<X>() : nullptr;
    at::parallel_for(0, planes, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, inner)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t start = p * inner, len = std::min(inner, n - start);
        if (len <= 0) continue;
        ep.apply(xp + start, op + start, len, per_channel ? p % C : 0, resp ? resp + start : nullptr, avx);
      }
    });
  };
  if (x.dtype() == torch::kInt64) go(int64_t{});
  else go(int32_t{});
  return out;
}

// Training-time fixed-point rounding (deepshift.fixed_point's forward) of a contiguous float32
// tensor in one pass; see fake_quantize_f32. lo/hi are the float32 bounds the torch path uses,
// glo/ghi the gradient's pass band. Returns (y, whether some x lies outside the band).
std::tuple<torch::Tensor, bool> fake_quantize(const torch::Tensor& x, int64_t frac_bits, double lo, double hi,
                                              bool floor_mode, double glo, double ghi) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  auto y = torch::empty_like(x);
  const int64_t n = x.numel();
  const float s = std::ldexp(1.0f, static_cast<int>(frac_bits));
  const float inv = std::ldexp(1.0f, -static_cast<int>(frac_bits));
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float fglo = static_cast<float>(glo), fghi = static_cast<float>(ghi);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx2 = use_avx2();
  std::atomic<bool> outside(false);
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
    bool o;
#ifdef DS_X86
    if (avx2)
      o = ds_avx2::fake_quantize_f32(xp + b, yp + b, e - b, s, inv, flo, fhi, floor_mode, fglo, fghi);
    else
#endif
      o = ds_portable::fake_quantize_f32(xp + b, yp + b, e - b, s, inv, flo, fhi, floor_mode, fglo, fghi);
    if (o) outside.store(true);
  });
  (void)avx2;
  return std::make_tuple(y, outside.load());
}

// A fresh tensor like `like`, filled by body(y, b, e) over element ranges in parallel.
template <typename Body>
torch::Tensor weight_pass(const torch::Tensor& like, Body body) {
  auto y = torch::empty_like(like);
  at::parallel_for(0, like.numel(), 1 << 15, [&](int64_t b, int64_t e) { body(y, b, e); });
  return y;
}

// The deterministic DeepShift-Q / -PS weight rounding (deepshift.core.quantize), one pass each (see q_round
// and ps_round in kernels.h). thr: the least value of w's dtype above sqrt(1/2). lo, hi:
// 2**p_min, 2**p_max (Q) or p_min, p_max (PS), with 2**p_min and 2**p_max normal in the dtype (the
// caller checks).
torch::Tensor q_round(const torch::Tensor& w, double lo, double hi, double thr) {
  TORCH_CHECK(w.is_contiguous() && (w.dtype() == torch::kFloat32 || w.dtype() == torch::kFloat64),
              "w must be contiguous float32/float64");
  const bool avx = use_avx2();
  auto run = [&](auto tag) {
    using F = decltype(tag);
    using I = typename ds_portable::FloatBits<F>::I;
    const F t2 = static_cast<F>(2 * thr);  // in [1, 2): the same mantissa bits
    I mt;
    std::memcpy(&mt, &t2, sizeof mt);
    mt &= (I(1) << ds_portable::FloatBits<F>::M) - 1;
    const F* wp = w.data_ptr<F>();
    return weight_pass(w, [&](torch::Tensor& y, int64_t b, int64_t e) {
      F* yp = y.data_ptr<F>();
#ifdef DS_X86
      if (avx) return ds_avx2::q_round<F>(wp + b, yp + b, e - b, F(lo), F(hi), mt);
#endif
      ds_portable::q_round<F>(wp + b, yp + b, e - b, F(lo), F(hi), mt);
    });
  };
  (void)avx;
  return w.dtype() == torch::kFloat32 ? run(float{}) : run(double{});
}

torch::Tensor ps_round(const torch::Tensor& shift, const torch::Tensor& sign, double lo, double hi) {
  TORCH_CHECK(shift.is_contiguous() && sign.is_contiguous() && shift.dtype() == sign.dtype() &&
                  shift.sizes() == sign.sizes() &&
                  (shift.dtype() == torch::kFloat32 || shift.dtype() == torch::kFloat64),
              "shift and sign must be contiguous float32/float64 of one shape");
  const bool avx = use_avx2();
  auto run = [&](auto tag) {
    using F = decltype(tag);
    const F* sp = shift.data_ptr<F>();
    const F* gp = sign.data_ptr<F>();
    return weight_pass(shift, [&](torch::Tensor& y, int64_t b, int64_t e) {
      F* yp = y.data_ptr<F>();
#ifdef DS_X86
      if (avx) return ds_avx2::ps_round<F>(sp + b, gp + b, yp + b, e - b, F(lo), F(hi));
#endif
      ds_portable::ps_round<F>(sp + b, gp + b, yp + b, e - b, F(lo), F(hi));
    });
  };
  (void)avx;
  return shift.dtype() == torch::kFloat32 ? run(float{}) : run(double{});
}

}  // namespace deepshift_cpu
