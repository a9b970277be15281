// The instruction set the kernels run: chosen once from the CPU, forced by tests (set_isa).
#include "common.h"

namespace deepshift_cpu {


// 1 = AVX2, 0 = portable; -1 = not decided yet.
int g_isa = -1;

bool use_avx2() {
  if (g_isa < 0) {
#ifdef DS_X86
    __builtin_cpu_init();
    g_isa = __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    g_isa = 0;
#endif
  }
  return g_isa == 1;
}

// Force the instruction set (tests): 1 = AVX2 (if the CPU has it), 0 = portable, -1 = auto.
int64_t set_isa(int64_t isa) {
  g_isa = -1;
  bool has = use_avx2();
  if (isa == 0) g_isa = 0;
  if (isa == 1) g_isa = has ? 1 : 0;
  return g_isa;
}


// Whether a 256-bit vector operation costs as much as two 128-bit ones here: the portable build
// (no AVX: the compiler splits them) and AMD Zen 1 (256-bit operations issue as two halves).
bool splits_256() {
  if (!use_avx2()) return true;
#ifdef DS_X86
  static const bool zen1 = __builtin_cpu_is("znver1");
  return zen1;
#else
  return true;
#endif
}

}  // namespace deepshift_cpu
