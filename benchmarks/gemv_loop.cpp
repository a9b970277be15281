// The batch-1 shift-Linear inner loops with their codes resident in L1 (no memory traffic): what each
// kernel's instructions cost per weight on this CPU, i.e. the compute floor of Linear 4096x4096 at
// batch 1; and the machine's measured read bandwidth, i.e. the memory floor of the same layer for
// each weight format (fp32, int8, our 5- and 4-bit index layouts). Standalone (no torch):
//
//   g++ -O3 -march=native -fopenmp -o /tmp/gemv_loop benchmarks/gemv_loop.cpp && /tmp/gemv_loop
//
// AVX2 variants. 0 is gemv_tiles' step (src/deepshift/backends/cpu/csrc/kernels.h): per weight column
// and 8 output lanes, widen the 8 code bytes, mask the shift field, broadcast x[k], variable shift
// (vpsllvd), sign (vpsignd), add. 1 and 2 drop parts of it (their results are wrong on purpose) to
// show what no rearrangement of the same lanes can beat: 1 = shift + add only, 2 = widen + sign + add.
//
// AVX-512 variants (built with -march=native on a CPU with AVX-512F): the table-lookup steps of
// csrc/lut.cpp. Per weight column, a 16- or 32-entry int32 table of +-(x[k] << a) (built once per
// column, outside the loop here as in the kernel) is indexed by 16 packed weight indices per
// permute: 4-bit indices (8 per 32-bit word: one load, 7 shifts, 8 vpermd, 8 adds per 128 weights)
// and 5-bit (6 per word: one load, 5 shifts, 6 vpermi2d, 6 adds per 96 weights).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <omp.h>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#ifdef __AVX512F__
// The table-lookup inner loops over L1-resident index tiles (16 KB) and tables.
template <int BITS>
double lut_ns_per_weight() {
  constexpr int P = BITS == 4 ? 8 : 6, T = 1 << BITS;
  const int K = 256;  // 256 columns x 64 bytes of indices = 16 KB
  alignas(64) static uint32_t tiles[256 * 16];
  alignas(64) static uint32_t tbl[256 * 32];
  for (int i = 0; i < K * 16; ++i) tiles[i] = static_cast<uint32_t>(i * 2654435761u);
  for (int i = 0; i < K * T; ++i) tbl[i] = static_cast<uint32_t>(i * 7);
  const int reps = 40000;
  double best = 1e9;
  __m512i sink = _mm512_setzero_si512();
  for (int trial = 0; trial < 7; ++trial) {
    const double t0 = now();
    for (int r = 0; r < reps; ++r) {
      __m512i acc[P];
      for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_si512();
      for (int k = 0; k < K; ++k) {
        const __m512i v = _mm512_load_si512(tiles + k * 16);
        for (int p = 0; p < P; ++p) {
          const __m512i idx = p ? _mm512_srli_epi32(v, BITS * p) : v;
          const uint32_t* t = tbl + k * T;
          const __m512i term = BITS == 4 ? _mm512_permutexvar_epi32(idx, _mm512_load_si512(t))
                                         : _mm512_permutex2var_epi32(_mm512_load_si512(t), idx,
                                                                     _mm512_load_si512(t + 16));
          acc[p] = _mm512_add_epi32(acc[p], term);
        }
      }
      for (int p = 0; p < P; ++p) sink = _mm512_add_epi32(sink, acc[p]);
    }
    const double per_weight = (now() - t0) / (static_cast<double>(reps) * K * 16 * P);
    if (per_weight < best) best = per_weight;
  }
  alignas(64) uint32_t out[16];
  _mm512_store_si512(out, sink);
  std::printf("(checksum %u) ", out[0]);
  return best * 1e9;
}

static void lut_loops() {
  const double n4 = lut_ns_per_weight<4>(), n5 = lut_ns_per_weight<5>();
  std::printf("\n%-46s %.4f ns/weight/core -> 4096x4096 on 2 cores: %.3f ms\n", "table lookup, 4-bit indices", n4,
              n4 * 4096.0 * 4096.0 / 2 * 1e-6);
  std::printf("%-46s %.4f ns/weight/core -> 4096x4096 on 2 cores: %.3f ms\n", "table lookup, 5-bit indices", n5,
              n5 * 4096.0 * 4096.0 / 2 * 1e-6);
}
#endif

// Read bandwidth of 2 threads over a 512 MB buffer (far beyond any cache), and what it makes the
// floor of Linear 4096x4096 at batch 1 for each weight format: every weight byte read once.
static void bandwidth_floor() {
  const size_t n = size_t(512) << 20 >> 3;  // uint64 words
  std::vector<uint64_t> buf(n, 1);
  double best = 1e9;
  uint64_t total = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const double t0 = now();
    uint64_t s = 0;
#pragma omp parallel for num_threads(2) reduction(+ : s)
    for (size_t i = 0; i < n; i += 8) s += buf[i] + buf[i + 1] + buf[i + 2] + buf[i + 3] + buf[i + 4] +
                                         buf[i + 5] + buf[i + 6] + buf[i + 7];
    const double dt = now() - t0;
    total += s;
    if (dt < best) best = dt;
  }
  const double gbs = n * 8.0 / best / 1e9;
  const double w = 4096.0 * 4096.0;
  std::printf("\nread bandwidth, 2 threads, 512 MB: %.1f GB/s (checksum %llu)\n", gbs,
              static_cast<unsigned long long>(total));
  const char* names[4] = {"fp32 (4 bytes/weight)", "int8 (1 byte/weight)", "5-bit indices (6 per 32-bit word)",
                          "4-bit indices (8 per 32-bit word)"};
  const double bytes[4] = {4.0 * w, w, w * 32.0 / 6.0 / 8.0, w / 2.0};
  for (int i = 0; i < 4; ++i)
    std::printf("  Linear 4096x4096 batch 1 memory floor, %-36s %6.1f MB -> %.3f ms\n", names[i], bytes[i] / 1e6,
                bytes[i] / 1e9 / gbs * 1e3);
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
#ifdef __AVX512F__
  lut_loops();
#else
  std::printf("table-lookup (AVX-512) loops: not built (no AVX-512F with -march=native here)\n");
#endif
  bandwidth_floor();
  int out[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sink);
  std::printf("(checksum %d)\n", out[0]);
  return 0;
}
