// A frozen layer's prepared forward (what deepshift/backends/cpu/conv.py and linear.py derive once per
// layer and input signature: the kernel's plan or tiles, the shifted bias, the fixed-point format) and
// the C++ kernels of the deepshift::frozen_conv / frozen_linear ops that run it, and of the element-wise
// ops that frozen and integer-only models run after each layer, channel_affine and int_epilogue
// (frozen.cpp).
//
// Why the op kernels are in C++: at batch 1 a layer's kernel takes tens of microseconds, and a
// Python kernel behind torch.library costs ~8 us a call on top (boxing the arguments into Python,
// the cache lookup, the binding call back into C++). The C++ kernel finds the prepared forward in
// its own table and runs it without entering Python; anything it does not find (the first call, a
// changed weight, options the fused path does not take, a NaN to report) goes to the Python kernel,
// which prepares, remembers and runs it, or hands the call to the reference.
#pragma once

#include <torch/extension.h>  // pybind11 (the Python fallbacks)

#include "common.h"

namespace deepshift_cpu {

// Results of run(): y (undefined: the prepared path declines this input, the caller takes the
// reference) and whether the input has a NaN (y is then undefined and the caller raises).
using RunResult = std::tuple<torch::Tensor, bool>;

struct PreparedConv : std::enable_shared_from_this<PreparedConv> {
  std::vector<int64_t> ws;  // the kernel's 5-d weight shape
  std::vector<torch::Tensor> plan;
  c10::optional<torch::Tensor> bias;  // int32, in output units
  int64_t groups;
  std::vector<int64_t> stride, pad, dil;  // 3-d
  int64_t frac, lo, hi;
  bool floor_mode;
  int64_t lanes, exponent;
  std::vector<int64_t> out_shape;
  // A strided 1x1 conv without padding reads every stride-th input only: run() takes those (x's
  // spatial dims sliced by these steps, then made contiguous) and the plan is the stride-1 conv's.
  // Empty: x as it is.
  std::vector<int64_t> subsample;

  // conv_fused on x (and the optional BatchNorm affine, residual and ReLU).
  RunResult run(const torch::Tensor& x, const c10::optional<std::vector<torch::Tensor>>& affine,
                const c10::optional<torch::Tensor>& residual, bool relu) const;
  // Let the op's C++ kernel find this forward for calls with these codes, bias, spec and x's shape
  // and dtype (until the codes or bias change, or the Python cache lets go of this object).
  void remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                const std::string& spec, const torch::Tensor& x);
};

struct PreparedLinear : std::enable_shared_from_this<PreparedLinear> {
  // kLut / kWide: quantize, gemv_lut (narrow int32 / wide int64), scale; kGemv: quantize, gemv,
  // scale; kConv: the fused 1x1 convolution over the rows.
  enum Mode : int64_t { kLut = 0, kWide = 1, kGemv = 2, kConv = 3 };
  int64_t mode;
  torch::Tensor tiles, values;  // kLut / kWide: lut_layout's; kGemv: gemv_layout's tiles
  int64_t bits;
  std::vector<torch::Tensor> plan;  // kConv
  c10::optional<torch::Tensor> bias;
  int64_t out_f, in_f, rows;
  int64_t frac, lo, hi;
  bool floor_mode;
  int64_t lanes, exponent;
  bool out64;
  std::vector<int64_t> out_shape;

  RunResult run(const torch::Tensor& x) const;
  void remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                const std::string& spec, const torch::Tensor& x);
};

// An integer-only conv layer's prepared call (deepshift::int_conv, int32 accumulators): conv_int_fused
// with the plan, the int32 bias in output units and the requantisation it was prepared for.
struct PreparedIntConv : std::enable_shared_from_this<PreparedIntConv> {
  std::vector<int64_t> ws;
  std::vector<torch::Tensor> plan;
  c10::optional<torch::Tensor> bias;
  int64_t groups;
  std::vector<int64_t> stride, pad, dil;
  int64_t in_shift, in_lo, in_hi, lanes;
  std::vector<int64_t> out_shape;

  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& signs,
                    const c10::optional<torch::Tensor>& lefts, const c10::optional<torch::Tensor>& ebias,
                    const c10::optional<torch::Tensor>& rights, int64_t pre,
                    const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                    int64_t hi) const;
  void remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                const std::string& spec, const torch::Tensor& x);
};

// Registers the C++ kernels of deepshift::frozen_conv / frozen_linear / channel_affine / int_epilogue /
// int_conv for CPU (once per process); ``fallbacks`` maps each op's name to the Python callable
// (taking the op's arguments) that gets whatever its C++ kernel does not take (not prepared, other
// dtypes, errors to raise).
void register_kernels(pybind11::dict fallbacks);

// Whether the op kernels run the forwards they find (false: every call goes to the Python kernel).
void set_fast_path(bool on);

// Prepared forwards the op kernels can find (the entries whose object is still alive): tests.
int64_t remembered_count();

}  // namespace deepshift_cpu
