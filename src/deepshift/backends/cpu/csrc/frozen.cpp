// The prepared frozen-layer forwards and the C++ kernels of deepshift::frozen_conv / frozen_linear /
// channel_affine / int_epilogue / int_conv (see frozen.h for why they are C++).
#include "frozen.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string_view>
#include <unordered_map>

#include "ops.h"

namespace py = pybind11;

namespace deepshift_cpu {

RunResult PreparedConv::run(const torch::Tensor& x, const c10::optional<std::vector<torch::Tensor>>& affine,
                            const c10::optional<torch::Tensor>& residual, bool relu) const {
  torch::Tensor xs = x;
  for (size_t i = 0; i < subsample.size(); ++i)
    xs = xs.slice(2 + static_cast<int64_t>(i), 0, c10::nullopt, subsample[i]);
  auto [y, has_nan] = conv_fused(xs.contiguous(), ws, plan, bias, groups, stride, pad, dil, frac, lo, hi,
                                 floor_mode, lanes, exponent, affine, residual, relu);
  return {has_nan ? torch::Tensor() : y, has_nan};
}

RunResult PreparedLinear::run(const torch::Tensor& x) const {
  if (mode == kConv) {
    auto xt = x.reshape({rows, in_f}).t().contiguous().reshape({1, in_f, 1, 1, rows});
    auto [y, has_nan] = conv_fused(xt, {out_f, in_f, 1, 1, 1}, plan, bias, 1, {1, 1, 1}, {0, 0, 0}, {1, 1, 1},
                                   frac, lo, hi, floor_mode, lanes, exponent, c10::nullopt, c10::nullopt, false);
    if (has_nan) return {torch::Tensor(), true};
    return {y.reshape({out_f, rows}).t().contiguous().reshape(out_shape), false};
  }
  auto [q, has_nan] = quantize(x.reshape({rows, in_f}), frac, lo, hi, floor_mode, false);
  if (has_nan) return {torch::Tensor(), true};
  auto y = mode == kGemv ? gemv(q, tiles, out_f, bias) : gemv_lut(q, tiles, values, bits, out_f, bias, mode == kWide);
  if (!y.defined()) return {torch::Tensor(), false};  // the wide kernel declines this input
  return {scale(y, exponent, out64).reshape(out_shape), false};
}

torch::Tensor PreparedIntConv::run(const torch::Tensor& x, const c10::optional<torch::Tensor>& signs,
                                   const c10::optional<torch::Tensor>& lefts, const c10::optional<torch::Tensor>& ebias,
                                   const c10::optional<torch::Tensor>& rights, int64_t pre,
                                   const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                                   int64_t hi) const {
  auto contiguous = [](const c10::optional<torch::Tensor>& t) -> c10::optional<torch::Tensor> {
    if (t.has_value() && t->defined()) return t->contiguous();
    return c10::nullopt;
  };
  return conv_int_fused(x.contiguous(), ws, plan, bias, groups, stride, pad, dil, in_shift, in_lo, in_hi, lanes,
                        contiguous(signs), contiguous(lefts), contiguous(ebias), contiguous(rights), pre,
                        contiguous(residual), residual_shift, lo, hi);
}

namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

uint32_t version_of(const torch::Tensor& t) {
  return t.unsafeGetTensorImpl()->version_counter().current_version();
}

bool has(const c10::optional<torch::Tensor>& t) { return t.has_value() && t->defined(); }

// One remembered forward: valid while the codes and bias are the very tensors it was prepared for,
// unchanged (version counters: every in-place write, load_state_dict included, bumps them).
template <class P>
struct Entry {
  WeakImpl codes;  // a weak reference keeps the TensorImpl's address from being reused meanwhile
  uint32_t codes_version;
  c10::optional<WeakImpl> bias;
  uint32_t bias_version;
  std::string spec;
  std::vector<int64_t> sizes;
  c10::ScalarType dtype;
  std::weak_ptr<P> prepared;  // owned by the Python cache, which lets go with the codes tensor

  bool same_call(std::string_view s, const torch::Tensor& x) const {
    return dtype == x.scalar_type() && x.sizes() == c10::IntArrayRef(sizes) && spec == s;
  }
};

// Prepared forwards by codes tensor, then by (spec, input shape and dtype): a handful per layer.
template <class P>
class Table {
 public:
  std::shared_ptr<P> find(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias, std::string_view spec,
                          const torch::Tensor& x) {
    if (codes.is_inference() || (has(bias) && bias->is_inference())) return nullptr;  // no version counter
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(codes.unsafeGetTensorImpl());
    if (it == map_.end()) return nullptr;
    for (const auto& e : it->second) {
      if (!e.same_call(spec, x)) continue;
      if (e.codes_version != version_of(codes)) return nullptr;
      if (has(bias) ? !(e.bias && e.bias->_unsafe_get_target() == bias->unsafeGetTensorImpl() &&
                        e.bias_version == version_of(*bias))
                    : e.bias.has_value())
        return nullptr;
      return e.prepared.lock();
    }
    return nullptr;
  }

  void put(std::shared_ptr<P> p, const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias,
           const std::string& spec, const torch::Tensor& x) {
    if (codes.is_inference() || (has(bias) && bias->is_inference())) return;
    Entry<P> e{WeakImpl(codes.getIntrusivePtr()), version_of(codes), c10::nullopt, 0, spec, x.sizes().vec(),
               x.scalar_type(), p};
    if (has(bias)) {
      e.bias = WeakImpl(bias->getIntrusivePtr());
      e.bias_version = version_of(*bias);
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto& list = map_[codes.unsafeGetTensorImpl()];
    for (auto& old : list)
      if (old.same_call(spec, x)) {
        old = std::move(e);
        return;
      }
    list.push_back(std::move(e));
    if (++count_ >= sweep_at_) sweep();
  }

  int64_t alive() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const auto& [_, list] : map_)
      for (const auto& e : list) n += !e.prepared.expired();
    return n;
  }

 private:
  // Drops the entries whose forward the Python cache has let go of (a freed model's); run when the
  // table has doubled since the last sweep, so that its size stays proportional to the live ones.
  void sweep() {
    count_ = 0;
    for (auto it = map_.begin(); it != map_.end();) {
      auto& list = it->second;
      list.erase(std::remove_if(list.begin(), list.end(), [](const Entry<P>& e) { return e.prepared.expired(); }),
                 list.end());
      count_ += list.size();
      it = list.empty() ? map_.erase(it) : std::next(it);
    }
    sweep_at_ = std::max<size_t>(256, 2 * count_);
  }

  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, std::vector<Entry<P>>> map_;
  size_t count_ = 0, sweep_at_ = 256;
};

// One table per kind of prepared call.
template <class P>
Table<P>& table_of() {
  static auto* t = new Table<P>();  // never destroyed: kernels may run during exit
  return *t;
}

// What the C++ kernels hand the calls they do not take to (register.py's NATIVE_KERNELS: the Python
// kernels of the frozen and integer conv ops, the references of the element-wise ones); leaked on
// purpose, as the interpreter may be gone when static destructors run.
py::object* conv_fallback = nullptr;
py::object* linear_fallback = nullptr;
py::object* affine_fallback = nullptr;
py::object* epilogue_fallback = nullptr;
py::object* int_conv_fallback = nullptr;

std::atomic<bool> fast_path_on{true};

// set_fast_path(false), or DEEPSHIFT_NO_NATIVE (read per call like the Python side does): every call
// goes to the Python kernel, which then takes the op path or the reference.
bool native_off() {
  const char* v = std::getenv("DEEPSHIFT_NO_NATIVE");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

bool fast_path_off() { return !fast_path_on.load(std::memory_order_relaxed) || native_off(); }

template <class... Args>
torch::Tensor call_python(const py::object* f, Args&&... args) {
  py::gil_scoped_acquire gil;
  return (*f)(std::forward<Args>(args)...).template cast<torch::Tensor>();
}

// A (Cout,) vector the fused kernel takes as the BatchNorm scale or shift.
bool channel_vector_ok(const c10::optional<torch::Tensor>& t, const torch::Tensor& x, int64_t channels) {
  return has(t) && t->scalar_type() == x.scalar_type() && t->device().is_cpu() && t->is_contiguous() &&
         t->dim() == 1 && t->size(0) == channels;
}

torch::Tensor frozen_conv_kernel(const torch::Tensor& x, const torch::Tensor& codes,
                                 const c10::optional<torch::Tensor>& bias, c10::string_view spec,
                                 const c10::optional<torch::Tensor>& bn_scale,
                                 const c10::optional<torch::Tensor>& bn_shift,
                                 const c10::optional<torch::Tensor>& residual, bool relu) {
  std::string_view s(spec.data(), spec.size());
  if (!fast_path_off()) {
    if (auto p = table_of<PreparedConv>().find(codes, bias, s, x)) {
      const int64_t channels = p->out_shape[1];
      const bool affine_ok = !has(bn_scale) || (channel_vector_ok(bn_scale, x, channels) &&
                                                 channel_vector_ok(bn_shift, x, channels));
      const bool residual_ok = !has(residual) ||
                               (residual->scalar_type() == x.scalar_type() && residual->device().is_cpu() &&
                                residual->is_contiguous() && residual->sizes() == c10::IntArrayRef(p->out_shape));
      if (affine_ok && residual_ok) {
        c10::optional<std::vector<torch::Tensor>> affine;
        if (has(bn_scale)) affine = std::vector<torch::Tensor>{*bn_scale, *bn_shift};
        auto [y, has_nan] = p->run(x, affine, has(residual) ? residual : c10::optional<torch::Tensor>(), relu);
        if (!has_nan) return y;  // a NaN: the Python kernel raises the error
      }
    }
  }
  return call_python(conv_fallback, x, codes, bias, std::string(s), bn_scale, bn_shift, residual, relu);
}

torch::Tensor frozen_linear_kernel(const torch::Tensor& x, const torch::Tensor& codes,
                                   const c10::optional<torch::Tensor>& bias, c10::string_view spec) {
  std::string_view s(spec.data(), spec.size());
  if (!fast_path_off()) {
    if (auto p = table_of<PreparedLinear>().find(codes, bias, s, x)) {
      auto [y, has_nan] = p->run(x);
      if (y.defined()) return y;
    }
  }
  return call_python(linear_fallback, x, codes, bias, std::string(s));
}

// FrozenBatchNorm's forward (the unfused frozen models run one after each conv).
torch::Tensor channel_affine_kernel(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& shift) {
  const auto dtype = x.scalar_type();
  if (!native_off() && (dtype == torch::kFloat32 || dtype == torch::kFloat64) && x.dim() >= 2 &&
      scale.scalar_type() == dtype && shift.scalar_type() == dtype && scale.device().is_cpu() &&
      shift.device().is_cpu() && scale.numel() == x.size(1) && shift.numel() == x.size(1))
    return channel_affine(x.contiguous(), scale.contiguous(), shift.contiguous());
  return call_python(affine_fallback, x, scale, shift);  // the reference: other dtypes, its errors
}

// Whether the native int_epilogue pass takes these arguments for an int32 / int64 tensor (dtype) of
// shape out_shape (_int_epilogue_args_ok in conv.py); anything else goes to the reference.
bool int_epilogue_args_ok(c10::IntArrayRef out_shape, c10::ScalarType dtype, const torch::Tensor& signs,
                          const torch::Tensor& lefts, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& rights, int64_t pre, const c10::optional<torch::Tensor>& residual,
                          int64_t residual_shift) {
  const auto i64 = torch::kInt64;
  return signs.scalar_type() == i64 && lefts.scalar_type() == i64 && rights.scalar_type() == i64 &&
         signs.dim() == 2 && lefts.sizes() == signs.sizes() && rights.numel() == signs.size(1) &&
         (!has(bias) || (bias->scalar_type() == i64 && bias->numel() == signs.size(1))) &&
         (dtype == i64 || dtype == torch::kInt32) &&
         (!has(residual) || (residual->scalar_type() == dtype && residual->sizes() == out_shape)) &&
         (signs.size(1) == 1 || (out_shape.size() >= 2 && out_shape[1] == signs.size(1))) && pre >= 0 && pre < 63 &&
         residual_shift >= 0 && residual_shift < 63 && signs.device().is_cpu() && lefts.device().is_cpu() &&
         rights.device().is_cpu();
}

// The integer-only models' BatchNorm / requantisation step (two or three per shift layer).
torch::Tensor int_epilogue_kernel(const torch::Tensor& x, const torch::Tensor& signs, const torch::Tensor& lefts,
                                  const c10::optional<torch::Tensor>& bias, const torch::Tensor& rights, int64_t pre,
                                  const c10::optional<torch::Tensor>& residual, int64_t residual_shift,
                                  c10::optional<int64_t> lo, c10::optional<int64_t> hi) {
  if (native_off() ||
      !int_epilogue_args_ok(x.sizes(), x.scalar_type(), signs, lefts, bias, rights, pre, residual, residual_shift))
    return call_python(epilogue_fallback, x, signs, lefts, bias, rights, pre, residual, residual_shift, lo, hi);
  c10::optional<torch::Tensor> b, r;
  if (has(bias)) b = bias->contiguous();
  if (has(residual)) r = residual->contiguous();
  return int_epilogue(x.contiguous(), signs.contiguous(), lefts.contiguous(), b, rights.contiguous(), pre, r,
                      residual_shift, lo.value_or(INT64_MIN), hi.value_or(INT64_MAX));
}

torch::Tensor int_conv_kernel(const torch::Tensor& x, const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias,
                              c10::string_view spec, int64_t in_shift, int64_t in_lo, int64_t in_hi,
                              const c10::optional<torch::Tensor>& signs, const c10::optional<torch::Tensor>& lefts,
                              const c10::optional<torch::Tensor>& ebias, const c10::optional<torch::Tensor>& rights,
                              int64_t pre, const c10::optional<torch::Tensor>& residual, int64_t residual_shift,
                              c10::optional<int64_t> lo, c10::optional<int64_t> hi) {
  std::string_view s(spec.data(), spec.size());
  if (!fast_path_off() && (x.scalar_type() == torch::kInt64 || x.scalar_type() == torch::kInt32)) {
    if (auto p = table_of<PreparedIntConv>().find(codes, bias, s, x)) {
      const bool same = p->in_shift == in_shift && p->in_lo == in_lo && p->in_hi == in_hi;
      const bool ok = has(signs) ? (has(lefts) && has(rights) &&
                                    int_epilogue_args_ok(p->out_shape, x.scalar_type(), *signs, *lefts, ebias, *rights, pre,
                                                         residual, residual_shift))
                                 : !has(residual);
      if (same && ok)
        return p->run(x, signs, lefts, ebias, rights, pre, residual, residual_shift, lo.value_or(INT64_MIN),
                      hi.value_or(INT64_MAX));
    }
  }
  return call_python(int_conv_fallback, x, codes, bias, std::string(s), in_shift, in_lo, in_hi, signs, lefts, ebias,
                     rights, pre, residual, residual_shift, lo, hi);
}

}  // namespace

void PreparedIntConv::remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                               const std::string& spec, const torch::Tensor& x) {
  table_of<PreparedIntConv>().put(shared_from_this(), codes, bias_arg, spec, x);
}

void PreparedConv::remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                            const std::string& spec, const torch::Tensor& x) {
  table_of<PreparedConv>().put(shared_from_this(), codes, bias_arg, spec, x);
}

void PreparedLinear::remember(const torch::Tensor& codes, const c10::optional<torch::Tensor>& bias_arg,
                              const std::string& spec, const torch::Tensor& x) {
  table_of<PreparedLinear>().put(shared_from_this(), codes, bias_arg, spec, x);
}

void register_kernels(py::dict fallbacks) {
  static std::once_flag once;
  std::call_once(once, [&] {
    auto fallback = [&](const char* op) { return new py::object(fallbacks[op]); };  // KeyError if absent
    conv_fallback = fallback("frozen_conv");
    linear_fallback = fallback("frozen_linear");
    affine_fallback = fallback("channel_affine");
    epilogue_fallback = fallback("int_epilogue");
    int_conv_fallback = fallback("int_conv");
    // Never destroyed: the registrations last as long as the process (the ops are defined in Python
    // at import, this library is loaded once).
    auto* lib = new torch::Library(torch::Library::IMPL, "deepshift", c10::DispatchKey::CPU, __FILE__, __LINE__);
    lib->impl("frozen_conv", TORCH_FN(frozen_conv_kernel));
    lib->impl("frozen_linear", TORCH_FN(frozen_linear_kernel));
    lib->impl("channel_affine", TORCH_FN(channel_affine_kernel));
    lib->impl("int_epilogue", TORCH_FN(int_epilogue_kernel));
    lib->impl("int_conv", TORCH_FN(int_conv_kernel));
  });
}

void set_fast_path(bool on) { fast_path_on.store(on); }

int64_t remembered_count() {
  return table_of<PreparedConv>().alive() + table_of<PreparedLinear>().alive() + table_of<PreparedIntConv>().alive();
}

}  // namespace deepshift_cpu
