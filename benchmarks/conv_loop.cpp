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
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

typedef int16_t VS __attribute__((vector_size(32), aligned(2), may_alias));
typedef int16_t H16 __attribute__((vector_size(16)));
typedef int32_t S32 __attribute__((vector_size(32)));
typedef uint32_t V32 __attribute__((vector_size(32), aligned(4), may_alias));

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <int V>
__attribute__((noinline)) void item(const uint16_t* tbl, const int32_t* terms, int groups, int per, uint32_t* out) {
  V32 acc[2 * V];
  for (int v = 0; v < 2 * V; ++v) acc[v] = V32{};
  const int32_t* t = terms;
  for (int j = 0; j < groups; ++j) {
    for (int v = 0; v < 2 * V; ++v) acc[v] <<= 1;
    VS sum[V];
    for (int v = 0; v < V; ++v) sum[v] = VS{};
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] += reinterpret_cast<const VS*>(tbl + *t)[v];
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] -= reinterpret_cast<const VS*>(tbl + *t)[v];
    for (int v = 0; v < V; ++v)
      for (int a = 0; a < 2; ++a) {
        H16 part;
        __builtin_memcpy(&part, reinterpret_cast<const char*>(&sum[v]) + 16 * a, 16);
        acc[2 * v + a] += reinterpret_cast<V32>(__builtin_convertvector(part, S32));
      }
  }
  for (int v = 0; v < 2 * V; ++v) __builtin_memcpy(out + v * 8, &acc[v], 32);
}

int main() {
  const int RW = 82, C = 8, groups = 16, per = 36, V = 4;
  std::vector<uint16_t> tbl(C * 3 * RW + 256);
  for (size_t i = 0; i < tbl.size(); ++i) tbl[i] = static_cast<uint16_t>((i * 7) % 200);
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<int32_t> terms;
    for (int i = 0; static_cast<int>(terms.size()) < groups * per; ++i) {
      const int c = i % C, k = (i / C) % 9;
      const int off = c * 3 * RW + (k / 3) * RW + k % 3;
      terms.push_back(mode == 1 ? off / 16 * 16 : off);
    }
    uint32_t out[8 * 2 * V];
    uint64_t sink = 0;
    const int reps = 200000;
    double best = 1e9;
    for (int trial = 0; trial < 7; ++trial) {
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        item<V>(tbl.data(), terms.data(), groups, per, out);
        sink += out[r % (8 * 2 * V)];
      }
      const double dt = now() - t0;
      if (dt < best) best = dt;
    }
    const double per_vector = best / (static_cast<double>(reps) * groups * per * V);
    // A 64 -> 64 channel 3x3 conv on 56x56 (flat rows of 58): 64 * 203 * 576 = 7.48 M term vectors.
    std::printf("%-16s %.3f ns per 16-lane term -> 64ch 56x56 3x3 conv on 2 cores (perfect scaling): %.2f ms"
                "  (checksum %llu)\n",
                mode ? "aligned offsets" : "conv offsets", per_vector * 1e9, per_vector * 7.48e6 / 2 * 1e3,
                static_cast<unsigned long long>(sink % 997));
  }
  return 0;
}
