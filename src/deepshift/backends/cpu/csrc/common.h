// Shared by the CPU kernels' translation units: the geometry and plan records, the two
// instruction-set variants of the kernel templates, and the run-time ISA choice.
//
// Built on first use by deepshift/backends/cpu/build.py (torch.utils.cpp_extension.load); the Python
// side (deepshift/backends/cpu/*.py) registers the kernels as the deepshift::* ops' CPU kernels.
// Semantics: deepshift/ops/reference.py (the bit-exact contract). The kernel templates (kernels.h)
// are compiled twice: ds_portable (baseline x86-64 / any GCC target) and ds_avx2 (under a target
// pragma); the AVX2 one is picked at run time with __builtin_cpu_supports("avx2").
// Parallelism: at::parallel_for (OpenMP, torch's thread count).
#pragma once

#include <torch/types.h>  // ATen and the torch:: names; the Python bindings only in bindings.cpp
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <atomic>
#include <tuple>
#include <cstdint>
#include <cstdlib>
#include <climits>
#include <cstring>
#include <memory>
#include <vector>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DS_X86 1
#endif

// Geometry of one conv call (1d/2d are 3d with size-1 dims). The per-call table of one image's
// zero-padded input is phase-split: padded (d, h, w) sits at
//     d * P + (h % sh) * HPS + (h / sh) * RW + (w % sw) * WPS + w / sw,
// so every kernel offset reads a contiguous run of output columns (phase w % sw of a row holds its
// columns w, w + sw, ...) and output rows oh, oh + 1 of one kernel row sit RW apart. Two orders:
//  * flat (conv_drive's flat mode): [c][Dp][sh phases][sw phases][Hq][Wq]: RW = Wq, so output rows
//    follow one another whatever the stride and a whole plane is one long row;
//  * by rows: [c][Dp][Hp rows][sw phases][Wq] (RW = sh * sw * Wq): the rows one item reads are one
//    contiguous run (fewer cache lines than the flat order's separate phase blocks); for int16
//    tables with rows of more than 8 outputs, Wq is rounded up to 16 elements (make_geom's
//    align_rows), so that rows start 32-byte aligned.
// Each channel's plane of at least 32 elements starts 64-byte aligned (S a multiple of 32 elements,
// the table 64-byte aligned), so column blocks starting at whole vectors (1x1 kernels) never read
// across a cache line; smaller planes (a Linear's few rows as a 1x1 conv, 1x1 feature maps) stay
// packed, where padding each to 64 bytes would multiply the table's cache footprint.
struct Geom {
  int64_t C, D, H, W;
  int64_t pd, ph, pw;
  int64_t sd, sh, sw;
  int64_t Dp, Hp, Hq, Wq;
  int64_t RW, HPS, WPS, P, S;  // strides above; P = sh * sw * Hq * Wq, S >= Dp * P (one channel)
  bool flat;
  int64_t OD, OH, OW;
  int64_t Cout, Cout_g, NCB;  // NCB: channel blocks the term lists are split into
};

// Term lists of one conv plan (see conv_plan): per entry e = (group, channel block, output channel),
// terms[tstart[e] ..] in segments segs[3 k ..] = (term count, amount, flags) for k in
// [sstart[e], sstart[e + 1]). A term word is (table offset << TERM_SHIFT_BITS) | d. A segment is summed
// by Horner's rule term by term, s = (s << d) + x (its first term's d is 0), so that its sum is
// (sum of its +x * 2**(a - amount)) with amount its last term's; the item adds (s << amount) to the
// output's accumulators, negated for flags & SEG_NEG. Each entry has its positive chain (amounts
// descending) then its negative chain; a segment ends where the chain does, where the next drop in
// amount exceeds TERM_MAX_SHIFT, or (narrow sums) where the plan's bound on |s| would pass max_group.
// One amount's terms of one sign, where there are at least PLAIN_MIN_TERMS (PLAIN_MIN_TERMS_1X1 for
// 1x1 kernels), form their own segments with flags & SEG_PLAIN (every d is 0: summed without the
// shifts). Thresholds from runs with 8, 16, 32 and none on ResNet-20 / -50's convs (AMD Zen 4, one
// thread): 3x3 convs ran fastest with 8 (5-13% faster than loops per amount and sign); 1x1 convs on
// 14x14 and 7x7 planes 7-10% faster with 32 (as with none), on 28x28 (512 -> 128) 5% slower with 8
// and 10% with 32, which is kept for the many more 1x1 convs it helps. Horner segments with flags &
// SEG_PAIRS (1x1 kernels, int16 / int32 tables: conv.cpp's pad_pairs) have an even count, and only
// their terms at even positions have d > 0: they are summed two terms per shift.
constexpr int TERM_SHIFT_BITS = 3, TERM_MAX_SHIFT = 7;
constexpr int32_t SEG_NEG = 1, SEG_PLAIN = 2, SEG_PAIRS = 4;
constexpr int64_t PLAIN_MIN_TERMS = 8, PLAIN_MIN_TERMS_1X1 = 32;

struct PlanView {
  const int32_t* terms;
  const int64_t* tstart;
  const int64_t* sstart;
  const int32_t* segs;
};


// The fused frozen-layer path (conv_fused): the table is built straight from the float
// input, each value the layer's fixed-point integer q = clamp(round(x * 2**F), lo, hi), exactly as the
// frozen modules' float64 path (and `quantize`) computes it: x * 2**F is exact in double, and so are
// rounding and clamping. f32_exact: lo and hi are exact in float32 (|lo|, |hi| <= 2**24), so that for
// float32 input the float32 vector path gives the same integers (x * 2**F is exact in float32 too,
// or overflows to +-inf, which clamps to lo / hi like the huge double does).
struct QuantSpec {
  double scale, lo, hi;
  bool floor_mode, f32_exact;
};

// The frozen layers' output scaling by 2**e, out = FO(double(int32(y)) * 2**e) (int64 for 64-bit
// lanes), the reference's (y.to(float64) * 2**e).to(FO); computed once per call (std::ldexp per
// output row cost more than the rows of 7 and 14 outputs it scaled). For int32 y and float32 output
// with -126 <= e <= 96 (`single`) the same value is float(v) * 2**e in float32: float(v) rounds v
// to 24 bits and the product scales it exactly (a normal float for every non-zero int32 v).
struct OutScale {
  double s;
  float sf;
  bool single;
  explicit OutScale(int e)
      : s(std::ldexp(1.0, e)), sf(std::ldexp(1.0f, std::clamp(e, -126, 96))),
        single(e >= -126 && e <= 96) {}
};

namespace ds_portable {
#include "epilogue_lanes.h"
#include "kernels.h"
}  // namespace ds_portable

#ifdef DS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
#define DS_AVX2_TU 1
namespace ds_avx2 {
#include "epilogue_lanes.h"
#include "kernels.h"
}  // namespace ds_avx2
#undef DS_AVX2_TU
#pragma GCC pop_options
#endif

namespace deepshift_cpu {

// Below this many vector operations (~25 us of work) a call runs on one thread: starting and joining
// an OpenMP parallel region costs more than it saves on less work than that.
constexpr double kSerialWork = 5e4;

bool use_avx2();
bool use_avx512();
int64_t set_isa(int64_t isa);
bool splits_256();

}  // namespace deepshift_cpu
