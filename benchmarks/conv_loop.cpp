// The int16 convolution kernel's inner loop with its table resident in L1: what one 16-lane term
// (a load of 16 table values and an add or subtract) costs on this CPU, i.e. the loop's floor for a
// convolution. Standalone (no torch):
//
//   g++ -O3 -march=native -o /tmp/conv_loop benchmarks/conv_loop.cpp && /tmp/conv_loop
//
// The loop is conv_item16's (src/deepshift/backends/cpu/csrc/kernels.h) for one row of 4 vectors:
// 16 shift groups of 36 terms (576 terms, a 64-channel 3x3 kernel; half added, half subtracted),
// each group's int16 sums widened into int32 accumulators shifted by the group's step (Horner).
// Term offsets are a 3x3 kernel's over 8 channels of 3 padded rows (then again: the table stays in
// L1), as in the kernel; mode 1 rounds every offset down to 16 elements (32-byte aligned loads).
// Both for AVX2's 16-lane vectors (4 per row) and, where built with AVX-512, 32-lane vectors (2 per
// row, the same 64 columns: half the loads and adds). On an AMD EPYC with AVX-512 both cost
// 0.19-0.20 ns per 16-column term: the loop is not bound by the vector width, so the kernel keeps
// its 16-lane items there (32-lane items tried in the kernel itself measured 0.8-1.2x, noise).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

typedef int16_t H16 __attribute__((vector_size(16)));
typedef int32_t S32 __attribute__((vector_size(32)));
typedef uint32_t V32 __attribute__((vector_size(32), aligned(4), may_alias));

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One item row of V vectors of W int16 lanes (A = W / 8 int32 accumulators of 8 lanes per vector).
template <int V, int W>
__attribute__((noinline)) void item(const uint16_t* tbl, const int32_t* terms, int groups, int per, uint32_t* out) {
  typedef int16_t VS __attribute__((vector_size(2 * W), aligned(2), may_alias));
  constexpr int A = W / 8;
  V32 acc[A * V];
  for (int v = 0; v < A * V; ++v) acc[v] = V32{};
  const int32_t* t = terms;
  for (int j = 0; j < groups; ++j) {
    for (int v = 0; v < A * V; ++v) acc[v] <<= 1;
    VS sum[V];
    for (int v = 0; v < V; ++v) sum[v] = VS{};
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] += reinterpret_cast<const VS*>(tbl + *t)[v];
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] -= reinterpret_cast<const VS*>(tbl + *t)[v];
    for (int v = 0; v < V; ++v)
      for (int a = 0; a < A; ++a) {
        H16 part;
        __builtin_memcpy(&part, reinterpret_cast<const char*>(&sum[v]) + 16 * a, 16);
        acc[A * v + a] += reinterpret_cast<V32>(__builtin_convertvector(part, S32));
      }
  }
  for (int v = 0; v < A * V; ++v) __builtin_memcpy(out + v * 8, &acc[v], 32);
}

template <int V, int W>
void run(const char* label) {
  const int RW = 82, C = 8, groups = 16, per = 36;
  std::vector<uint16_t> tbl(C * 3 * RW + 256);
  for (size_t i = 0; i < tbl.size(); ++i) tbl[i] = static_cast<uint16_t>((i * 7) % 200);
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<int32_t> terms;
    for (int i = 0; static_cast<int>(terms.size()) < groups * per; ++i) {
      const int c = i % C, k = (i / C) % 9;
      const int off = c * 3 * RW + (k / 3) * RW + k % 3;
      terms.push_back(mode == 1 ? off / W * W : off);
    }
    uint32_t out[W * V];
    uint64_t sink = 0;
    const int reps = 200000;
    double best = 1e9;
    for (int trial = 0; trial < 7; ++trial) {
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        item<V, W>(tbl.data(), terms.data(), groups, per, out);
        sink += out[r % (W * V)];
      }
      const double dt = now() - t0;
      if (dt < best) best = dt;
    }
    // Per 16 output columns of one term, whatever the vector width.
    const double per16 = best / (static_cast<double>(reps) * groups * per * V * (W / 16));
    // A 64 -> 64 channel 3x3 conv on 56x56 (flat rows of 58): 64 * 203 * 576 = 7.48 M 16-column terms.
    std::printf("%-7s %-16s %.3f ns per 16-column term -> 64ch 56x56 3x3 conv on 2 cores (perfect scaling): "
                "%.2f ms  (checksum %llu)\n",
                label, mode ? "aligned offsets" : "conv offsets", per16 * 1e9, per16 * 7.48e6 / 2 * 1e3,
                static_cast<unsigned long long>(sink % 997));
  }
}

int main() {
  run<4, 16>("AVX2");
#ifdef __AVX512BW__
  run<2, 32>("AVX-512");
#else
  std::printf("AVX-512 wide items: not built (no AVX-512BW with -march=native here)\n");
#endif
  return 0;
}
