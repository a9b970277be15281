// One token's decoding step of a frozen decoder-only transformer (deepshift/models/transformer.py's
// CharTransformer, its projections frozen shift layers) in one native call: every pre-norm block
// (LayerNorm, the query / key / value projections, the key/value cache, attention, the output
// projection, LayerNorm, the GELU MLP, both residual adds), the final LayerNorm and the head.
//
// Why: at batch 1 a small model's token is call overhead. A 128-wide block step costs ~160 us from
// Python (each module call ~5-10 us) against a few microseconds of arithmetic per layer. The step
// runs the very ATen ops the Python modules run, in the same order on the same shapes, and the
// projections through the deepshift::frozen_linear op (the dispatcher, so its C++ kernel or its
// Python fallback): its outputs equal the Python forward's bit for bit (tests/models/test_decoder.py).
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace deepshift_cpu {

// A frozen ShiftLinear's arguments to deepshift::frozen_linear.
struct FrozenProjection {
  torch::Tensor codes;
  c10::optional<torch::Tensor> bias;
  std::string spec;
};

// An nn.LayerNorm over the last dimension.
struct Norm {
  c10::optional<torch::Tensor> weight, bias;
  double eps;
};

struct DecoderBlock {
  Norm norm1, norm2;
  FrozenProjection q, k, v, out, fc1, fc2;
  int64_t heads;
};

struct Decoder {
  std::vector<DecoderBlock> blocks;
  Norm norm;
  FrozenProjection head;

  // x: (1, 1, dim), the embedded token; keys / values: each block's cache, (1, heads, T, dim / heads).
  // Returns the logits (1, 1, vocab) and each block's cache with this token appended.
  std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::vector<torch::Tensor>> step(
      torch::Tensor x, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values) const;
};

}  // namespace deepshift_cpu
