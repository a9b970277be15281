// Multiplication-free shift-layer kernels (templates), compiled twice in every translation unit that
// includes common.h: once portable (namespace ds_portable) and once under `#pragma GCC target("avx2,fma,bmi2")` (namespace ds_avx2, where
// DS_AVX2_TU is defined). No #include here: the including file provides everything.
//
// All arithmetic is on unsigned lanes (uint32_t / uint64_t), so it wraps exactly like torch's int32 /
// int64 tensor arithmetic: results equal the reference op bit for bit even where a sum overflows.
//
// Hot loops use only shifts, sign application (negation / vpsignd) and adds/subtracts on activations.
// Multiplications appear only in index arithmetic (row / plane offsets), never on activation values.

// Geom (the geometry of one conv call) is defined once in common.h, outside both namespaces.

// Even (odd, with `odd`) lanes of the 2N-lane row a:b, as N lanes (one shuffle).
template <typename V, size_t... I>
inline V lanes_of_parity(V a, V b, bool odd, std::index_sequence<I...>) {
  return odd ? __builtin_shufflevector(a, b, (2 * I + 1)...) : __builtin_shufflevector(a, b, (2 * I)...);
}

// Deals a padded row p (sw * Wq elements) out to its sw phases: phase r's column q (at row + r * WPS + q)
// is p[q * sw + r]. Stride 2 on int16 tables (ResNets' strided convs): 16, then 8, columns per phase
// and step by even / odd lane shuffles (an element at a time ran at ~5 cycles per element).
template <typename U>
inline void deal_phases(const U* p, U* row, int64_t sw, int64_t Wq, int64_t WPS) {
  int64_t q0 = 0;
  if constexpr (sizeof(U) == 2) {
    if (sw == 2) {
      auto steps = [&](auto n) {
        constexpr size_t N = decltype(n)::value;
        typedef U V __attribute__((vector_size(2 * N), aligned(2), may_alias));
        constexpr auto lanes = std::make_index_sequence<N>{};
        for (; q0 + int64_t(N) <= Wq; q0 += N) {
          const V* in = reinterpret_cast<const V*>(p + 2 * q0);  // columns 2 q0 .. 2 q0 + 2N
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<V*>(row + r * WPS + q0) = lanes_of_parity(in[0], in[1], r, lanes);
        }
      };
      steps(std::integral_constant<size_t, 16>{});
      steps(std::integral_constant<size_t, 8>{});
    }
  }
  for (int64_t r = 0; r < sw; ++r)
    for (int64_t q = q0; q < Wq; ++q) row[r * WPS + q] = p[q * sw + r];
}

// Table of channels [c0, c1) of one image: tbl[c] = the zero-padded, phase-split x[c]; cv says how input
// values become table values: cv.run(src, dst, n) converts a contiguous run, returning whether some value
// was invalid (NaN, for float input). Every input element is converted, so none goes unchecked.
// Returns whether cv reported any.
template <typename U, typename S, typename Cv>
bool build_table(const S* x, U* tbl, const Geom& g, int64_t c0, int64_t c1, const Cv& cv) {
  const int64_t DHW = g.D * g.H * g.W;
  bool bad = false;
  std::vector<U> padded(g.sw == 1 ? 0 : g.sw * g.Wq);  // strided: one converted input row, padded
  for (int64_t c = c0; c < c1; ++c) {
    const S* xc = x + c * DHW;
    U* dst = tbl + c * g.S;
    for (int64_t d = 0; d < g.Dp; ++d) {
      const int64_t id = d - g.pd;
      // Padded row h (rows Hp .. sh * Hq - 1: padding of the last phases) goes to sw phase rows of
      // Wq elements (see Geom).
      for (int64_t h = 0; h < g.sh * g.Hq; ++h) {
        U* row = dst + d * g.P + (h % g.sh) * g.HPS + (h / g.sh) * g.RW;  // its phase 0
        const int64_t ih = h - g.ph;
        if (h >= g.Hp || id < 0 || id >= g.D || ih < 0 || ih >= g.H) {
          for (int64_t r = 0; r < g.sw; ++r)
            for (int64_t q = 0; q < g.Wq; ++q) row[r * g.WPS + q] = 0;
          continue;
        }
        const S* src = xc + (id * g.H + ih) * g.W;
        if (g.sw == 1) {
          const int64_t lo = g.pw < g.Wq ? g.pw : g.Wq;
          const int64_t hi = (g.pw + g.W) < g.Wq ? (g.pw + g.W) : g.Wq;
          for (int64_t q = 0; q < lo; ++q) row[q] = 0;
          bad |= cv.run(src + (lo - g.pw), row + lo, hi - lo);
          for (int64_t q = hi; q < g.Wq; ++q) row[q] = 0;
        } else {
          // Convert the row as one contiguous run (vectorised) between its zero padding (sw * Wq >= the
          // padded width), then deal its columns out to the phases.
          U* pr = padded.data();
          std::fill(pr, pr + g.pw, U(0));
          bad |= cv.run(src, pr + g.pw, g.W);
          std::fill(pr + g.pw + g.W, pr + g.sw * g.Wq, U(0));
          deal_phases(pr, row, g.sw, g.Wq, g.WPS);
        }
      }
    }
    for (int64_t i = g.Dp * g.P; i < g.S; ++i) dst[i] = 0;  // the alignment gap: read by dropped outputs
  }
  return bad;
}

// build_table's converter for integer input already in the table's lanes: a copy.
template <typename U>
struct CopyIn {
  bool run(const U* src, U* dst, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    return false;
  }
};

// Table and output offsets of the R output rows (flattened (od, oh)) from row0, at column ow0.
inline void row_offsets(const Geom& g, int R, int64_t row0, int64_t ow0, int64_t* tb, int64_t* yoff) {
  for (int r = 0; r < R; ++r) {
    const int64_t rr = row0 + r;
    const int64_t od = rr / g.OH, oh = rr - od * g.OH;
    tb[r] = od * g.sd * g.P + oh * g.RW + ow0;  // index arithmetic only
    yoff[r] = rr * g.OW + ow0;
  }
}

// Largest row block for V vectors per row (R * V sums <= 12 of the 16 vector registers; their
// accumulators, touched at segment ends only, may live on the stack).
inline int rows_for(int V) { return V >= 7 ? 1 : (V >= 5 ? 2 : 12 / V); }

// Row-block sizes available for V vectors per row (at most rows_for(V)); items use the largest that fits.
inline bool has_rows(int V, int R) {
  return R >= 1 && R <= rows_for(V) && (R <= 4 || R == 6 || R == 8 || R == 12);
}

template <typename T, typename UA>
using ConvItemNFn = void (*)(const T*, UA*, const Geom&, const PlanView&, int64_t, int64_t, int64_t, int64_t,
                             const UA*);
template <typename U>
using ConvItemFn = ConvItemNFn<U, U>;

// The row-block choice for V vectors per row (has_rows(V, R)) over an item family: Fam::Fn is its
// function type, Fam::template fn<R, V> its item for R rows x V vectors.
template <typename Fam, int V>
typename Fam::Fn pick_r(int R) {
  if constexpr (V == 1) {
    switch (R) {
      case 12: return Fam::template fn<12, 1>;
      case 8: return Fam::template fn<8, 1>;
      case 6: return Fam::template fn<6, 1>;
      default: break;
    }
  }
  if constexpr (V <= 2) {
    if (R == 6) return Fam::template fn<6, V>;
  }
  if constexpr (V <= 3) {
    if (R == 4) return Fam::template fn<4, V>;
  }
  if constexpr (V <= 4) {
    if (R == 3) return Fam::template fn<3, V>;
  }
  if constexpr (V <= 6) {
    if (R == 2) return Fam::template fn<2, V>;
  }
  return Fam::template fn<1, V>;
}

// f(std::integral_constant<int, V>) for a run-time V in [First, Last] (values past Last take Last):
// the one place that turns the vector count into a template argument.
template <int First, int Last, typename F>
auto with_vectors(int V, F&& f) {
  if constexpr (First < Last) {
    if (V > First) return with_vectors<First + 1, Last>(V, f);
  }
  return f(std::integral_constant<int, First>{});
}

// Function of family Fam for an item of R rows (has_rows(V, R)) x V vectors.
template <typename Fam>
typename Fam::Fn pick_item(int R, int V) {
  return with_vectors<1, 8>(V, [R](auto v) { return pick_r<Fam, decltype(v)::value>(R); });
}

// Lanes [a K, a K + K) of v, sign-extended to SV's wider lanes (a register shuffle and a widening move).
template <int a, int K, typename SV, typename VS, size_t... I>
inline SV widen_slice(VS v, std::index_sequence<I...>) {
  return __builtin_convertvector(__builtin_shufflevector(v, v, (a * K + static_cast<int>(I))...), SV);
}

// y[a] = slice a of s, sign-extended to VA's lanes, for a in [a0, A).
template <int a0, int A, int K, typename SV, typename VA, typename VS>
inline void widen_all(VA* y, VS s) {
#if defined(DS_AVX2_TU)
  // One widening move per 128-bit half (GCC lowered the generic form below to moves of 4 lanes with
  // byte shifts and inserts: about three times the instructions at every segment end).
  constexpr size_t lane = sizeof(s[0]);
  if constexpr (a0 == 0 && sizeof(SV) == 32 && (lane == 2 || lane == 4) && sizeof(VS) == 16 * A) {
    const auto widen = [](__m128i h) {
      return lane == 2 ? _mm256_cvtepi16_epi32(h) : _mm256_cvtepi32_epi64(h);
    };
    if constexpr (A == 1) {
      y[0] = reinterpret_cast<VA>(widen(reinterpret_cast<__m128i>(s)));
    } else {
      const __m256i v = reinterpret_cast<__m256i>(s);
      y[0] = reinterpret_cast<VA>(widen(_mm256_castsi256_si128(v)));
      y[1] = reinterpret_cast<VA>(widen(_mm256_extracti128_si256(v, 1)));
    }
    return;
  }
#endif
  if constexpr (a0 < A) {
    y[a0] = reinterpret_cast<VA>(widen_slice<a0, K, SV>(s, std::make_index_sequence<K>{}));
    widen_all<a0 + 1, A, K, SV>(y, s);
  }
}

// One work item of the conv: R output rows (flattened (od, oh) from row0) x V vectors of W output
// columns from ow0, for output channels [o0, o1). The table holds the zero-padded input in T lanes
// (no pre-shifted copies); an output's terms (offsets of its non-zero weights' inputs) come in
// segments (PlanView): within one, amounts descend and the step is s = (s << d) + x, one vector load,
// one uniform shift and one add per W outputs, with no branch between terms of different amounts
// (an output's term count per shift amount and sign is small and varies: loops per amount and sign
// spent about as much on their mispredicted exits as on the sums); plain segments (one amount's
// many terms) skip the shift, SEG_PAIRS segments (1x1 kernels: conv.cpp's pad_pairs) take two
// terms per shift, s = ((s << d) + x) + x', the second term's d being 0. At a segment's end its
// sum is sign-extended into the UA accumulators, shifted by its amount and added or subtracted. All mod
// 2**(UA bits), like torch. T = UA: the plain int32 / int64 paths. Narrow tables (T = int16 for
// 8-bit activations, |x| <= 128; int32 with int64 accumulators, |x| <= 2**15): the plan ends a
// segment before its bound on |s| could leave T's range (255 * 128 < 2**15; 65535 * 2**15 < 2**31),
// so the narrow sums are exact and the result is the wide path's bit for bit. Registers: R * V sums
// in T lanes (R * V <= 4 for int16 tables; more accumulators than registers stay on the stack: they
// are touched only at segment ends). W = 8 ("half" items, conv_drive; int16 tables): 8-lane
// (128-bit) sums for rows of at most 8 outputs, so that no lane is idle.
inline int rows_for16(int V) { return V >= 3 ? 1 : (V == 2 ? 2 : 4); }
inline bool has_rows16(int V, int R) { return R >= 1 && R <= rows_for16(V); }

template <typename T, typename UA, int R, int V, int W = 32 / sizeof(T)>
void conv_item_n(const T* tbl, UA* yimg, const Geom& g, const PlanView& pv, int64_t row0, int64_t ow0,
                 int64_t o0, int64_t o1, const UA* bias) {
  typedef std::make_signed_t<T> ST;
  typedef std::make_signed_t<UA> SA;
  typedef ST VS __attribute__((vector_size(sizeof(T) * W), aligned(sizeof(T)), may_alias));
  typedef T VU __attribute__((vector_size(sizeof(T) * W)));  // VS's lanes unsigned (for the shift)
  constexpr int K = 32 / sizeof(UA);  // accumulator lanes per vector
  typedef SA SV __attribute__((vector_size(32)));
  typedef UA VA __attribute__((vector_size(32), aligned(sizeof(UA)), may_alias));
  constexpr int A = W / K;  // accumulators per sum vector
  constexpr unsigned UA_BITS = 8 * sizeof(UA);
  int64_t tb[R], yoff[R];
  row_offsets(g, R, row0, ow0, tb, yoff);
  const int64_t nvalid = (g.OW - ow0) < V * W ? (g.OW - ow0) : V * W;
  const int64_t plane = g.OD * g.OH * g.OW;
  for (int64_t cb = 0; cb < g.NCB; ++cb) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t gi = g.Cout_g == g.Cout ? 0 : o / g.Cout_g;
      const int64_t e = (gi * g.NCB + cb) * g.Cout_g + (o - gi * g.Cout_g);
      UA* yo = yimg + o * plane;
      VA acc[R][A * V];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < A * V; ++v) acc[r][v] = VA{};
      const int32_t* t = pv.terms + pv.tstart[e];
      for (int64_t k = pv.sstart[e]; k < pv.sstart[e + 1]; ++k) {
        const int32_t* sg = pv.segs + 3 * k;
        VS sum[R][V];
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < V; ++v) sum[r][v] = VS{};
        // The segment's terms, P per step: s = (s << d) + x_1 + ... + x_P, d the first term's shift
        // (Shift false: plain segments, every d 0); pad_pairs makes the other terms' d 0 for P = 2.
        auto sum_terms = [&](auto per_step, auto shift) {
          constexpr int P = decltype(per_step)::value;
          for (const int32_t* te = t + sg[0]; t < te; t += P) {
            const T* p[P];
            for (int j = 0; j < P; ++j) p[j] = tbl + (static_cast<uint32_t>(t[j]) >> TERM_SHIFT_BITS);
            const unsigned d = static_cast<uint32_t>(t[0]) & TERM_MAX_SHIFT;
            for (int r = 0; r < R; ++r)
              for (int v = 0; v < V; ++v) {
                VS s = sum[r][v];
                if constexpr (decltype(shift)::value) s = reinterpret_cast<VS>(reinterpret_cast<VU>(s) << d);
                for (int j = 0; j < P; ++j) s += reinterpret_cast<const VS*>(p[j] + tb[r])[v];
                sum[r][v] = s;
              }
          }
        };
        using One = std::integral_constant<int, 1>;
        if (sg[2] & SEG_PLAIN)
          sum_terms(One{}, std::false_type{});
        else if (sg[2] & SEG_PAIRS)
          sum_terms(std::integral_constant<int, 2>{}, std::true_type{});
        else
          sum_terms(One{}, std::true_type{});
        const unsigned amount = static_cast<unsigned>(sg[1]);
        if (amount >= UA_BITS) continue;  // (s << amount) is 0 mod 2**(UA bits)
        // A branch per segment (an entry's positive segments come before its negative ones).
        const bool neg = sg[2] & SEG_NEG;
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < V; ++v) {
            VA y[A];
            widen_all<0, A, K, SV>(y, sum[r][v]);
            if (neg)
              for (int a = 0; a < A; ++a) acc[r][A * v + a] -= y[a] << amount;
            else
              for (int a = 0; a < A; ++a) acc[r][A * v + a] += y[a] << amount;
          }
      }
      const UA b = cb == 0 && bias ? bias[o] : UA(0);
      for (int r = 0; r < R; ++r) {
        UA* dst = yo + yoff[r];
        if (nvalid == A * V * K) {  // whole vectors: straight from the registers
          for (int v = 0; v < A * V; ++v) {
            VA* q = reinterpret_cast<VA*>(dst + v * K);
            *q = acc[r][v] + (cb == 0 ? VA{} + b : *q);
          }
          continue;
        }
        UA tmp[A * V * K];
        for (int v = 0; v < A * V; ++v) __builtin_memcpy(tmp + v * K, &acc[r][v], 32);
        if (cb == 0) {
          for (int64_t i = 0; i < nvalid; ++i) dst[i] = tmp[i] + b;
        } else {
          for (int64_t i = 0; i < nvalid; ++i) dst[i] += tmp[i];
        }
      }
    }
  }
}

template <typename U>
struct PlainItems {
  using Fn = ConvItemFn<U>;
  template <int R, int V>
  static constexpr Fn fn = &conv_item_n<U, U, R, V>;
};

// Function for an item of R rows (has_rows(V, R)) x V vectors.
template <typename U>
ConvItemFn<U> conv_item_fn(int R, int V) {
  return pick_item<PlainItems<U>>(R, V);
}

template <typename UA, int V>
ConvItemNFn<uint16_t, UA> pick_r16(int R) {
  if constexpr (V == 1) {
    if (R == 4) return &conv_item_n<uint16_t, UA, 4, 1>;
    if (R == 3) return &conv_item_n<uint16_t, UA, 3, 1>;
  }
  if constexpr (V <= 2) {
    if (R == 2) return &conv_item_n<uint16_t, UA, 2, V>;
  }
  return &conv_item_n<uint16_t, UA, 1, V>;
}

// Function for an int16-table item of R rows (has_rows16(V, R)) x V vectors of 16 columns (V <= 5).
template <typename UA>
ConvItemNFn<uint16_t, UA> conv_item16_fn(int R, int V) {
  return with_vectors<1, 5>(V, [R](auto v) { return pick_r16<UA, decltype(v)::value>(R); });
}

// Function for a half item (8 columns) of R rows, R in {1, 2, 3, 4, 6, 8}.
template <typename UA>
ConvItemNFn<uint16_t, UA> conv_item16h_fn(int R) {
  switch (R) {
    case 8: return &conv_item_n<uint16_t, UA, 8, 1, 8>;
    case 6: return &conv_item_n<uint16_t, UA, 6, 1, 8>;
    case 4: return &conv_item_n<uint16_t, UA, 4, 1, 8>;
    case 3: return &conv_item_n<uint16_t, UA, 3, 1, 8>;
    case 2: return &conv_item_n<uint16_t, UA, 2, 1, 8>;
    default: return &conv_item_n<uint16_t, UA, 1, 1, 8>;
  }
}

// int32 tables, int64 accumulators: the int32 path's row blocks (has_rows(V, R)).
struct WideItems {
  using Fn = ConvItemNFn<uint32_t, uint64_t>;
  template <int R, int V>
  static constexpr Fn fn = &conv_item_n<uint32_t, uint64_t, R, V>;
};

inline ConvItemNFn<uint32_t, uint64_t> conv_item32w_fn(int R, int V) { return pick_item<WideItems>(R, V); }

// Small-batch Linear (int32 lanes): tiles[t][k][j] is the byte code of weight (8 t + j, k):
// 0 = no contribution, else bit 7 = sign (1 = negative), bits 0-4 = the left-shift amount, bit 5 set
// (so a positive code is non-zero). Lanes are 8 output features; per weight column the step is
// broadcast x[k], variable shift (vpsllvd), sign (vpsignd), add: no multiplication.
template <int M>
void gemv_tiles(const uint32_t* x, int64_t K, const int8_t* tiles, int64_t t0, int64_t t1, int64_t O,
                const uint32_t* bias, uint32_t* y) {
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* ct = tiles + t * K * 8;
    uint32_t out[M][8];
#if defined(DS_AVX2_TU)
    __m256i acc[M], acc2[M];
    for (int m = 0; m < M; ++m) acc[m] = acc2[m] = _mm256_setzero_si256();
    const __m256i m31 = _mm256_set1_epi32(31);
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ct + k * 8)));
      const __m256i c1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ct + k * 8 + 8)));
      const __m256i a0 = _mm256_and_si256(c0, m31), a1 = _mm256_and_si256(c1, m31);
      for (int m = 0; m < M; ++m) {
        const __m256i x0 = _mm256_set1_epi32(static_cast<int>(x[m * K + k]));
        const __m256i x1 = _mm256_set1_epi32(static_cast<int>(x[m * K + k + 1]));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_sign_epi32(_mm256_sllv_epi32(x0, a0), c0));
        acc2[m] = _mm256_add_epi32(acc2[m], _mm256_sign_epi32(_mm256_sllv_epi32(x1, a1), c1));
      }
    }
    for (; k < K; ++k) {
      const __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ct + k * 8)));
      const __m256i a0 = _mm256_and_si256(c0, m31);
      for (int m = 0; m < M; ++m) {
        const __m256i x0 = _mm256_set1_epi32(static_cast<int>(x[m * K + k]));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_sign_epi32(_mm256_sllv_epi32(x0, a0), c0));
      }
    }
    for (int m = 0; m < M; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[m]), _mm256_add_epi32(acc[m], acc2[m]));
#else
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 8; ++j) out[m][j] = 0;
    for (int64_t k = 0; k < K; ++k) {
      for (int j = 0; j < 8; ++j) {
        const int8_t c = ct[k * 8 + j];
        if (c == 0) continue;
        const unsigned a = static_cast<unsigned>(c) & 31u;
        for (int m = 0; m < M; ++m) {
          const uint32_t s = x[m * K + k] << a;
          out[m][j] += c < 0 ? 0u - s : s;
        }
      }
    }
#endif
    const int64_t o0 = t * 8;
    const int64_t n = (O - o0) < 8 ? (O - o0) : 8;
    for (int m = 0; m < M; ++m)
      for (int64_t j = 0; j < n; ++j) y[m * O + o0 + j] = out[m][j] + (bias ? bias[o0 + j] : 0u);
  }
}

typedef void (*GemvFn)(const uint32_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, const uint32_t*,
                       uint32_t*);

inline GemvFn gemv_fn(int M) {
  switch (M) {
    case 1: return &gemv_tiles<1>;
    case 2: return &gemv_tiles<2>;
    case 3: return &gemv_tiles<3>;
    default: return &gemv_tiles<4>;
  }
}

#if defined(DS_AVX2_TU)
// fake_quantize_f32's vector loop over whole 8-float blocks; returns how many floats it did. Band:
// whether to check the gradient's pass band (not needed when no gradient is taken), into *outside:
// through the running min and max of x (vminps / vmaxps return their second operand, the running
// value, when x is NaN: NaN counts as inside), two operations per vector instead of four.
template <bool Floor, bool Band>
inline int64_t fake_quantize_f32_avx2(const float* x, float* y, int64_t n, float s, float inv_s, float lo, float hi,
                                      float glo, float ghi, bool* outside) {
  constexpr int mode = (Floor ? _MM_FROUND_TO_NEG_INF : _MM_FROUND_TO_NEAREST_INT) | _MM_FROUND_NO_EXC;
  const __m256 vs = _mm256_set1_ps(s), vinv = _mm256_set1_ps(inv_s);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  __m256 mn = _mm256_set1_ps(__builtin_inff()), mx = _mm256_set1_ps(-__builtin_inff());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    if constexpr (Band) {
      mn = _mm256_min_ps(xv, mn);
      mx = _mm256_max_ps(xv, mx);
    }
    __m256 v = _mm256_round_ps(_mm256_mul_ps(xv, vs), mode);
    v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(v, vinv));
  }
  if constexpr (Band) {
    float lo8[8], hi8[8];
    _mm256_storeu_ps(lo8, mn);
    _mm256_storeu_ps(hi8, mx);
    for (int k = 0; k < 8; ++k)
      if (lo8[k] <= glo || hi8[k] >= ghi) *outside = true;
  }
  return i;
}
#endif

// Training-time fixed-point rounding of float32 values, fused into one pass:
// y = min(hi, max(lo, round(x * s))) * inv_s with s = 2**F (round = half to even, or floor).
// The same float32 operations, in the same order, as the torch path in deepshift.core.quantize
// (x * 2**F, round_/floor_, clamp_, * 2**-F), so the result is identical bit for bit; NaN stays
// NaN (max/min return their second operand when one is NaN), +-inf saturate.
// Returns whether some x lies outside the gradient's pass band, i.e. x <= glo or x >= ghi (NaN is
// not: aten's hardtanh_backward, the backward used otherwise, passes its gradient).
inline bool fake_quantize_f32(const float* x, float* y, int64_t n, float s, float inv_s, float lo, float hi,
                              bool floor_mode, float glo, float ghi) {
  int64_t i = 0;
  bool outside = false;
#if defined(DS_AVX2_TU)
  const bool band = glo > -__builtin_inff() || ghi < __builtin_inff();
  if (floor_mode)
    i = band ? fake_quantize_f32_avx2<true, true>(x, y, n, s, inv_s, lo, hi, glo, ghi, &outside)
             : fake_quantize_f32_avx2<true, false>(x, y, n, s, inv_s, lo, hi, glo, ghi, &outside);
  else
    i = band ? fake_quantize_f32_avx2<false, true>(x, y, n, s, inv_s, lo, hi, glo, ghi, &outside)
             : fake_quantize_f32_avx2<false, false>(x, y, n, s, inv_s, lo, hi, glo, ghi, &outside);
#endif
  for (; i < n; ++i) {
    if (x[i] <= glo || x[i] >= ghi) outside = true;
    float v = x[i] * s;
    v = floor_mode ? std::floor(v) : std::nearbyint(v);
    if (!(v != v)) v = v < lo ? lo : (v > hi ? hi : v);
    y[i] = v * inv_s;
  }
  return outside;
}

// The fused frozen-layer path (conv_fused in conv.cpp): fixed-point rounding of float inputs
// while building the table (QuantSpec, defined in common.h, says how).
template <typename U, typename F>
inline bool quantize_one(F x, U* dst, const QuantSpec& q) {
  const double v = static_cast<double>(x) * q.scale;
  if (v != v) {
    *dst = 0;
    return true;
  }
  double r = q.floor_mode ? std::floor(v) : std::nearbyint(v);
  r = r < q.lo ? q.lo : (r > q.hi ? q.hi : r);
  *dst = static_cast<U>(static_cast<int64_t>(r));  // two's complement in the unsigned lanes
  return false;
}

// dst[i] = q(src[i]) for i < n; returns whether some src[i] is NaN.
template <typename U, typename F>
inline bool quantize_run(const F* src, U* dst, int64_t n, const QuantSpec& q) {
  int64_t i = 0;
  bool nan = false;
#if defined(DS_AVX2_TU)
  if constexpr (std::is_same<F, float>::value) {
    if (q.f32_exact) {
      const __m256 vs = _mm256_set1_ps(static_cast<float>(q.scale));
      const __m256 vlo = _mm256_set1_ps(static_cast<float>(q.lo)), vhi = _mm256_set1_ps(static_cast<float>(q.hi));
      __m256 bad = _mm256_setzero_ps();
      auto body = [&](auto mode) {
        for (; i + 8 <= n; i += 8) {
          __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + i), vs);
          bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          v = _mm256_round_ps(v, decltype(mode)::value | _MM_FROUND_NO_EXC);
          const __m256i iv = _mm256_cvttps_epi32(_mm256_min_ps(vhi, _mm256_max_ps(vlo, v)));
          if constexpr (sizeof(U) == 2) {
            const __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), p);
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), iv);
          }
        }
      };
      if (q.floor_mode)
        body(std::integral_constant<int, _MM_FROUND_TO_NEG_INF>());
      else
        body(std::integral_constant<int, _MM_FROUND_TO_NEAREST_INT>());
      nan = _mm256_movemask_ps(bad) != 0;
    }
  }
#endif
  for (; i < n; ++i) nan |= quantize_one(src[i], dst + i, q);
  return nan;
}

// build_table's converter for float input: rounds to fixed point on the way; reports NaN.
template <typename U, typename F>
struct QuantizeIn {
  QuantSpec q;
  bool run(const F* src, U* dst, int64_t n) const { return quantize_run(src, dst, n, q); }
};

// The frozen layers' output scaling (OutScale, common.h), 8 lanes per step in the float32 case
// (GCC vector extensions: AVX2 in that build, SSE2 in the portable one).
template <typename FO, typename UY = uint32_t>
void scale_run(const UY* y, FO* out, int64_t n, const OutScale& sc) {
  if constexpr (std::is_same<FO, float>::value && std::is_same<UY, uint32_t>::value) {
    if (sc.single) {
      typedef int32_t VI __attribute__((vector_size(32), aligned(4), may_alias));
      typedef float VF __attribute__((vector_size(32), aligned(4), may_alias));
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const VF v = __builtin_convertvector(*reinterpret_cast<const VI*>(y + i), VF);
        *reinterpret_cast<VF*>(out + i) = v * sc.sf;
      }
      for (; i < n; ++i) out[i] = static_cast<float>(static_cast<int32_t>(y[i])) * sc.sf;
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<FO>(static_cast<double>(static_cast<std::make_signed_t<UY>>(y[i])) * sc.s);
}

// y[i] = relu(x[i] * s + h + r[i]) (x may be y): FrozenBatchNorm's forward (a multiply, then an add,
// each rounded: channel_affine), then, in a fused model (ShiftConvBatchNorm), a residual add if r and
// ReLU if Relu, each operation rounded as torch rounds it (the file is built with -ffp-contract=off:
// never one FMA). ReLU as torch computes it: y < 0 ? 0 : y, so NaN and -0.0 pass through. One vector
// loop for float and double (GCC vector extensions: AVX2 in that build, SSE2 in the portable one).
template <bool Relu, typename F>
void epilogue_run(const F* x, F* y, int64_t n, F s, F h, const F* r) {
  typedef F VF __attribute__((vector_size(32), aligned(sizeof(F)), may_alias));
  constexpr int64_t L = 32 / sizeof(F);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    VF v = *reinterpret_cast<const VF*>(x + i) * s;
    v = v + h;
    if (r) v = v + *reinterpret_cast<const VF*>(r + i);
    if constexpr (Relu) v = v < F(0) ? VF{} : v;
    *reinterpret_cast<VF*>(y + i) = v;
  }
  for (; i < n; ++i) {
    const F t = x[i] * s;
    F v = t + h;
    if (r) v = v + r[i];
    if constexpr (Relu) v = v < F(0) ? F(0) : v;
    y[i] = v;
  }
}

// The integer-only models' epilogue on one channel's plane (deepshift::int_epilogue's reference):
//   v = round_shift(x[i], pre); s = sum_k +-(v << left[k]) + bias (the K active terms, neg[k] = -1
//   for a negative one, else 0: a conditional negation, (t ^ m) - m, no multiply);
//   t = round_shift(s, right) + (r[i] << rs); y[i] = clamp(t, lo, hi).
// round_shift(v, a > 0) = (v + 2**(a-1) - 1 + ((v >> a) & 1)) >> a: to nearest, ties to even
// (arithmetic shifts of two's complement int64); a <= 0 shifts left. Wrapping like torch's int64.
inline int64_t round_shift_one(int64_t v, int64_t a) {
  if (a <= 0) return static_cast<int64_t>(static_cast<uint64_t>(v) << -a);
  const int64_t odd = (v >> a) & 1;
  return static_cast<int64_t>(static_cast<uint64_t>(v) + ((uint64_t(1) << (a - 1)) - 1) + uint64_t(odd)) >> a;
}

// Four int64 values per step (GCC vector extensions: AVX2 in that build) for the loops below, with
// round_shift_one's arithmetic: wrapping sums on the unsigned view, arithmetic shifts on the signed.
typedef int64_t I64x4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef uint64_t U64x4 __attribute__((vector_size(32), aligned(8), may_alias));

// round_shift_one(v, a) for a > 0, half = 2**(a-1) - 1.
inline I64x4 round_shift4(U64x4 v, int64_t a, uint64_t half) {
  const U64x4 odd = reinterpret_cast<U64x4>((reinterpret_cast<I64x4>(v) >> a) & 1);
  return reinterpret_cast<I64x4>(v + half + odd) >> a;
}

inline I64x4 clamp4(I64x4 t, I64x4 lo, I64x4 hi) {
  t = t < lo ? lo : t;
  return t > hi ? hi : t;
}

// Four int32 / int64 values of an integer-only model's tensors, loaded as (or stored from) int64
// lanes: int32 values sign-extended, int64 ones as they are; a store to int32 keeps the low 32 bits
// (wrapping, as torch's int64 -> int32 conversion).
typedef int32_t I32x4 __attribute__((vector_size(16), aligned(4), may_alias));

template <typename S>
inline I64x4 load4(const S* p) {
  if constexpr (sizeof(S) == 8) return *reinterpret_cast<const I64x4*>(p);
  else return __builtin_convertvector(*reinterpret_cast<const I32x4*>(p), I64x4);
}

template <typename S>
inline void store4(S* p, I64x4 v) {
  if constexpr (sizeof(S) == 8) *reinterpret_cast<I64x4*>(p) = v;
  else *reinterpret_cast<I32x4*>(p) = __builtin_convertvector(v, I32x4);
}

// build_table's converter for the integer-only models' int32 / int64 input (S): requantised on the
// way, clamp(round_shift(x, shift), lo, hi) (deepshift::int_epilogue with one term), as the table's lanes.
template <typename U, typename S = int64_t>
struct RequantIn {
  int64_t shift, lo, hi;
  bool run(const S* src, U* dst, int64_t n) const {
    int64_t i = 0;
    if (shift > 0) {  // four values per step
      const uint64_t half = (uint64_t(1) << (shift - 1)) - 1;
      const I64x4 lov = {lo, lo, lo, lo}, hiv = {hi, hi, hi, hi};
      for (; i + 4 <= n; i += 4) {
        const I64x4 t = clamp4(round_shift4(reinterpret_cast<U64x4>(load4(src + i)), shift, half), lov, hiv);
        for (int j = 0; j < 4; ++j) dst[i + j] = static_cast<U>(t[j]);
      }
    }
    for (; i < n; ++i) {
      const int64_t t = round_shift_one(static_cast<int64_t>(src[i]), shift);
      dst[i] = static_cast<U>(t < lo ? lo : (t > hi ? hi : t));
    }
    return false;
  }
};

// The epilogue of x[0, n) into y (XI, XO, XR: int32_t or int64_t; r the residual or null), computed in
// int64 and stored as XO (the caller's clamp keeps it in XO's range, else it wraps like the reference).
template <int K, typename XI, typename XO, typename XR>
void int_epilogue_run(const XI* x, XO* y, int64_t n, int k_dyn, const int64_t* left, const int64_t* neg,
                      int64_t bias, int64_t right, int64_t pre, const XR* r, int64_t rs, int64_t lo,
                      int64_t hi) {
  const int kk = K > 0 ? K : k_dyn;
  int64_t i = 0;
  if (pre == 0 && kk <= 8 && right >= -63 && right <= 63) {  // four values per step
    const EpilogueTerms terms(kk, left, neg);
    const uint64_t half = right > 0 ? (uint64_t(1) << (right - 1)) - 1 : 0;
    const I64x4 lov = {lo, lo, lo, lo}, hiv = {hi, hi, hi, hi};
    for (; i + 4 <= n; i += 4) {
      I64x4 t = epilogue_lanes<U64x4, I64x4>(reinterpret_cast<U64x4>(load4(x + i)), kk, terms.ls, terms.ns,
                                             static_cast<uint64_t>(bias), right, half);
      if (r) t = reinterpret_cast<I64x4>(reinterpret_cast<U64x4>(t) + (reinterpret_cast<U64x4>(load4(r + i)) << rs));
      store4(y + i, clamp4(t, lov, hiv));
    }
  }
  for (; i < n; ++i) {
    const int64_t xi = static_cast<int64_t>(x[i]);
    const int64_t v = pre ? round_shift_one(xi, pre) : xi;
    uint64_t s = static_cast<uint64_t>(bias);
    for (int k = 0; k < kk; ++k) {
      const uint64_t t = static_cast<uint64_t>(v) << left[k];
      const uint64_t m = static_cast<uint64_t>(neg[k]);
      s += (t ^ m) - m;
    }
    int64_t t = round_shift_one(static_cast<int64_t>(s), right);
    if (r) t = static_cast<int64_t>(static_cast<uint64_t>(t) + (static_cast<uint64_t>(static_cast<int64_t>(r[i])) << rs));
    y[i] = static_cast<XO>(t < lo ? lo : (t > hi ? hi : t));
  }
}

// Bit layout of the float types the weight-rounding passes below handle.
template <typename F>
struct FloatBits;
template <>
struct FloatBits<float> {
  typedef uint32_t I;
  static constexpr int M = 23, BIAS = 127;
};
template <>
struct FloatBits<double> {
  typedef uint64_t I;
  static constexpr int M = 52, BIAS = 1023;
};

// DeepShift-Q's deterministic weight rounding (deepshift.core.quantize.q_weight's forward) in one pass:
// y = (w < 0 ? -1 : 1) * 2**round(log2(clamp(|w|, lo, hi))), NaN kept. lo and hi are normal powers of
// two. round(log2 m) is exact: m = 1.f * 2**k rounds up to 2**(k + 1) iff 1.f >= sqrt 2 (never equal,
// sqrt 2 being irrational), i.e. iff its mantissa bits are >= mt, those of the least F above sqrt 2.
// The torch path (frexp, then the same comparison) gives the same bits.
template <typename F>
void q_round(const F* w, F* y, int64_t n, F lo, F hi, typename FloatBits<F>::I mt) {
  typedef typename FloatBits<F>::I I;
  constexpr int M = FloatBits<F>::M;
  constexpr I mask = (I(1) << M) - 1, sign = I(1) << (8 * sizeof(I) - 1);
  for (int64_t i = 0; i < n; ++i) {
    const F v = w[i];
    F m = v < 0 ? -v : v;
    m = m < lo ? lo : m;  // comparisons with NaN are false: NaN stays
    m = m > hi ? hi : m;
    I b;
    __builtin_memcpy(&b, &m, sizeof b);
    const I e = (b >> M) + ((b & mask) >= mt ? I(1) : I(0));  // m >= lo > 0: no sign bit
    const I o = (e << M) | (v < 0 ? sign : I(0));
    F r;
    __builtin_memcpy(&r, &o, sizeof r);
    y[i] = m != m ? m : r;
  }
}

// DeepShift-PS's deterministic weight (deepshift.core.quantize.ps_weight's forward) in one pass:
// y = sign(round(sgn)) * 2**round(clamp(shift, lo, hi)), round = half to even, exactly as torch
// computes it: sign(NaN) = 0, a NaN shift gives NaN. lo and hi are integers with 2**lo, 2**hi normal.
template <typename F>
void ps_round(const F* shift, const F* sgn, F* y, int64_t n, F lo, F hi) {
  typedef typename FloatBits<F>::I I;
  constexpr int M = FloatBits<F>::M;
  for (int64_t i = 0; i < n; ++i) {
    F p = shift[i];
    p = p < lo ? lo : p;
    p = p > hi ? hi : p;
    p = __builtin_nearbyint(p);
    const F r = __builtin_nearbyint(sgn[i]);
    const F s = static_cast<F>((F(0) < r) - (r < F(0)));
    const int32_t pi = p != p ? 0 : static_cast<int32_t>(p);
    const I o = static_cast<I>(pi + FloatBits<F>::BIAS) << M;  // 2**p
    F t;
    __builtin_memcpy(&t, &o, sizeof t);
    y[i] = p != p ? p : s * t;
  }
}
