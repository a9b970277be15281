// The Python module of the CPU kernels: one binding per kernel the Python side calls, defined in
// conv.cpp, linear.cpp, lut.cpp, elementwise.cpp and isa.cpp (declared in ops.h); the prepared
// frozen-layer forwards and the registration of the frozen ops' C++ kernels (frozen.h), which call
// conv_fused, conv_int_fused and channel_affine themselves; the frozen decoder's step (decoder.h).
#include <torch/extension.h>

#include "decoder.h"
#include "frozen.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &deepshift_cpu::decode);
  m.def("gemv_layout", &deepshift_cpu::gemv_layout);
  m.def("gemv", &deepshift_cpu::gemv);
  m.def("lut_layout", &deepshift_cpu::lut_layout);
  m.def("gemv_lut", &deepshift_cpu::gemv_lut);
  m.def("conv_plan", &deepshift_cpu::conv_plan);
  m.def("conv", &deepshift_cpu::conv);
  m.def("conv_wide", &deepshift_cpu::conv_wide);
  m.def("set_isa", &deepshift_cpu::set_isa);
  m.def("current_isa", &deepshift_cpu::current_isa);
  m.def("quantize", &deepshift_cpu::quantize);
  m.def("scale", &deepshift_cpu::scale);
  m.def("fake_quantize", &deepshift_cpu::fake_quantize);
  m.def("int_epilogue", &deepshift_cpu::int_epilogue);
  m.def("q_round", &deepshift_cpu::q_round);
  m.def("ps_round", &deepshift_cpu::ps_round);

  using deepshift_cpu::PreparedConv;
  using deepshift_cpu::PreparedLinear;
  using OptTensor = c10::optional<torch::Tensor>;
  using Ints = std::vector<int64_t>;
  py::class_<PreparedConv, std::shared_ptr<PreparedConv>>(m, "PreparedConv")
      .def(py::init([](Ints ws, std::vector<torch::Tensor> plan, OptTensor bias, int64_t groups, Ints stride,
                       Ints pad, Ints dil, int64_t frac, int64_t lo, int64_t hi, bool floor_mode, int64_t lanes,
                       int64_t exponent, Ints out_shape, Ints subsample) {
        auto p = std::make_shared<PreparedConv>();
        p->ws = ws, p->plan = plan, p->bias = bias, p->groups = groups, p->stride = stride, p->pad = pad;
        p->dil = dil, p->frac = frac, p->lo = lo, p->hi = hi, p->floor_mode = floor_mode, p->lanes = lanes;
        p->exponent = exponent, p->out_shape = out_shape, p->subsample = subsample;
        return p;
      }))
      .def_readonly("out_shape", &PreparedConv::out_shape)
      .def("run", &PreparedConv::run)
      .def("remember", &PreparedConv::remember);
  py::class_<PreparedLinear, std::shared_ptr<PreparedLinear>>(m, "PreparedLinear")
      .def(py::init([](int64_t mode, OptTensor tiles, OptTensor values, int64_t bits,
                       std::vector<torch::Tensor> plan, OptTensor bias, int64_t out_f, int64_t in_f, int64_t rows,
                       int64_t frac, int64_t lo, int64_t hi, bool floor_mode, int64_t lanes, int64_t exponent,
                       bool out64, Ints out_shape) {
        auto p = std::make_shared<PreparedLinear>();
        p->mode = mode, p->tiles = tiles.value_or(torch::Tensor()), p->values = values.value_or(torch::Tensor());
        p->bits = bits, p->plan = plan, p->bias = bias, p->out_f = out_f, p->in_f = in_f, p->rows = rows;
        p->frac = frac, p->lo = lo, p->hi = hi, p->floor_mode = floor_mode, p->lanes = lanes;
        p->exponent = exponent, p->out64 = out64, p->out_shape = out_shape;
        return p;
      }))
      .def("run", &PreparedLinear::run)
      .def("remember", &PreparedLinear::remember);
  using deepshift_cpu::PreparedIntConv;
  py::class_<PreparedIntConv, std::shared_ptr<PreparedIntConv>>(m, "PreparedIntConv")
      .def(py::init([](Ints ws, std::vector<torch::Tensor> plan, OptTensor bias, int64_t groups, Ints stride,
                       Ints pad, Ints dil, int64_t in_shift, int64_t in_lo, int64_t in_hi, int64_t lanes,
                       Ints out_shape) {
        auto p = std::make_shared<PreparedIntConv>();
        p->ws = ws, p->plan = plan, p->bias = bias, p->groups = groups, p->stride = stride, p->pad = pad;
        p->dil = dil, p->in_shift = in_shift, p->in_lo = in_lo, p->in_hi = in_hi, p->lanes = lanes;
        p->out_shape = out_shape;
        return p;
      }))
      .def_readonly("in_shift", &PreparedIntConv::in_shift)
      .def_readonly("in_lo", &PreparedIntConv::in_lo)
      .def_readonly("in_hi", &PreparedIntConv::in_hi)
      .def_readonly("out_shape", &PreparedIntConv::out_shape)
      .def("run", &PreparedIntConv::run)
      .def("remember", &PreparedIntConv::remember);
  using deepshift_cpu::Decoder;
  using deepshift_cpu::DecoderBlock;
  using deepshift_cpu::FrozenProjection;
  using deepshift_cpu::Norm;
  py::class_<FrozenProjection>(m, "FrozenProjection")
      .def(py::init([](torch::Tensor codes, OptTensor bias, std::string spec) {
        return FrozenProjection{codes, bias, spec};
      }));
  py::class_<Norm>(m, "Norm").def(py::init([](OptTensor weight, OptTensor bias, double eps) {
    return Norm{weight, bias, eps};
  }));
  py::class_<DecoderBlock>(m, "DecoderBlock")
      .def(py::init([](Norm norm1, FrozenProjection q, FrozenProjection k, FrozenProjection v, FrozenProjection out,
                       Norm norm2, FrozenProjection fc1, FrozenProjection fc2, int64_t heads) {
        return DecoderBlock{norm1, norm2, q, k, v, out, fc1, fc2, heads};
      }));
  py::class_<Decoder>(m, "Decoder")
      .def(py::init([](std::vector<DecoderBlock> blocks, Norm norm, FrozenProjection head) {
        return Decoder{blocks, norm, head};
      }))
      .def("step", &Decoder::step);
  m.def("register_kernels", &deepshift_cpu::register_kernels);
  m.def("set_fast_path", &deepshift_cpu::set_fast_path);
  m.def("remembered_count", &deepshift_cpu::remembered_count);
}
