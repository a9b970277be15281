// Declarations of the kernels the Python module binds (bindings.cpp); see each definition for the
// contract.
#pragma once

#include "common.h"

namespace deepshift_cpu {

std::tuple<torch::Tensor, int64_t> decode(const torch::Tensor& codes, int64_t numel, int64_t bits, bool has_zero,
                                          int64_t base, int64_t width);
torch::Tensor gemv_layout(const torch::Tensor& scode);
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& tiles, int64_t O,
                   const c10::optional<torch::Tensor>& bias);
std::vector<torch::Tensor> conv_plan(const torch::Tensor& scode, std::vector<int64_t> xs, int64_t groups,
                                     std::vector<int64_t> stride, std::vector<int64_t> pad,
                                     std::vector<int64_t> dil, int64_t elem_size, int64_t l2_budget,
                                     int64_t max_group);
torch::Tensor conv(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                   const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                   std::vector<int64_t> pad, std::vector<int64_t> dil);
torch::Tensor conv_wide(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                        const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                        std::vector<int64_t> pad, std::vector<int64_t> dil);
std::tuple<torch::Tensor, bool> conv_fused(const torch::Tensor& x, std::vector<int64_t> ws,
                                           const std::vector<torch::Tensor>& plan,
                                           const c10::optional<torch::Tensor>& bias, int64_t groups,
                                           std::vector<int64_t> stride, std::vector<int64_t> pad,
                                           std::vector<int64_t> dil, int64_t frac_bits, int64_t lo, int64_t hi,
                                           bool floor_mode, int64_t lanes, int64_t exponent,
                                           const c10::optional<std::vector<torch::Tensor>>& affine,
                                           const c10::optional<torch::Tensor>& residual, bool relu);
torch::Tensor conv_int_fused(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                             const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                             std::vector<int64_t> pad, std::vector<int64_t> dil, int64_t in_shift, int64_t in_lo,
                             int64_t in_hi, int64_t lanes, const c10::optional<torch::Tensor>& signs,
                             const c10::optional<torch::Tensor>& lefts, const c10::optional<torch::Tensor>& ebias,
                             const c10::optional<torch::Tensor>& rights, int64_t pre,
                             const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                             int64_t hi);
int64_t set_isa(int64_t isa);
int64_t current_isa();
std::tuple<torch::Tensor, torch::Tensor, int64_t> lut_layout(const torch::Tensor& scode);
torch::Tensor gemv_lut(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& values, int64_t bits,
                       int64_t O, const c10::optional<torch::Tensor>& bias, bool wide);
std::tuple<torch::Tensor, bool> quantize(const torch::Tensor& x, int64_t frac_bits, int64_t lo, int64_t hi,
                                         bool floor_mode, bool out64);
torch::Tensor scale(const torch::Tensor& y, int64_t exponent, bool out64);
std::tuple<torch::Tensor, bool> fake_quantize(const torch::Tensor& x, int64_t frac_bits, double lo, double hi,
                                              bool floor_mode, double glo, double ghi);
torch::Tensor channel_affine(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& shift);
torch::Tensor int_epilogue(const torch::Tensor& x, const torch::Tensor& signs, const torch::Tensor& lefts,
                           const c10::optional<torch::Tensor>& bias, const torch::Tensor& rights, int64_t pre,
                           const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                           int64_t hi);
torch::Tensor q_round(const torch::Tensor& w, double lo, double hi, double thr);
torch::Tensor ps_round(const torch::Tensor& shift, const torch::Tensor& sign, double lo, double hi);

}  // namespace deepshift_cpu
