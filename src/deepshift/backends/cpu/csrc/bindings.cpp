// The Python module of the CPU kernels: one binding per kernel, defined in conv.cpp, linear.cpp,
// lut.cpp, elementwise.cpp and isa.cpp (declared in ops.h).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &deepshift_cpu::decode);
  m.def("gemv_layout", &deepshift_cpu::gemv_layout);
  m.def("gemv", &deepshift_cpu::gemv);
  m.def("lut_layout", &deepshift_cpu::lut_layout);
  m.def("gemv_lut", &deepshift_cpu::gemv_lut);
  m.def("conv_plan", &deepshift_cpu::conv_plan);
  m.def("conv", &deepshift_cpu::conv);
  m.def("conv_fused", &deepshift_cpu::conv_fused);
  m.def("set_isa", &deepshift_cpu::set_isa);
  m.def("current_isa", &deepshift_cpu::current_isa);
  m.def("quantize", &deepshift_cpu::quantize);
  m.def("scale", &deepshift_cpu::scale);
  m.def("fake_quantize", &deepshift_cpu::fake_quantize);
  m.def("channel_affine", &deepshift_cpu::channel_affine);
  m.def("int_epilogue", &deepshift_cpu::int_epilogue);
  m.def("q_round", &deepshift_cpu::q_round);
  m.def("ps_round", &deepshift_cpu::ps_round);
}
