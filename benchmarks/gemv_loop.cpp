// The batch-1 shift-Linear inner loop with its codes resident in L1 (no memory traffic): what the
// kernel's instructions cost per weight on this CPU, i.e. the compute floor of Linear 4096x4096 at
// batch 1. Standalone (no torch):
//
//   g++ -O3 -march=native -o /tmp/gemv_loop benchmarks/gemv_loop.cpp && /tmp/gemv_loop
//
// Variant 0 is gemv_tiles' AVX2 step (src/deepshift/backends/cpu/csrc/kernels.h): per weight column
// and 8 output lanes, widen the 8 code bytes, mask the shift field, broadcast x[k], variable shift
// (vpsllvd), sign (vpsignd), add. Variants 1 and 2 drop parts of it (their results are wrong on
// purpose) to show what no rearrangement of the same lanes can beat: 1 = shift + add only,
// 2 = widen + sign + add, no shift at all. AVX2 has no 8- or 16-bit variable shift, so a
// multiplication-free step works on 8 int32 lanes; int8 dynamic quantization multiplies 32 byte
// pairs per vpmaddubsw.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
  const int K = 512, T = 4;  // 4 tiles x 8 outputs x 512 columns = 16 KB of codes: L1-resident
  std::vector<int8_t> codes(T * K * 8);
  for (size_t i = 0; i < codes.size(); ++i)
    codes[i] = static_cast<int8_t>(((i * 37) % 16) | 32 | (i % 3 == 0 ? 0x80 : 0));
  std::vector<uint32_t> x(K);
  for (int k = 0; k < K; ++k) x[k] = (k * 13) % 256;
  const int reps = 20000;
  __m256i sink = _mm256_setzero_si256();
  const char* names[3] = {"kernel step (widen, mask, shift, sign, add)", "shift + add only",
                          "widen + sign + add, no shift"};
  for (int variant = 0; variant < 3; ++variant) {
    double best = 1e9;
    for (int trial = 0; trial < 7; ++trial) {
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        for (int t = 0; t < T; ++t) {
          const int8_t* ct = codes.data() + t * K * 8;
          __m256i acc = _mm256_setzero_si256(), acc2 = acc;
          const __m256i m31 = _mm256_set1_epi32(31);
          for (int k = 0; k < K; k += 2) {
            const __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ct + k * 8)));
            const __m256i c1 =
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ct + k * 8 + 8)));
            const __m256i x0 = _mm256_set1_epi32(static_cast<int>(x[k]));
            const __m256i x1 = _mm256_set1_epi32(static_cast<int>(x[k + 1]));
            if (variant == 0) {
              acc = _mm256_add_epi32(acc, _mm256_sign_epi32(_mm256_sllv_epi32(x0, _mm256_and_si256(c0, m31)), c0));
              acc2 = _mm256_add_epi32(acc2, _mm256_sign_epi32(_mm256_sllv_epi32(x1, _mm256_and_si256(c1, m31)), c1));
            } else if (variant == 1) {
              acc = _mm256_add_epi32(acc, _mm256_sllv_epi32(x0, c0));
              acc2 = _mm256_add_epi32(acc2, _mm256_sllv_epi32(x1, c1));
            } else {
              acc = _mm256_add_epi32(acc, _mm256_sign_epi32(x0, c0));
              acc2 = _mm256_add_epi32(acc2, _mm256_sign_epi32(x1, c1));
            }
          }
          sink = _mm256_add_epi32(sink, _mm256_add_epi32(acc, acc2));
        }
      }
      const double per_weight = (now() - t0) / (static_cast<double>(reps) * T * K * 8);
      if (per_weight < best) best = per_weight;
    }
    std::printf("%-46s %.4f ns/weight/core -> 4096x4096 on 2 cores (perfect scaling): %.2f ms\n", names[variant],
                best * 1e9, best * 4096.0 * 4096.0 / 2 * 1e3);
  }
  int out[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sink);
  std::printf("(checksum %d)\n", out[0]);
  return 0;
}
