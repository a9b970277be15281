// The frozen decoder's native step (decoder.h): Block.forward and CharTransformer.decode's tail, op for op.
#include "decoder.h"

namespace deepshift_cpu {

namespace {

torch::Tensor project(const torch::Tensor& x, const FrozenProjection& p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepshift::frozen_linear", "")
                       .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                                            const c10::optional<torch::Tensor>&, c10::string_view)>();
  return op.call(x, p.codes, p.bias, p.spec);
}

torch::Tensor layer_norm(const torch::Tensor& x, const Norm& n) {
  return at::layer_norm(x, {x.size(-1)}, n.weight, n.bias, n.eps);  // F.layer_norm
}

}  // namespace

std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::vector<torch::Tensor>> Decoder::step(
    torch::Tensor x, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values) const {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1, "the decoder step takes one token, got ",
              x.sizes());
  TORCH_CHECK(keys.size() == blocks.size() && values.size() == blocks.size(), "one key/value cache per block");
  const int64_t dim = x.size(2);
  std::vector<torch::Tensor> new_keys, new_values;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& b = blocks[i];
    // SelfAttention.forward with a cache and one new token: no mask, not causal.
    auto split = [&](const torch::Tensor& t) { return t.view({1, 1, b.heads, dim / b.heads}).transpose(1, 2); };
    auto h = layer_norm(x, b.norm1);
    auto q = split(project(h, b.q));
    auto k = at::cat({keys[i], split(project(h, b.k))}, 2);
    auto v = at::cat({values[i], split(project(h, b.v))}, 2);
    auto y = at::scaled_dot_product_attention(q, k, v);
    x = x + project(y.transpose(1, 2).reshape({1, 1, dim}), b.out);
    x = x + project(at::gelu(project(layer_norm(x, b.norm2), b.fc1)), b.fc2);
    new_keys.push_back(std::move(k));
    new_values.push_back(std::move(v));
  }
  return {project(layer_norm(x, norm), head), std::move(new_keys), std::move(new_values)};
}

}  // namespace deepshift_cpu
