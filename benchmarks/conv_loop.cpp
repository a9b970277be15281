// The convolution kernel's inner loop with its table resident in L1: what one 16-lane term (a load
// of 16 table values and an add, plus a shift in Horner runs) costs on this CPU, i.e. the loop's
// floor for a convolution; also its int32-table form (16-bit activations, int64 accumulators: two
// 8-lane loads per 16 columns). Standalone (no torch):
//
//   g++ -O3 -march=native -o /tmp/conv_loop benchmarks/conv_loop.cpp && /tmp/conv_loop
//
// The loop is conv_item_n's (src/deepshift/backends/cpu/csrc/kernels.h) for one row of 4 vectors
// over an output's term list in segments (common.h): a plain segment sums one shift amount's terms
// (s += x), a Horner segment runs s = (s << d) + x with the amount's drop d in each term's low bits;
// at a segment's end s is sign-extended into the accumulators, shifted by its amount and added or
// subtracted. Two term lists:
//  * "3x3, 36 per amount": 16 amounts x 36 terms (576, a 64-channel 3x3 kernel; half positive): all
//    plain segments, the loop's floor.
//  * "1x1, few per amount": 4096 outputs' lists of 146 terms (a 1x1 conv's channel block) over 9
//    amounts, counts 1-30 per amount and sign, as in ResNet-50's 14x14 convs: run as segments
//    (plain where an amount has >= 32 terms, as the plan does for 1x1 kernels), as segments summed
//    two terms per shift (the plan's SEG_PAIRS form for 1x1 kernels: zero terms, reading a zero
//    plane, where a shift would fall on a segment's odd position or its count is odd), and as the
//    earlier loops per amount and sign (one loop exit per amount and sign, mispredicted where the
//    counts vary: the cost that segments remove).
// Term offsets: the 3x3 list's are a 3x3 kernel's over 8 channels of 3 padded rows (then again: the
// table stays in L1), so most loads are unaligned, as in the kernel; the 1x1 lists read 24 channel
// planes 64-byte aligned, as a 1x1 kernel does, whose loads never cross a cache line. Both for AVX2's
// 16-lane vectors (4 per row) and, where built with AVX-512, 32-lane vectors (2 per row, the same 64
// columns). On AMD EPYCs with AVX-512 (512-bit operations issued as two 256-bit halves) the 32-lane
// loop cost as much as the 16-lane one or more, so the kernel keeps 16-lane items there. Measured on
// an AMD EPYC (family 25 model 17), ns per 16-column weight term (zero terms not counted as terms):
// int16 table 0.24 (3x3); 1x1 lists 0.30 as segments, 0.24 two terms per shift (6% zero terms),
// 0.38 as loops per amount; int32 table 0.46; 0.56, 0.44, 0.72. With aligned loads a shift per term
// had cost the loop 1.3x a plain one's time per term, whatever the shift's form (vpsllw with its
// count moved from a register or loaded, AVX-512's per-lane vpsllvw; a second chain of sums for odd
// terms did not help either: the shifts' throughput, not their latency); with unaligned loads (3x3)
// the loads are the limit, and two terms per shift gain nothing. With 128 outputs instead of 4096 the
// loops per amount ran at 0.25: the branch predictor had learned their exits, which it cannot over
// a real layer's lists.
// Last, the same CPU's float32 FMA peak, per 16 multiply-adds (0.27 ns there: two 8-lane FMAs per
// cycle), which bounds what an fp32 engine (torch, onnxruntime) can reach: the shift loop's 16 adds
// cost 0.24 ns, only 1.15x faster than that peak, so a shift conv wins only where it keeps its loop
// about as busy as a good fp32 GEMM keeps its FMAs.
#include <immintrin.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int SHIFT_BITS = 3;
struct Seg {
  int32_t count, amount, flags;  // flags: 1 negative, 2 plain
};

// Term lists of several outputs: terms (offset << SHIFT_BITS | d), segments, per output its first
// segment; and the same terms as groups (count positive, count negative) per amount for the old loop.
struct Lists {
  std::vector<int32_t> terms, seg_start{0}, group_start{0};
  std::vector<Seg> segs;
  std::vector<int32_t> group_terms, groups;  // groups: (shift before, positive count, negative count)
};

// Adds one output: counts[a][sign] terms at amount a (amounts descending), offsets from off(i).
// Two terms per shift (conv.cpp's pad_pairs): in each Horner segment of one output (segments from
// seg0, terms from t0) a zero term (`pad`) goes before each term with a shift at an odd position,
// and after an odd count; the segment gets flag 4.
void pad_pairs(Lists& L, size_t seg0, size_t t0, int32_t pad) {
  std::vector<int32_t> old(L.terms.begin() + static_cast<std::ptrdiff_t>(t0), L.terms.end());
  L.terms.resize(t0);
  size_t i = 0;
  for (size_t k = seg0; k < L.segs.size(); ++k) {
    Seg& sg = L.segs[k];
    const size_t start = L.terms.size();
    for (int j = 0; j < sg.count; ++j, ++i) {
      if (!(sg.flags & 2) && (old[i] & 7) && (L.terms.size() - start) % 2) L.terms.push_back(pad);
      L.terms.push_back(old[i]);
    }
    if (sg.flags & 2) continue;
    if ((L.terms.size() - start) % 2) L.terms.push_back(pad);
    sg.count = static_cast<int32_t>(L.terms.size() - start);
    sg.flags |= 4;
  }
}

template <typename Off>
void add_output(Lists& L, const std::vector<std::array<int, 2>>& counts, int plain_min, int64_t max_group,
                Off off, int32_t pad = -1) {
  const size_t seg0 = L.segs.size(), t0 = L.terms.size();
  // Term j of amount a and sign s reads off((a * 2 + s) * 1024 + j) in both forms.
  for (int sign = 0; sign < 2; ++sign) {
    int64_t bound = 0;
    int n = 0, prev = -1, prev_flags = -1;
    auto close = [&]() {
      if (n) L.segs.push_back({n, prev, prev_flags});
      n = 0;
    };
    for (int a = static_cast<int>(counts.size()) - 1; a >= 0; --a)
      for (int j = 0; j < counts[a][sign]; ++j) {
        const int flags = sign | (counts[a][sign] >= plain_min ? 2 : 0);
        const int d = prev - a;
        if (flags != prev_flags || ((flags & 2) && d > 0) || d > 7 || (bound << d) + 1 > max_group) close();
        L.terms.push_back(off((a * 2 + sign) * 1024 + j) << SHIFT_BITS | (n ? d : 0));
        bound = n ? (bound << d) + 1 : 1;
        ++n;
        prev = a;
        prev_flags = flags;
      }
    close();
  }
  if (pad >= 0) pad_pairs(L, seg0, t0, pad << SHIFT_BITS);
  L.seg_start.push_back(static_cast<int32_t>(L.segs.size()));
  int64_t bound = 0;
  for (int a = static_cast<int>(counts.size()) - 1; a >= 0; --a) {
    const int d = a + 1 < static_cast<int>(counts.size()) ? 1 : 0, n = counts[a][0] + counts[a][1];
    const bool fold = (bound << d) + n > max_group;  // as the earlier plan's GROUP_FOLD
    bound = fold ? n : (bound << d) + n;
    L.groups.insert(L.groups.end(), {d | (fold ? 256 : 0), counts[a][0], counts[a][1]});
    for (int sign = 0; sign < 2; ++sign)
      for (int j = 0; j < counts[a][sign]; ++j) L.group_terms.push_back(off((a * 2 + sign) * 1024 + j));
  }
  L.group_start.push_back(static_cast<int32_t>(L.groups.size() / 3));
}

// The loops' vector types: W lanes of T (the sums; VU unsigned, for the shift), accumulators of A in
// 256-bit vectors (K lanes, NA per sum vector; PT: K lanes of T, the slice widened into one).
template <typename T, typename A, int W>
struct Types {
  typedef T VS __attribute__((vector_size(sizeof(T) * W), aligned(sizeof(T)), may_alias));
  typedef std::make_unsigned_t<T> VU __attribute__((vector_size(sizeof(T) * W)));
  static constexpr int K = 32 / sizeof(A), NA = W / K;
  typedef T PT __attribute__((vector_size(sizeof(T) * K)));
  typedef A VA __attribute__((vector_size(32)));
};

// out[0 .. n K) += the n accumulator vectors (the item's output read-modify-write).
template <int K, typename A, typename VA>
void add_out(A* out, const VA* acc, int n) {
  for (int v = 0; v < n; ++v) {
    VA prev;
    __builtin_memcpy(&prev, out + v * K, 32);
    prev += acc[v];
    __builtin_memcpy(out + v * K, &prev, 32);
  }
}

// The two loops over outputs [0, n) for one row of V vectors of W lanes of T, accumulators A.
template <typename T, typename A, int V, int W>
struct Items {
  using Ty = Types<T, A, W>;
  using VS = typename Ty::VS;
  using VU = typename Ty::VU;
  using PT = typename Ty::PT;
  using VA = typename Ty::VA;
  static constexpr int K = Ty::K, NA = Ty::NA;

  // conv_item_n's loop.
  __attribute__((noinline)) static void segments(const T* tbl, const Lists& L, int n, A* out) {
    const int32_t* t = L.terms.data();
    for (int o = 0; o < n; ++o) {
      VA acc[NA * V];
      for (int v = 0; v < NA * V; ++v) acc[v] = VA{};
      for (int k = L.seg_start[o]; k < L.seg_start[o + 1]; ++k) {
        const Seg& sg = L.segs[k];
        VS sum[V];
        for (int v = 0; v < V; ++v) sum[v] = VS{};
        if (sg.flags & 2) {
          for (const int32_t* te = t + sg.count; t < te; ++t)
            for (int v = 0; v < V; ++v) sum[v] += reinterpret_cast<const VS*>(tbl + (*t >> SHIFT_BITS))[v];
        } else if (sg.flags & 4) {  // two terms per shift
          for (const int32_t* te = t + sg.count; t < te; t += 2) {
            const unsigned d = t[0] & 7;
            const VS* q = reinterpret_cast<const VS*>(tbl + (t[0] >> SHIFT_BITS));
            const VS* q2 = reinterpret_cast<const VS*>(tbl + (t[1] >> SHIFT_BITS));
            for (int v = 0; v < V; ++v)
              sum[v] = reinterpret_cast<VS>(reinterpret_cast<VU>(sum[v]) << d) + q[v] + q2[v];
          }
        } else {
          for (const int32_t* te = t + sg.count; t < te; ++t) {
            const unsigned d = *t & 7;
            const VS* q = reinterpret_cast<const VS*>(tbl + (*t >> SHIFT_BITS));
            for (int v = 0; v < V; ++v)
              sum[v] = reinterpret_cast<VS>(reinterpret_cast<VU>(sum[v]) << d) + q[v];
          }
        }
        const unsigned amount = static_cast<unsigned>(sg.amount);
        const bool neg = sg.flags & 1;
        for (int v = 0; v < V; ++v)
          for (int a = 0; a < NA; ++a) {
            PT part;
            __builtin_memcpy(&part, reinterpret_cast<const char*>(&sum[v]) + sizeof(PT) * a, sizeof(PT));
            const VA y = __builtin_convertvector(part, VA) << amount;
            if (neg)
              acc[NA * v + a] -= y;
            else
              acc[NA * v + a] += y;
          }
      }
      add_out<K>(out, acc, NA * V);
    }
  }

  // The earlier loop: per amount, one loop over its positive terms and one over its negative ones,
  // Horner's rule once per amount on the int16 sums, folded into the accumulators (after their
  // pending shift) where the plan's bound said (groups' bit 8).
  __attribute__((noinline)) static void groups(const T* tbl, const Lists& L, int n, A* out) {
    const int32_t* t = L.group_terms.data();
    for (int o = 0; o < n; ++o) {
      VA acc[NA * V];
      for (int v = 0; v < NA * V; ++v) acc[v] = VA{};
      VS sum[V];
      for (int v = 0; v < V; ++v) sum[v] = VS{};
      unsigned pend = 0;
      auto fold = [&]() {
        for (int v = 0; v < V; ++v) {
          for (int a = 0; a < NA; ++a) {
            PT part;
            __builtin_memcpy(&part, reinterpret_cast<const char*>(&sum[v]) + sizeof(PT) * a, sizeof(PT));
            acc[NA * v + a] = (acc[NA * v + a] << pend) + __builtin_convertvector(part, VA);
          }
          sum[v] = VS{};
        }
      };
      for (int j = L.group_start[o]; j < L.group_start[o + 1]; ++j) {
        const int32_t* gr = L.groups.data() + 3 * j;
        const unsigned d = static_cast<unsigned>(gr[0] & 255);
        if (gr[0] & 256) {
          fold();
          pend = d;
        } else {
          for (int v = 0; v < V; ++v) sum[v] = reinterpret_cast<VS>(reinterpret_cast<VU>(sum[v]) << d);
          pend += d;
        }
        for (const int32_t* te = t + gr[1]; t < te; ++t)
          for (int v = 0; v < V; ++v) sum[v] += reinterpret_cast<const VS*>(tbl + *t)[v];
        for (const int32_t* te = t + gr[2]; t < te; ++t)
          for (int v = 0; v < V; ++v) sum[v] -= reinterpret_cast<const VS*>(tbl + *t)[v];
      }
      fold();
      add_out<K>(out, acc, NA * V);
    }
  }
};

template <typename T, typename A, int V, int W>
void run(const char* label) {
  const int RW = 82, C = 8;
  // 1x1 kernels: a term reads channel c's plane at the item's column, 64-byte aligned (C1 planes of
  // S1 elements, as conv_drive's table), so no load crosses a cache line; the last plane is zero
  // (the pair padding's terms).
  const int C1 = 24, S1 = 128;
  std::vector<T> store(std::max(C * 3 * RW, (C1 + 1) * S1) + 256 + 64);
  T* tbl = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(store.data()) + 63) / 64 * 64);
  for (int i = 0; i < std::max(C * 3 * RW, C1 * S1); ++i) tbl[i] = static_cast<T>((i * 7) % 200 - 100);
  for (int i = C1 * S1; i < (C1 + 1) * S1 + 256; ++i) tbl[i] = 0;
  auto off = [&](int i) {
    const int c = i % C, k = (i / C) % 9;  // i: any index
    return c * 3 * RW + (k / 3) * RW + k % 3;
  };
  auto off1 = [&](int i) { return ((i * 5 + i / 1024) % C1) * S1; };
  const int64_t max_group = sizeof(T) == 2 ? 255 : 65535;
  Lists big, small, pairs;
  add_output(big, std::vector<std::array<int, 2>>(16, {18, 18}), 8, max_group, off);
  std::mt19937 rng(1);
  const int outputs = 4096;  // more than a branch predictor can learn
  for (int o = 0; o < outputs; ++o) {  // 9 amounts, 146 terms, counts varying by output
    std::vector<std::array<int, 2>> counts(9);
    std::discrete_distribution<int> amount({1, 2, 4, 8, 12, 10, 6, 3, 1});
    for (int i = 0; i < 146; ++i) ++counts[amount(rng)][rng() & 1];
    add_output(small, counts, 32, max_group, off1);
    add_output(pairs, counts, 32, max_group, off1, C1 * S1);
  }
  struct Case {
    const char* name;
    const Lists* lists;
    int n;
    bool groups;
  };
  const Case cases[] = {{"3x3, 36 per amount", &big, 1, false},
                        {"1x1, segments", &small, outputs, false},
                        {"1x1, two terms per shift", &pairs, outputs, false},
                        {"1x1, loops per amount", &small, outputs, true}};
  for (const Case& c : cases) {
    A out[W * V] = {};
    const int64_t nterms = c.groups ? static_cast<int64_t>(c.lists->group_terms.size())
                                    : static_cast<int64_t>(c.lists->terms.size());
    // Per weight term: the pair lists' zero terms count as the time they take, not as terms.
    const int64_t nreal = c.lists == &pairs ? static_cast<int64_t>(small.terms.size()) : nterms;
    const int reps = static_cast<int>(1.2e8 / nreal);  // equal for both forms of a list: equal checksums
    double best = 1e9;
    for (int trial = 0; trial < 7; ++trial) {
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        if (c.groups)
          Items<T, A, V, W>::groups(tbl, *c.lists, c.n, out);
        else
          Items<T, A, V, W>::segments(tbl, *c.lists, c.n, out);
      }
      const double dt = now() - t0;
      if (dt < best) best = dt;
    }
    // Per 16 output columns of one term, whatever the vector width.
    const double per16 = best / (static_cast<double>(reps) * nreal * V * W / 16.0);
    std::printf("%-28s %-25s %.3f ns per 16-column term  (checksum %lld)", label, c.name, per16 * 1e9,
                static_cast<long long>(out[3] % 997));
    if (nreal != nterms) std::printf("  (%.1f%% zero terms)", 100.0 * (nterms - nreal) / nreal);
    std::printf("\n");
  }
}

// What the same CPU's float32 multiply-adds cost at their peak (12 independent 8-lane FMA chains on
// registers, no loads: more than an fp32 GEMM such as onnxruntime's MLAS reaches): ns per 16
// multiply-adds, to compare with the shift loop's ns per 16-column term (16 shifted adds).
static void fma_peak() {
#if defined(__FMA__)
  const __m256 a = _mm256_set1_ps(0.5f), b = _mm256_set1_ps(1.0f);  // x -> x / 2 + 1: stays near 2
  volatile float seed = 0.25f;  // distinct run-time starts: the compiler may not merge the chains
  __m256 c[12];
  for (int k = 0; k < 12; ++k) c[k] = _mm256_set1_ps(seed * static_cast<float>(k + 1));
  __m256 c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5];
  __m256 c6 = c[6], c7 = c[7], c8 = c[8], c9 = c[9], c10 = c[10], c11 = c[11];
  const long reps = 50000000;
  double best = 1e9;
  for (int trial = 0; trial < 5; ++trial) {
    const double t0 = now();
    for (long r = 0; r < reps; ++r) {
      // Twelve independent chains (FMA latency times its throughput on current x86 cores is <= 10).
      c0 = _mm256_fmadd_ps(c0, a, b), c1 = _mm256_fmadd_ps(c1, a, b), c2 = _mm256_fmadd_ps(c2, a, b);
      c3 = _mm256_fmadd_ps(c3, a, b), c4 = _mm256_fmadd_ps(c4, a, b), c5 = _mm256_fmadd_ps(c5, a, b);
      c6 = _mm256_fmadd_ps(c6, a, b), c7 = _mm256_fmadd_ps(c7, a, b), c8 = _mm256_fmadd_ps(c8, a, b);
      c9 = _mm256_fmadd_ps(c9, a, b), c10 = _mm256_fmadd_ps(c10, a, b), c11 = _mm256_fmadd_ps(c11, a, b);
    }
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                                      _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7))));
  const float rest = _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
  std::printf("fp32 FMA peak, 12 chains of 8-lane FMAs  %.3f ns per 16 multiply-adds  (checksum %g)\n",
              best / (reps * 12.0 * 8 / 16) * 1e9, static_cast<double>(out[0] + rest));
#else
  std::printf("fp32 FMA peak: not built (no FMA with -march=native here)\n");
#endif
}

int main() {
  run<int16_t, int32_t, 4, 16>("AVX2 int16 table");
  // 16-bit activations ((8, 8) fixed point) with int64 accumulators: int32 tables, 8 columns per
  // vector, so twice the loads per column.
  run<int32_t, int64_t, 4, 8>("AVX2 int32 table, int64 acc");
#ifdef __AVX512BW__
  run<int16_t, int32_t, 2, 32>("AVX-512 int16 table");
#else
  std::printf("AVX-512 wide items: not built (no AVX-512BW with -march=native here)\n");
#endif
  fma_peak();
  std::printf("64ch 56x56 3x3 conv: 7.48 M 16-column terms (64 * 203 * 576); ResNet-50: 256 M\n");
  return 0;
}
