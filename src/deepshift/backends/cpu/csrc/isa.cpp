// The instruction set the kernels run: chosen once from the CPU, forced by tests (set_isa).
#include "common.h"

namespace deepshift_cpu {


// 2 = AVX-512 (F, BW, VL: the table-lookup kernels; the rest run their AVX2 code), 1 = AVX2,
// 0 = portable; -1 = not decided yet.
int g_isa = -1;

namespace {
int best_isa() {
#ifdef DS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return 2;
  return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
  return 0;
#endif
}
}  // namespace

// The path in use (2, 1 or 0), for the Python side's choice between kernels with different layouts.
int64_t current_isa() {
  if (g_isa < 0) g_isa = best_isa();
  return g_isa;
}

bool use_avx2() { return current_isa() >= 1; }

bool use_avx512() { return current_isa() == 2; }

// Force the instruction set (tests): 2 = AVX-512, 1 = AVX2, 0 = portable, -1 = auto. A path the CPU
// lacks falls back to the best one below it; returns the path taken.
int64_t set_isa(int64_t isa) {
  const int best = best_isa();
  g_isa = (isa < 0 || isa > best) ? best : static_cast<int>(isa);
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
