// The convolution kernel's inner loop with its table resident in L1: what one 16-lane term (a load
// of 16 table values and an add or subtract) costs on this CPU, i.e. the loop's floor for a
// convolution; also its int32-table form (16-bit activations, int64 accumulators: two 8-lane loads
// per 16 columns). Standalone (no torch):
//
//   g++ -O3 -march=native -o /tmp/conv_loop benchmarks/conv_loop.cpp && /tmp/conv_loop
//
// The loop is conv_item_n's (src/deepshift/backends/cpu/csrc/kernels.h) for one row of 4 vectors:
// 16 shift groups of 36 terms (576 terms, a 64-channel 3x3 kernel; half added, half subtracted),
// Horner's rule on the int16 sums, folded into int32 accumulators where the plan's bound says
// (every third group here; before the fold bound, every group was widened).
// Term offsets are a 3x3 kernel's over 8 channels of 3 padded rows (then again: the table stays in
// L1), as in the kernel; mode 1 rounds every offset down to a whole vector (aligned loads).
// Both for AVX2's 16-lane vectors (4 per row) and, where built with AVX-512, 32-lane vectors (2 per
// row, the same 64 columns: half the loads and adds). On AMD EPYCs with AVX-512 (512-bit operations
// issued as two 256-bit halves) the 32-lane loop costs as much as the 16-lane one or more (0.19-0.20
// ns on one, 0.27 against 0.24 on another): the loop is not bound by the vector width, so the kernel
// keeps its 16-lane items there (32-lane items tried in the kernel itself measured 0.8-1.2x, noise).
// The int32-table form measured 0.47 ns per 16 columns on the second (1.9x the int16 one).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One item row of V vectors of W table lanes of type T (int16 or int32 sums), widened into
// accumulators of type A (int32 or int64: K = 32 / sizeof(A) lanes per 256-bit accumulator).
// As conv_item_n: Horner's rule runs on the narrow sums (one shift per group) while the plan's
// bound allows (max_group terms' worth of the largest input, 255 for int16 tables), and the sums are
// folded into the accumulators (sign-extended, after the accumulators' pending shift) only where
// the next group could leave their lanes: here every third group (36 terms each, one shift apart).
template <typename T, typename A, int V, int W>
__attribute__((noinline)) void item(const T* tbl, const int32_t* terms, int groups, int per, int64_t max_group,
                                    A* out) {
  typedef T VS __attribute__((vector_size(sizeof(T) * W), aligned(sizeof(T)), may_alias));
  constexpr int K = 32 / sizeof(A);
  typedef T PT __attribute__((vector_size(sizeof(T) * K)));
  typedef A VA __attribute__((vector_size(32)));
  constexpr int NA = W / K;
  VA acc[NA * V];
  for (int v = 0; v < NA * V; ++v) acc[v] = VA{};
  VS sum[V];
  for (int v = 0; v < V; ++v) sum[v] = VS{};
  const int32_t* t = terms;
  int64_t bound = 0;
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
  for (int j = 0; j < groups; ++j) {
    const unsigned d = j ? 1 : 0;
    if ((bound << d) + per > max_group) {  // the plan's GROUP_FOLD
      fold();
      pend = d;
      bound = per;
    } else {
      for (int v = 0; v < V; ++v) sum[v] <<= d;
      pend += d;
      bound = (bound << d) + per;
    }
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] += reinterpret_cast<const VS*>(tbl + *t)[v];
    for (const int32_t* te = t + per / 2; t < te; ++t)
      for (int v = 0; v < V; ++v) sum[v] -= reinterpret_cast<const VS*>(tbl + *t)[v];
  }
  fold();
  for (int v = 0; v < NA * V; ++v) __builtin_memcpy(out + v * K, &acc[v], 32);
}

template <typename T, typename A, int V, int W>
void run(const char* label) {
  const int RW = 82, C = 8, groups = 16, per = 36;
  std::vector<T> tbl(C * 3 * RW + 256);
  for (size_t i = 0; i < tbl.size(); ++i) tbl[i] = static_cast<T>((i * 7) % 200);
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<int32_t> terms;
    for (int i = 0; static_cast<int>(terms.size()) < groups * per; ++i) {
      const int c = i % C, k = (i / C) % 9;
      const int off = c * 3 * RW + (k / 3) * RW + k % 3;
      terms.push_back(mode == 1 ? off / W * W : off);
    }
    A out[W * V];
    uint64_t sink = 0;
    const int reps = 200000;
    double best = 1e9;
    for (int trial = 0; trial < 7; ++trial) {
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        item<T, A, V, W>(tbl.data(), terms.data(), groups, per, sizeof(T) == 2 ? 255 : 65535, out);
        sink += static_cast<uint64_t>(out[r % (W * V)]);
      }
      const double dt = now() - t0;
      if (dt < best) best = dt;
    }
    // Per 16 output columns of one term, whatever the vector width.
    const double per16 = best / (static_cast<double>(reps) * groups * per * V * W / 16.0);
    // A 64 -> 64 channel 3x3 conv on 56x56 (flat rows of 58): 64 * 203 * 576 = 7.48 M 16-column terms.
    std::printf("%-26s %-16s %.3f ns per 16-column term -> 64ch 56x56 3x3 conv on 2 cores (perfect "
                "scaling): %.2f ms  (checksum %llu)\n",
                label, mode ? "aligned offsets" : "conv offsets", per16 * 1e9, per16 * 7.48e6 / 2 * 1e3,
                static_cast<unsigned long long>(sink % 997));
  }
}

int main() {
  run<int16_t, int32_t, 4, 16>("AVX2 int16 table");
  // 16-bit activations ((8, 8) fixed point) with int64 accumulators: int32 tables, the sums widened
  // once per shift group (conv_wide's loop); 8 columns per vector, so twice the loads per column.
  run<int32_t, int64_t, 4, 8>("AVX2 int32 table, int64 acc");
#ifdef __AVX512BW__
  run<int16_t, int32_t, 2, 32>("AVX-512 int16 table");
#else
  std::printf("AVX-512 wide items: not built (no AVX-512BW with -march=native here)\n");
#endif
  return 0;
}
