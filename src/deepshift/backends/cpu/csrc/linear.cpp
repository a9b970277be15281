// deepshift::shift_linear's small-batch kernel (GEMV on per-weight shift codes).
#include "common.h"

namespace deepshift_cpu {

// Byte tiles for the small-batch Linear kernel: [ceil(O/8)][K][8], see gemv_tiles.
torch::Tensor gemv_layout(const torch::Tensor& scode) {
  TORCH_CHECK(scode.dim() == 2 && scode.dtype() == torch::kInt8 && scode.is_contiguous(), "bad scode");
  const int64_t O = scode.size(0), K = scode.size(1), OT = (O + 7) / 8;
  auto out = torch::zeros({OT, K, 8}, torch::kInt8);
  const int8_t* s = scode.data_ptr<int8_t>();
  int8_t* t = out.data_ptr<int8_t>();
  at::parallel_for(0, OT, 1, [&](int64_t b, int64_t e) {
    for (int64_t ot = b; ot < e; ++ot)
      for (int64_t j = 0; j < 8 && ot * 8 + j < O; ++j) {
        const int8_t* row = s + (ot * 8 + j) * K;
        int8_t* dst = t + ot * K * 8 + j;
        for (int64_t k = 0; k < K; ++k) {
          const int v = row[k];
          int8_t code = 0;
          if (v != 0) {
            const int a = (v < 0 ? -v : v) - 1;
            if (a < 32) code = static_cast<int8_t>((v < 0 ? 0xA0 : 0x20) | a);
          }
          dst[k * 8] = code;
        }
      }
  });
  return out;
}

// Small-batch Linear on int32 lanes: x (M, K) int32, tiles from gemv_layout, bias (O,) int32 already
// shifted, or an undefined tensor.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& tiles, int64_t O,
                   const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kInt32 && x.is_contiguous(), "bad x");
  const int64_t M = x.size(0), K = x.size(1), OT = (O + 7) / 8;
  TORCH_CHECK(tiles.numel() == OT * K * 8, "bad tiles");
  auto y = torch::empty({M, O}, torch::kInt32);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  const int8_t* tp = tiles.data_ptr<int8_t>();
  const uint32_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dtype() == torch::kInt32 && bias->numel() == O && bias->is_contiguous(), "bad bias");
    bp = reinterpret_cast<const uint32_t*>(bias->data_ptr<int32_t>());
  }
  uint32_t* yp = reinterpret_cast<uint32_t*>(y.data_ptr<int32_t>());
  const bool avx = use_avx2();
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
#ifdef DS_X86
    auto fn = avx ? ds_avx2::gemv_fn(mb) : ds_portable::gemv_fn(mb);
#else
    auto fn = ds_portable::gemv_fn(mb);
#endif
    // Output rows m0.. write y[(m0 + m) * O + o]: pass shifted base pointers.
    const int64_t grain = std::max<int64_t>(16, static_cast<int64_t>(kSerialWork / std::max<int64_t>(1, K * mb)));
    at::parallel_for(0, OT, grain, [&](int64_t b, int64_t e) {
      fn(xp + m0 * K, K, tp, b, e, O, bp, yp + m0 * O);
    });
  }
  (void)avx;
  return y;
}

}  // namespace deepshift_cpu
