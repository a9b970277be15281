// Decoding packed codes, and deepshift::shift_conv's kernels: plans of terms, the plain and the fused
// (frozen layer: float in, float out) convolution.
#include "common.h"
#include "epilogue.h"

#include <omp.h>  // the extension is always built with -fopenmp (build.py), as torch's parallel_for is

namespace deepshift_cpu {

// Decode canonical packed codes into signed shift codes (int8, one per weight):
// 0 = the weight contributes nothing (PS zero, or a shift >= the lane width, which torch's
// left shift turns into 0), else sign * (amount + 1) with amount = rel + base the left-shift
// amount (base = shift_lo - min(shift_lo, 0) >= 0).
// Returns (scode, max amount over non-zero weights regardless of width, or -1).
std::tuple<torch::Tensor, int64_t> decode(const torch::Tensor& codes, int64_t numel, int64_t bits, bool has_zero,
                                          int64_t base, int64_t width) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(bits >= 2 && bits <= 8 && base >= 0, "bad bits/base");
  TORCH_CHECK(codes.numel() == (numel * bits + 7) / 8, "codes have the wrong length");
  auto out = torch::empty({numel}, torch::kInt8);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  const int64_t nbytes = codes.numel();
  const unsigned mask = (1u << bits) - 1u, fmask = (1u << (bits - 1)) - 1u;
  std::atomic<int64_t> max_amount(-1);
  at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) {
    int64_t local_max = -1;
    int64_t bit = b * bits;  // index arithmetic
    for (int64_t i = b; i < e; ++i, bit += bits) {
      const int64_t byte = bit >> 3;
      unsigned v = c[byte];
      if (byte + 1 < nbytes) v |= static_cast<unsigned>(c[byte + 1]) << 8;
      const unsigned code = (v >> (bit & 7)) & mask;
      const unsigned field = code & fmask;
      const bool neg = (code >> (bits - 1)) != 0;
      int8_t s = 0;
      if (!(has_zero && field == 0)) {
        const int64_t amount = static_cast<int64_t>(has_zero ? field - 1 : field) + base;
        local_max = std::max(local_max, amount);
        if (amount < width) s = static_cast<int8_t>(neg ? -(amount + 1) : amount + 1);
      }
      o[i] = s;
    }
    int64_t cur = max_amount.load();
    while (local_max > cur && !max_amount.compare_exchange_weak(cur, local_max)) {
    }
  });
  return std::make_tuple(out, max_amount.load());
}

struct Plan {
  std::vector<uint8_t> amounts;
  int64_t CB = 1;
};

Geom make_geom(const std::vector<int64_t>& xs /*N,C,D,H,W*/, const std::vector<int64_t>& ws,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                            const std::vector<int64_t>& dil, int64_t groups, int64_t NCB, bool flat,
                            bool align_rows) {
  Geom g{};
  g.C = xs[1];
  g.D = xs[2];
  g.H = xs[3];
  g.W = xs[4];
  g.pd = pad[0];
  g.ph = pad[1];
  g.pw = pad[2];
  g.sd = stride[0];
  g.sh = stride[1];
  g.sw = stride[2];
  g.Dp = g.D + 2 * g.pd;
  g.Hp = g.H + 2 * g.ph;
  const int64_t Wp = g.W + 2 * g.pw;
  g.OD = (g.Dp - dil[0] * (ws[2] - 1) - 1) / g.sd + 1;
  g.OH = (g.Hp - dil[1] * (ws[3] - 1) - 1) / g.sh + 1;
  g.OW = (Wp - dil[2] * (ws[4] - 1) - 1) / g.sw + 1;
  g.Wq = (Wp + g.sw - 1) / g.sw;
  // align_rows (int16 tables by rows; conv_plan decides and records it): rows of more than 8
  // outputs start on 16-element (32-byte) boundaries, so that an item's row loads its first kernel
  // column's vectors aligned (the table's planes and the items' column blocks are aligned already),
  // where a row of 34 elements had left every load's alignment to chance. ResNet-20 at batch 128,
  // one thread: its 32-channel convs on 16x16 (rows of 18 -> 32 elements) 5-9% faster, 16-channel
  // convs on 32x32 (34 -> 48) 1-5%, the strided ones 2-6%. Half-mode rows (at most 8 outputs) stay
  // packed: the padding would double their table; so do int32 tables, for which it cost ResNet-20
  // at (8, 8) 4-6% (their larger rows take more of L1 for no fewer line-crossing loads per column).
  if (align_rows && !flat && g.OW > 8) g.Wq = (g.Wq + 15) / 16 * 16;
  g.Hq = (g.Hp + g.sh - 1) / g.sh;
  g.flat = flat;
  g.RW = flat ? g.Wq : g.sh * g.sw * g.Wq;
  g.HPS = flat ? g.sw * g.Hq * g.Wq : g.sw * g.Wq;
  g.WPS = flat ? g.Hq * g.Wq : g.Wq;
  g.P = g.sh * g.sw * g.Hq * g.Wq;
  const int64_t plane = g.Dp * g.P;
  g.S = plane >= 32 ? (plane + 31) / 32 * 32 : plane;  // tiny planes stay packed (see Geom)
  g.Cout = ws[0];
  g.Cout_g = ws[0] / groups;
  g.NCB = NCB;
  return g;
}

int vectors_for(int64_t OW, int64_t lanes) {
  const int64_t nv = (OW + lanes - 1) / lanes;
  // int16 tables (16 lanes) keep 3 registers per vector (one int16 sum, two int32 accumulators).
  return static_cast<int>(std::min<int64_t>(lanes == 16 ? 5 : 8, std::max<int64_t>(1, nv)));
}

int rows_for_lanes(int V, int64_t lanes) {
  return lanes == 16 ? ds_portable::rows_for16(V) : ds_portable::rows_for(V);
}

// conv_drive's flat row: output (od, oh, ow) at position od * P + oh * RW + ow (see there).
int64_t flat_length(const Geom& g) { return (g.OD - 1) * g.P + (g.OH - 1) * g.RW + g.OW; }

// Whether conv_drive computes each output plane as one flat row over the padded width (see there),
// for `elem_size`-byte table elements; g in the flat order. conv_plan decides it (the table order and
// the channel blocks follow) and records it in the plan.
bool uses_flat(const Geom& g, int64_t elem_size) {
  const int64_t L = 32 / elem_size;
  // Where 256-bit operations cost two 128-bit ones (Zen 1, and the portable build), 8-output rows
  // are cheapest in half mode: no idle lane at all, and no wasted positions between rows.
  if (elem_size == 2 && g.OW <= 8 && splits_256()) return false;
  if (g.sd != 1) return false;
  // Flat wherever it needs no more vectors: its items are one row of several vectors (one term
  // offset per term, whole-vector stores), where row blocks of narrow rows add an offset per row
  // and partial stores. AMD Zen 4, one thread: ResNet-50's 3x3 convs on 14x14 planes (14 vectors
  // either way) 14% faster flat, on 28x28 (53 against 56) 10%, the stride-2 one to 14x14 17%; an
  // earlier loop (per shift amount) had wanted 1/16 fewer vectors before flat paid.
  const int64_t row_vectors = g.OD * g.OH * ((g.OW + L - 1) / L);
  const int64_t flat_len = flat_length(g);
  return (flat_len + L - 1) / L <= row_vectors;
}

bool has_rows_lanes(int V, int R, int64_t lanes) {
  return lanes == 16 ? ds_portable::has_rows16(V, R) : ds_portable::has_rows(V, R);
}

// The Horner segments of 1x1 kernels on int16 and int32 tables take two terms per step
// (conv_item_n: s = ((s << d) + x) + x', one shift for two terms): rewrites one entry's terms
// [base, end) and segments [seg0, end) so that in each Horner segment only terms at even positions
// carry a shift and the count is even, with zero terms (`pad` reads the table's zero plane) in the
// gaps, and flags them SEG_PAIRS; plain segments stay as they are. The shifts bound the loop where
// its loads are aligned, as in 1x1 kernels: on AMD Zen 4 (benchmarks/conv_loop.cpp's 1x1 lists)
// 0.30 ns per 16-column term with a shift per term, 0.24 with two terms per shift, zero terms
// included (the 3x3 list's plain, unaligned loop: 0.24). ResNet-50's 8-bit plans get 6-7% zero
// terms (12% where an entry has 64 terms): its 1x1 convs on 28x28 to 7x7 ran 10-15% faster (on
// 56x56 1-2% slower), the whole model 3-5%, Linear 4096x4096 at batch 64 9%; at (8, 8) (int32
// tables) 2-6% (56x56: 2% slower). Not for other kernels: their column offsets leave most loads
// unaligned, and those bound the loop (two terms per shift cost as much as one there), so the zero
// terms only added work (ResNet-20's first conv, 27 terms per output: 7-15% slower).
void pad_pairs(std::vector<int32_t>& terms, size_t base, std::vector<int32_t>& segs, size_t seg0,
               std::vector<int32_t>& scratch, int32_t pad) {
  bool any = false;
  for (size_t k = seg0; k < segs.size() && !any; k += 3) any = !(segs[k + 2] & SEG_PLAIN);
  if (!any) return;
  scratch.assign(terms.begin() + static_cast<std::ptrdiff_t>(base), terms.end());
  terms.resize(base);
  size_t i = 0;
  for (size_t k = seg0; k < segs.size(); k += 3) {
    const size_t n = static_cast<size_t>(segs[k]);
    if (segs[k + 2] & SEG_PLAIN) {
      terms.insert(terms.end(), scratch.begin() + static_cast<std::ptrdiff_t>(i),
                   scratch.begin() + static_cast<std::ptrdiff_t>(i + n));
      i += n;
      continue;
    }
    const size_t start = terms.size();
    for (size_t j = 0; j < n; ++j, ++i) {
      if ((scratch[i] & TERM_MAX_SHIFT) && (terms.size() - start) % 2) terms.push_back(pad);
      terms.push_back(scratch[i]);
    }
    if ((terms.size() - start) % 2) terms.push_back(pad);
    segs[k] = static_cast<int32_t>(terms.size() - start);
    segs[k + 2] |= SEG_PAIRS;
  }
}

// Term lists of a conv for one input geometry. scode: (Cout, Cin_g, KD, KH, KW) int8.
// Returns (terms int32, tstart int64 [E + 1], sstart int64 [E + 1], segs int32 [NS, 3],
// [CB, NCB, flat, align_rows] (make_geom)):
// see PlanView (common.h). A term is the offset of a weight's input (channel, kernel position) in the
// per-image table of the zero-padded input, with the shift before it in its low bits; see conv_item_n
// for the evaluation.
std::vector<torch::Tensor> conv_plan(const torch::Tensor& scode, std::vector<int64_t> xs, int64_t groups,
                                     std::vector<int64_t> stride, std::vector<int64_t> pad,
                                     std::vector<int64_t> dil, int64_t elem_size, int64_t l2_budget,
                                     int64_t max_group) {
  TORCH_CHECK(scode.dim() == 5 && scode.dtype() == torch::kInt8 && scode.is_contiguous(), "bad scode");
  std::vector<int64_t> ws(scode.sizes().begin(), scode.sizes().end());
  const int64_t Cout = ws[0], Cin_g = ws[1], KD = ws[2], KH = ws[3], KW = ws[4];
  const int64_t KK = KD * KH * KW;
  const int8_t* s = scode.data_ptr<int8_t>();
  auto g = make_geom(xs, ws, stride, pad, dil, groups, 1, true, false);
  const bool flat = uses_flat(g, elem_size);
  const bool align_rows = !flat && elem_size == 2;
  if (!flat) g = make_geom(xs, ws, stride, pad, dil, groups, 1, false, align_rows);
  // (g.C + 1) planes: the last is the zero plane that pair padding's terms read (conv_drive).
  TORCH_CHECK((g.C + 1) * g.S < (int64_t(1) << (31 - TERM_SHIFT_BITS)), "per-image table too large");
  // Channel block: the table slice one work item reads stays within ~l2_budget bytes (the item then
  // finds it in L1 for each of its output channels).
  const int64_t L = 32 / elem_size;
  int64_t per_channel;
  if (flat) {
    // A flat item reads vectors_for(long row) vectors of consecutive outputs plus the kernel's reach
    // below them (for a 64-channel 56x56 3x3 conv, 198 elements per channel, not 3 rows of 58), in
    // each phase block the kernel reads (strided kernels: up to sh * sw; in each, its rows below the
    // output row and columns right of it reach hreach / wreach).
    std::vector<char> phase_used(g.sh * g.sw, 0);
    int64_t hreach = 0, wreach = 0;
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t hh = kh * dil[1], w = kw * dil[2];
        phase_used[(hh % g.sh) * g.sw + w % g.sw] = 1;
        hreach = std::max(hreach, hh / g.sh);
        wreach = std::max(wreach, w / g.sw);
      }
    const int64_t nph = std::count(phase_used.begin(), phase_used.end(), 1);
    per_channel = KD * nph * (hreach * g.RW + wreach + vectors_for(INT64_MAX / 2, L) * L) * elem_size;
  } else {
    const int V = vectors_for(g.OW, L);
    const int R = static_cast<int>(std::min<int64_t>(rows_for_lanes(V, L), g.OD * g.OH));
    per_channel = KD * ((R - 1) * g.sh + (KH - 1) * dil[1] + 1) * g.sw * g.Wq * elem_size;
  }
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(Cin_g, l2_budget / std::max<int64_t>(1, per_channel)));
  int64_t NCB = (Cin_g + fit - 1) / fit;
  // Each block costs its own pass over an item's outputs and its own segments per output
  // channel: spatial kernels keep at least 288 terms (32 channels of 3x3) per block, so that the
  // summing work outweighs that overhead.
  if (KK > 1) NCB = std::max<int64_t>(1, std::min<int64_t>(NCB, Cin_g * KK / 288));
  // Blocks of equal size (64 channels in two blocks of 32, not 51 + 13).
  const int64_t CB = (Cin_g + NCB - 1) / NCB;
  const int64_t Cout_g = Cout / groups;
  const int64_t E = groups * NCB * Cout_g;
  // Offsets of each kernel position inside a channel plane (index arithmetic).
  std::vector<int64_t> koff(KK);
  for (int64_t kd = 0; kd < KD; ++kd)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t hh = kh * dil[1], w = kw * dil[2];
        koff[(kd * KH + kh) * KW + kw] =
            kd * dil[0] * g.P + (hh % g.sh) * g.HPS + (hh / g.sh) * g.RW + (w % g.sw) * g.WPS + w / g.sw;
      }
  auto tstart = torch::empty({E + 1}, torch::kInt64);
  auto sstart = torch::empty({E + 1}, torch::kInt64);
  int64_t* ts = tstart.data_ptr<int64_t>();
  int64_t* ss = sstart.data_ptr<int64_t>();
  std::vector<int32_t> terms;
  terms.reserve(scode.numel());
  std::vector<int32_t> segs;
  // Counting sort of one entry's terms by key = negative * 64 + (63 - amount): the positive chain,
  // then the negative one, each with amounts descending.
  std::vector<int32_t> key_of, off_of, key_sorted, pairs;
  const int32_t pad_term = static_cast<int32_t>(g.C * g.S) << TERM_SHIFT_BITS;  // the zero plane
  int64_t count[129];
  const int64_t plain_min = KK > 1 ? PLAIN_MIN_TERMS : PLAIN_MIN_TERMS_1X1;
  const bool pair_steps = KK == 1 && elem_size <= 4;  // see pad_pairs
  int64_t e = 0;
  for (int64_t gi = 0; gi < groups; ++gi)
    for (int64_t cb = 0; cb < NCB; ++cb)
      for (int64_t ol = 0; ol < Cout_g; ++ol, ++e) {
        const int64_t o = gi * Cout_g + ol;
        ts[e] = static_cast<int64_t>(terms.size());
        ss[e] = static_cast<int64_t>(segs.size() / 3);
        key_of.clear();
        off_of.clear();
        for (int64_t cl = cb * CB; cl < std::min(Cin_g, (cb + 1) * CB); ++cl) {
          const int64_t c = gi * Cin_g + cl;
          const int8_t* w = s + (o * Cin_g + cl) * KK;
          for (int64_t k = 0; k < KK; ++k) {
            const int v = w[k];
            if (v == 0) continue;
            const int amount = (v < 0 ? -v : v) - 1;
            key_of.push_back((v < 0 ? 64 : 0) + 63 - amount);
            off_of.push_back(static_cast<int32_t>(c * g.S + koff[k]));
          }
        }
        std::fill(count, count + 129, 0);
        for (int32_t k : key_of) ++count[k + 1];
        for (int k = 0; k < 128; ++k) count[k + 1] += count[k];
        key_sorted.resize(key_of.size());
        const size_t base = terms.size();
        terms.resize(base + key_of.size());
        for (size_t i = 0; i < key_of.size(); ++i) {
          const int64_t at = count[key_of[i]]++;
          terms[base + at] = off_of[i] << TERM_SHIFT_BITS;
          key_sorted[at] = key_of[i];
        }
        // Segments: a chain's run of terms summed by s = (s << d) + x in the table's lanes, d (the
        // amount's drop since the previous term) in the term's low bits; an amount's terms that are
        // at least PLAIN_MIN_TERMS (of one sign) make a plain segment of their own (s = s + x: no
        // shift per term, one more loop exit). A segment ends where the sign changes, where d would
        // not fit its bits, or where the bound on |s| (in units of the largest |x|; with
        // max_group > 0, narrow sums) would pass max_group.
        int64_t bound = 0, seg_count = 0;
        int prev_amount = 0, prev_flags = -1;
        auto close = [&]() {
          if (seg_count == 0) return;
          segs.push_back(static_cast<int32_t>(seg_count));
          segs.push_back(prev_amount);
          segs.push_back(prev_flags);
          seg_count = 0;
          bound = 0;
        };
        for (size_t i = 0; i < key_sorted.size(); ++i) {
          const int key = key_sorted[i];
          const int neg = key >= 64 ? 1 : 0, amount = 63 - (key - 64 * neg);
          const bool plain = count[key] - (key ? count[key - 1] : 0) >= plain_min;
          const int flags = (neg ? SEG_NEG : 0) | (plain ? SEG_PLAIN : 0);
          const int d = prev_amount - amount;
          if (flags != prev_flags || (plain && d > 0) || d > TERM_MAX_SHIFT ||
              (max_group > 0 && (bound << d) + 1 > max_group))
            close();
          // A segment's first term: s is still 0, so its shift is left out.
          if (seg_count > 0) terms[base + i] |= d;
          // Tracked only for narrow sums (max_group > 0 keeps it below 2**16 here): unbounded chains
          // would overflow it.
          if (max_group > 0) bound = seg_count > 0 ? (bound << d) + 1 : 1;
          ++seg_count;
          prev_amount = amount;
          prev_flags = flags;
        }
        close();
        if (pair_steps) pad_pairs(terms, base, segs, static_cast<size_t>(ss[e]) * 3, pairs, pad_term);
      }
  ts[E] = static_cast<int64_t>(terms.size());
  ss[E] = static_cast<int64_t>(segs.size() / 3);
  auto tt = torch::empty({static_cast<int64_t>(terms.size())}, torch::kInt32);
  if (!terms.empty()) std::memcpy(tt.data_ptr<int32_t>(), terms.data(), terms.size() * sizeof(int32_t));
  auto st = torch::empty({static_cast<int64_t>(segs.size() / 3), 3}, torch::kInt32);
  if (!segs.empty()) std::memcpy(st.data_ptr<int32_t>(), segs.data(), segs.size() * sizeof(int32_t));
  auto cbt = torch::tensor({CB, NCB, int64_t(flat), int64_t(align_rows)}, torch::kInt64);
  return {tt, tstart, sstart, st, cbt};
}

// Runs a conv plan over N images. build(n, tbl, c0, c1) fills channels [c0, c1) of image n's table.
// Outputs: with yp (and not flat, below), image n's integer output goes to yp + n * (its size) directly;
// otherwise to a scratch buffer per thread, and finish(n, dst, src, count) receives it in contiguous runs:
// `count` values at src belong at element dst of image n's (Cout, OD, OH, OW) output.
// Flat mode: with depth stride 1, an output plane is computed as one long row over the table's rows
// (output (od, oh, ow) at flat position od * P + oh * RW + ow reads the table at that position plus
// the term's offset; the phase-split table makes this hold for strides in height and width too), so
// rows narrower than a vector (8x8 planes: half of each 16-lane vector idle; 7x7 outputs of a
// stride-2 conv) fill whole vectors; the positions between rows are computed and dropped. Used where
// that needs no more vectors than row by row (uses_flat). Half mode: int16 tables with rows of at
// most 8 outputs (not flat, e.g. where 256-bit operations are split anyway) use 8-lane vectors, one
// per row (conv_item_n, W = 8).
// Returns whether some build call returned true.
template <typename U, typename UY, typename BuildFn, typename FinishFn>
bool conv_drive(const Geom& g0, int64_t N, const PlanView& pv, int64_t nterms, const UY* bp, UY* yp,
                BuildFn build, FinishFn finish) {
  constexpr int64_t L = 32 / sizeof(U);
  const int64_t flat_len = flat_length(g0);
  const bool flat = g0.flat;
  Geom g = g0;  // the geometry the work items see: in flat mode, one row of flat_len outputs
  if (flat) {
    g.OD = 1;
    g.OH = 1;
    g.OW = flat_len;
  }
  // Half mode (int16 tables, rows of at most 8 outputs, not flat): items of R rows x one 8-lane vector.
  const bool half = sizeof(U) == 2 && !flat && g.OW <= 8;
  const int V = half ? 1 : vectors_for(g.OW, L);
  // Half items take up to 8 rows (8 int16 sums in registers; their int32 accumulators, touched only
  // at segment ends, may live on the stack): on Zen 1, 8x8 planes ran 9% faster than as 6 + 2.
  const int RM = half ? 8 : rows_for_lanes(V, L);  // for the work split only
  const bool avx = use_avx2();
  struct Item {
    int64_t row0, ow0, o0, o1;
    int rows, v;
  };
  std::vector<Item> items;
  const int64_t rows = g.OD * g.OH;
  const int64_t nthreads = at::get_num_threads();
  const int64_t rblocks = rows / RM + rows % RM;
  const int64_t owblocks = (g.OW + V * L - 1) / (V * L);
  const int64_t spatial_items = rblocks * owblocks;
  // Items per thread: 4 where images run in parallel; 8 at batch 1, where the threads share each
  // image's items (by size, below: finer items split more evenly).
  const int64_t per_thread = N >= nthreads && nthreads > 1 ? 4 : 8;
  const int64_t wanted = per_thread * nthreads;
  const int64_t ochunks =
      std::max<int64_t>(1, std::min<int64_t>(g.Cout, (wanted + spatial_items - 1) / spatial_items));
  const int64_t osz = (g.Cout + ochunks - 1) / ochunks;
  // Column blocks of near-equal vector counts (6 vectors as 3 + 3, not 5 + 1: a narrow item pays a
  // term's index load for fewer vectors); a block's row block size follows its own vector count.
  const int64_t nvec = (g.OW + L - 1) / L;
  for (int64_t o0 = 0; o0 < g.Cout; o0 += osz)
    for (int64_t b = 0, ow0 = 0; b < owblocks; ++b) {
      const int vv = static_cast<int>(nvec / owblocks + (b < nvec % owblocks ? 1 : 0));
      for (int64_t r = 0; r < rows;) {
        int rr = static_cast<int>(std::min<int64_t>(half ? 8 : rows_for_lanes(vv, L), rows - r));
        while (half ? (rr == 5 || rr == 7) : !has_rows_lanes(vv, rr, L)) --rr;
        items.push_back({r, ow0, o0, std::min(g.Cout, o0 + osz), rr, vv});
        r += rr;
      }
      ow0 += vv * L;
    }
  // The C planes, for int16 / int32 tables a zero plane (pad_pairs's terms read it), and a zeroed
  // tail read past the last row.
  const size_t table_elems = static_cast<size_t>((g.C + (sizeof(U) <= 4 ? 1 : 0)) * g.S) + 8 * L + 64;
  auto run_items = [&](const U* tbl, UY* yimg, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Item& it = items[i];
      if constexpr (sizeof(U) == 2) {
        ds_portable::ConvItemNFn<uint16_t, UY> fn;
#ifdef DS_X86
        if (avx)
          fn = half ? ds_avx2::conv_item16h_fn<UY>(it.rows) : ds_avx2::conv_item16_fn<UY>(it.rows, it.v);
        else
#endif
          fn = half ? ds_portable::conv_item16h_fn<UY>(it.rows) : ds_portable::conv_item16_fn<UY>(it.rows, it.v);
        fn(tbl, yimg, g, pv, it.row0, it.ow0, it.o0, it.o1, bp);
      } else if constexpr (sizeof(U) < sizeof(UY)) {  // int32 table, int64 accumulators
        auto fn =
#ifdef DS_X86
            avx ? ds_avx2::conv_item32w_fn(it.rows, it.v) :
#endif
                ds_portable::conv_item32w_fn(it.rows, it.v);
        fn(tbl, yimg, g, pv, it.row0, it.ow0, it.o0, it.o1, bp);
      } else {
        auto fn =
#ifdef DS_X86
            avx ? ds_avx2::conv_item_fn<U>(it.rows, it.v) :
#endif
                ds_portable::conv_item_fn<U>(it.rows, it.v);
        fn(tbl, yimg, g, pv, it.row0, it.ow0, it.o0, it.o1, bp);
      }
    }
  };
  const int64_t yimg_stride = g.Cout * g.OD * g.OH * g.OW;  // the items' output (flat in flat mode)
  const bool direct = yp != nullptr && !flat;
  // Buffers without value-initialisation (at batch 1 zeroing the table and the scratch output cost
  // as much as a few percent of a conv): build writes every element of the C * S table and the
  // items every scratch output; only the zero plane and the tail read past the last row are zeroed.
  auto new_table = [&]() {
    std::unique_ptr<U, decltype(&std::free)> t(
        static_cast<U*>(std::aligned_alloc(64, (table_elems * sizeof(U) + 63) / 64 * 64)), &std::free);
    TORCH_CHECK(t, "out of memory for a conv table of ", table_elems, " elements");
    std::fill(t.get() + g.C * g.S, t.get() + table_elems, U(0));
    return t;
  };
  auto new_scratch = [&]() { return std::unique_ptr<UY[]>(direct ? nullptr : new UY[yimg_stride]); };
  // Hands over output runs [r0, r1) of image n: in flat mode a run is one output row (c, od, oh).
  const int64_t nruns = flat ? g0.Cout * g0.OD * g0.OH : yimg_stride;
  auto hand_over = [&](int64_t n, const UY* yimg, int64_t r0, int64_t r1) {
    if (!flat) {
      finish(n, r0, yimg + r0, r1 - r0);
      return;
    }
    for (int64_t r = r0; r < r1;) {
      const int64_t c = r / (g0.OD * g0.OH), dh = r - c * (g0.OD * g0.OH);  // index arithmetic
      const int64_t od = dh / g0.OH, oh = dh - od * g0.OH;
      const UY* src = yimg + c * flat_len + od * g0.P + oh * g0.RW;
      if constexpr (std::is_invocable_v<FinishFn&, int64_t, int64_t, const UY*, int64_t, int64_t, int64_t>) {
        // The rows of one (c, od) at once: at stride RW in the flat output, consecutive in the result.
        const int64_t k = std::min(r1 - r, g0.OH - oh);
        finish(n, r * g0.OW, src, g0.OW, k, g0.RW);
        r += k;
      } else {
        finish(n, r * g0.OW, src, g0.OW);
        ++r;
      }
    }
  };
  std::atomic<bool> flag(false);
  auto build_flag = [&](int64_t n, U* tbl, int64_t c0, int64_t c1) {
    if (build(n, tbl, c0, c1)) flag.store(true);
  };
  const int64_t nitems = static_cast<int64_t>(items.size());
  // Small problems run on the calling thread: a parallel region costs more than it saves there
  // (and far more when the machine is oversubscribed).
  const double work = static_cast<double>(nterms) * static_cast<double>(rows) *
                          static_cast<double>((g.OW + L - 1) / L) * static_cast<double>(N) +
                      static_cast<double>(g.C * g.S) * static_cast<double>(N) / L;
  if (work < kSerialWork || (N >= nthreads && nthreads > 1)) {
    // Images in parallel (or all on this thread), each thread with its own table (and scratch).
    auto images = [&](int64_t b, int64_t e) {
      const auto tbl = new_table();
      const auto scratch = new_scratch();
      for (int64_t n = b; n < e; ++n) {
        build_flag(n, tbl.get(), 0, g.C);
        UY* yimg = direct ? yp + n * yimg_stride : scratch.get();
        run_items(tbl.get(), yimg, 0, nitems);
        if (!direct) hand_over(n, yimg, 0, nruns);
      }
    };
    if (work < kSerialWork)
      images(0, N);
    else
      at::parallel_for(0, N, 1, images);
  } else {
    const auto tbl = new_table();
    const auto scratch = new_scratch();
    // Items' sizes (vectors x output channels): item_mid2[i] = twice the running total at item i's
    // middle; the last element is the total.
    std::vector<int64_t> item_mid2(nitems + 1);
    int64_t sum = 0;
    for (int64_t i = 0; i < nitems; ++i) {
      const int64_t size = items[i].rows * items[i].v * (items[i].o1 - items[i].o0);
      item_mid2[i] = 2 * sum + size;
      sum += size;
    }
    item_mid2[nitems] = sum;
    for (int64_t n = 0; n < N; ++n) {
      UY* yimg = direct ? yp + n * yimg_stride : scratch.get();
      // One parallel region per image, its three steps (table, items, hand-over) separated by
      // barriers: at batch 1 two more fork/joins per layer cost a few percent of a conv. Each
      // thread takes an equal share of each step (the nested case runs a team of one): of the table
      // and the hand-over by count, of the items by their vectors (consecutive items, so that a
      // thread's output channels' term lists stay in its own cache; few items of unequal sizes, as
      // column blocks of 5, 4 and 4 vectors, are uneven shares by count).
#pragma omp parallel num_threads(static_cast<int>(nthreads))
      {
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
        auto share = [&](int64_t total, auto f) {
          const int64_t b = total * t / T, e = total * (t + 1) / T;
          if (b < e) f(b, e);
        };
        share(g.C, [&](int64_t b, int64_t e) { build_flag(n, tbl.get(), b, e); });
#pragma omp barrier
        {
          // Item i goes to the thread whose share holds its middle: share k's first item is the
          // first whose middle (item_mid2[i] / 2) is at least total * k / T.
          const int64_t total = item_mid2[nitems];
          const auto first_of = [&](int64_t k) {
            return std::partition_point(item_mid2.begin(), item_mid2.begin() + nitems,
                                        [&](int64_t m) { return m * T < 2 * total * k; }) -
                   item_mid2.begin();
          };
          const int64_t b = first_of(t), e = first_of(t + 1);
          if (b < e) run_items(tbl.get(), yimg, b, e);
        }
        if (!direct) {
#pragma omp barrier
          share(nruns, [&](int64_t b, int64_t e) { hand_over(n, yimg, b, e); });
        }
      }
    }
  }
  (void)avx;
  return flag.load();
}

PlanView plan_view(const std::vector<torch::Tensor>& plan) {
  return PlanView{plan[0].data_ptr<int32_t>(), plan[1].data_ptr<int64_t>(), plan[2].data_ptr<int64_t>(),
                  plan[3].data_ptr<int32_t>()};
}

// U/S: table lanes and x's dtype; UY/SY: output lanes and dtype (int16 x -> int32 y, else the same).
template <typename U, typename S, typename UY, typename SY>
torch::Tensor conv_run(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                       const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                       std::vector<int64_t> pad, std::vector<int64_t> dil) {
  std::vector<int64_t> xs(x.sizes().begin(), x.sizes().end());
  const int64_t* layout = plan[4].data_ptr<int64_t>();  // [CB, NCB, flat, align_rows] (conv_plan)
  auto g = make_geom(xs, ws, stride, pad, dil, groups, layout[1], layout[2] != 0, layout[3] != 0);
  const int64_t N = xs[0];
  const torch::Tensor y =
      torch::empty({N, g.Cout, g.OD, g.OH, g.OW}, x.options().dtype(c10::CppTypeToScalarType<SY>::value));
  const U* xp = reinterpret_cast<const U*>(x.data_ptr<S>());
  UY* yp = reinterpret_cast<UY*>(y.data_ptr<SY>());
  const UY* bp = nullptr;
  if (bias.has_value() && bias->defined()) bp = reinterpret_cast<const UY*>(bias->data_ptr<SY>());
  const bool avx = use_avx2();
  const int64_t ximg_stride = g.C * g.D * g.H * g.W;
  auto build = [&](int64_t n, U* tbl, int64_t c0, int64_t c1) {
#ifdef DS_X86
    if (avx) return ds_avx2::build_table(xp + n * ximg_stride, tbl, g, c0, c1, ds_avx2::CopyIn<U>{});
#endif
    return ds_portable::build_table(xp + n * ximg_stride, tbl, g, c0, c1, ds_portable::CopyIn<U>{});
  };
  const int64_t yimg_stride = g.Cout * g.OD * g.OH * g.OW;
  auto copy = [&](int64_t n, int64_t dst, const UY* src, int64_t count) {  // flat mode's output rows
    std::memcpy(yp + n * yimg_stride + dst, src, count * sizeof(UY));
  };
  conv_drive<U, UY>(g, N, plan_view(plan), plan[0].numel(), bp, yp, build, copy);
  (void)avx;
  return y;
}

// x: (N, C, D, H, W) int32/int64 contiguous; ws: (Cout, Cin_g, KD, KH, KW); plan from conv_plan for
// this x shape and dtype; bias (Cout,) of x's dtype already shifted by -u, or None.
torch::Tensor conv(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                   const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                   std::vector<int64_t> pad, std::vector<int64_t> dil) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous() && ws.size() == 5, "bad x");
  TORCH_CHECK(plan.size() == 5, "bad plan");
  if (x.dtype() == torch::kInt16) {
    // The 8-bit fast path: the plan must come from conv_plan(elem_size 2, max_group <= 255) and
    // every |x| <= 128 (the caller checks); the output is int32.
    if (bias.has_value() && bias->defined())
      TORCH_CHECK(bias->dtype() == torch::kInt32 && bias->is_contiguous() && bias->numel() == ws[0], "bad bias");
    return conv_run<uint16_t, int16_t, uint32_t, int32_t>(x, ws, plan, bias, groups, stride, pad, dil);
  }
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dtype() == x.dtype() && bias->is_contiguous() && bias->numel() == ws[0], "bad bias");
  if (x.dtype() == torch::kInt32)
    return conv_run<uint32_t, int32_t, uint32_t, int32_t>(x, ws, plan, bias, groups, stride, pad, dil);
  TORCH_CHECK(x.dtype() == torch::kInt64, "x must be int16, int32 or int64");
  return conv_run<uint64_t, int64_t, uint64_t, int64_t>(x, ws, plan, bias, groups, stride, pad, dil);
}

// `conv` with int64 accumulators on a narrow table: x int16 (every |x| <= 128, a plan with
// max_group <= 255) or int32 (every |x| <= 2**15, max_group <= 65535), the caller checks; bias
// (Cout,) int64 or None; the output is int64, bit for bit `conv` of x as int64.
torch::Tensor conv_wide(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                        const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                        std::vector<int64_t> pad, std::vector<int64_t> dil) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous() && ws.size() == 5, "bad x");
  TORCH_CHECK(plan.size() == 5, "bad plan");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dtype() == torch::kInt64 && bias->is_contiguous() && bias->numel() == ws[0], "bad bias");
  if (x.dtype() == torch::kInt16)
    return conv_run<uint16_t, int16_t, uint64_t, int64_t>(x, ws, plan, bias, groups, stride, pad, dil);
  TORCH_CHECK(x.dtype() == torch::kInt32, "x must be int16 or int32");
  return conv_run<uint32_t, int32_t, uint64_t, int64_t>(x, ws, plan, bias, groups, stride, pad, dil);
}

// The fused paths' geometry: x may be (N, C, W), (N, C, H, W) or (N, C, D, H, W) (the missing dims
// are size 1); y gets x's rank.
struct FusedGeometry {
  Geom g;
  int64_t N;
  std::vector<int64_t> ys;  // the output's shape
};

FusedGeometry fused_geometry(const torch::Tensor& x, const std::vector<int64_t>& ws,
                             const std::vector<torch::Tensor>& plan, const std::vector<int64_t>& stride,
                             const std::vector<int64_t>& pad, const std::vector<int64_t>& dil, int64_t groups) {
  std::vector<int64_t> xs(x.sizes().begin(), x.sizes().end());
  const int64_t missing = 5 - x.dim();
  xs.insert(xs.begin() + 2, missing, 1);
  const int64_t* layout = plan[4].data_ptr<int64_t>();  // [CB, NCB, flat, align_rows] (conv_plan)
  auto g = make_geom(xs, ws, stride, pad, dil, groups, layout[1], layout[2] != 0, layout[3] != 0);
  std::vector<int64_t> ys{xs[0], g.Cout, g.OD, g.OH, g.OW};
  ys.erase(ys.begin() + 2, ys.begin() + 2 + missing);
  return {g, xs[0], ys};
}

// The fused paths' checks of the table's lanes against the input's range [lo, hi] and of the bias
// (Cout,), in output units: int32 for int32 accumulators (lanes 16 / 32: int16 / int32 tables), int64
// for int64 ones (lanes -16 / -32: int16 / int32 tables, conv_wide's); returns the bias's data, or null.
template <typename UY>
const UY* fused_table_checks(int64_t lanes, int64_t lo, int64_t hi, const c10::optional<torch::Tensor>& bias,
                             int64_t cout) {
  constexpr bool wide = sizeof(UY) == 8;
  TORCH_CHECK(wide ? (lanes == -16 || lanes == -32) : (lanes == 16 || lanes == 32),
              wide ? "lanes must be -16 or -32" : "lanes must be 16 or 32");
  TORCH_CHECK(lo <= hi && lo >= INT32_MIN && hi <= INT32_MAX, "bad fixed-point range");
  const int64_t narrow = lanes == 16 || lanes == -16 ? 128 : (int64_t(1) << 15);  // |q| the table sums exactly
  TORCH_CHECK(lanes == 32 || (lo >= -narrow && hi <= narrow), "the table's lanes do not hold the fixed-point range");
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dtype() == (wide ? torch::kInt64 : torch::kInt32) && bias->is_contiguous() &&
                  bias->numel() == cout,
              "bad bias");
  return reinterpret_cast<const UY*>(bias->data_ptr());
}

// An output run [dst, dst + count) of one image may span channels: f(offset in the run, length,
// channel) once per channel segment (plane: one channel's outputs).
template <typename Fn>
void for_channel_segments(int64_t dst, int64_t count, int64_t plane, Fn f) {
  int64_t c = dst / plane, at = dst - c * plane;  // index arithmetic
  for (int64_t i = 0; i < count; ++c, at = 0) {
    const int64_t k = std::min(count - i, plane - at);
    f(i, k, c);
    i += k;
  }
}

// A frozen conv layer's whole forward on float input, in one call: the table is built straight from
// x (rounding to fixed point on the way: build_table with QuantizeIn), the integer conv runs as `conv` does on int16
// (lanes 16; every |q| <= 128, which the caller guarantees through act_bits) or int32 (lanes 32)
// tables with int32 outputs, or as `conv_wide` does (lanes -16 / -32: int16 / int32 tables, int64
// outputs, for layers that need int64 accumulators), and each image's output is scaled by 2**exponent
// into x's dtype while still in cache (scale_run). Bit for bit `scale(conv(quantize(x)))`, without their intermediate
// tensors. x: (N, C, D, H, W) float32/float64 contiguous; bias (Cout,) int32 (int64 for lanes < 0)
// already shifted by -u.
// With affine = (scale, shift), contiguous (Cout,) of x's dtype, each scaled output value then goes
// through FrozenBatchNorm's forward, `+ residual` (y's shape and dtype, contiguous) if given and ReLU
// if relu, while still in cache (epilogue_run): bit for bit those torch operations on the layer's
// output (ShiftConvBatchNorm).
// Returns (y, whether x has a NaN; y is then garbage and the caller raises).
std::tuple<torch::Tensor, bool> conv_fused(const torch::Tensor& x, std::vector<int64_t> ws,
                                           const std::vector<torch::Tensor>& plan,
                                           const c10::optional<torch::Tensor>& bias, int64_t groups,
                                           std::vector<int64_t> stride, std::vector<int64_t> pad,
                                           std::vector<int64_t> dil, int64_t frac_bits, int64_t lo, int64_t hi,
                                           bool floor_mode, int64_t lanes, int64_t exponent,
                                           const c10::optional<std::vector<torch::Tensor>>& affine,
                                           const c10::optional<torch::Tensor>& residual, bool relu) {
  // x may also be (N, C, W) or (N, C, H, W): the missing dims are size 1, and y has x's rank.
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5 && x.is_contiguous() && ws.size() == 5 && plan.size() == 5,
              "bad x / plan");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kFloat64, "x must be float32/float64");
  const bool wide = lanes < 0;  // int64 accumulators
  const void* bp = wide ? static_cast<const void*>(fused_table_checks<uint64_t>(lanes, lo, hi, bias, ws[0]))
                        : static_cast<const void*>(fused_table_checks<uint32_t>(lanes, lo, hi, bias, ws[0]));
  if (affine.has_value()) {
    const auto& a = *affine;
    TORCH_CHECK(a.size() == 2, "affine must be (scale, shift)");
    for (const auto& t : a)
      TORCH_CHECK(t.dtype() == x.dtype() && t.is_contiguous() && t.numel() == ws[0] && t.device().is_cpu(),
                  "affine scale / shift must be contiguous (Cout,) CPU tensors of x's dtype");
  }
  const auto fg = fused_geometry(x, ws, plan, stride, pad, dil, groups);
  const Geom& g = fg.g;
  const int64_t N = fg.N;
  auto y = torch::empty(fg.ys, x.options());
  const bool has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(affine.has_value() || (!has_res && !relu), "residual / relu need the affine");
  if (has_res)
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->dtype() == x.dtype() && residual->is_contiguous() &&
                    residual->device().is_cpu(),
                "residual must be a contiguous CPU tensor of the output's shape and x's dtype");
  const QuantSpec qs{std::ldexp(1.0, static_cast<int>(frac_bits)), static_cast<double>(lo),
                     static_cast<double>(hi), floor_mode, lo >= -(int64_t(1) << 24) && hi <= (int64_t(1) << 24)};
  const int64_t ximg_stride = g.C * g.D * g.H * g.W;
  const int64_t yimg_stride = g.Cout * g.OD * g.OH * g.OW;
  const bool avx = use_avx2();
  auto go = [&](auto* xp, auto* op, auto table_tag, auto acc_tag) {
    using U = decltype(table_tag);
    using UY = decltype(acc_tag);
    using F = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    using FO = std::remove_pointer_t<decltype(op)>;
    auto build = [&](int64_t n, U* tbl, int64_t c0, int64_t c1) {
#ifdef DS_X86
      if (avx) return ds_avx2::build_table(xp + n * ximg_stride, tbl, g, c0, c1, ds_avx2::QuantizeIn<U, F>{qs});
#endif
      return ds_portable::build_table(xp + n * ximg_stride, tbl, g, c0, c1, ds_portable::QuantizeIn<U, F>{qs});
    };
    const FO* sp = affine.has_value() ? (*affine)[0].data_ptr<FO>() : nullptr;
    const FO* hp = affine.has_value() ? (*affine)[1].data_ptr<FO>() : nullptr;
    const FO* rp = has_res ? residual->data_ptr<FO>() : nullptr;
    const int64_t plane = g.OD * g.OH * g.OW;
    auto epilogue = [&](FO* out, int64_t k, int64_t c, const FO* r) {
#ifdef DS_X86
      if (avx) {
        if (relu) return ds_avx2::epilogue_run<true>(out, out, k, sp[c], hp[c], r);
        return ds_avx2::epilogue_run<false>(out, out, k, sp[c], hp[c], r);
      }
#endif
      if (relu) return ds_portable::epilogue_run<true>(out, out, k, sp[c], hp[c], r);
      return ds_portable::epilogue_run<false>(out, out, k, sp[c], hp[c], r);
    };
    // `rows` runs of `count` values (at stride src_stride in src), consecutive in the output from dst.
    const OutScale scale(static_cast<int>(exponent));
    auto scale_to = [&](const UY* src, FO* out, int64_t count) {
#ifdef DS_X86
      if (avx) return ds_avx2::scale_run<FO, UY>(src, out, count, scale);
#endif
      ds_portable::scale_run<FO, UY>(src, out, count, scale);
    };
    auto finish = [&](int64_t n, int64_t dst, const UY* src, int64_t count, int64_t rows = 1,
                      int64_t src_stride = 0) {
      FO* out = op + n * yimg_stride + dst;
      const FO* r = rp ? rp + n * yimg_stride + dst : nullptr;
      if (rows > 1) {  // one channel's rows (conv_drive's flat mode): one epilogue call for them
        for (int64_t j = 0; j < rows; ++j) scale_to(src + j * src_stride, out + j * count, count);
        if (sp) epilogue(out, count * rows, dst / plane, r);
        return;
      }
      if (!sp) return scale_to(src, out, count);
      // The run may span channels: each channel segment scaled, then its epilogue in place while
      // the segment is still in L1 (a whole image's scaled output first, then the epilogues, read
      // it back from L2).
      for_channel_segments(dst, count, plane, [&](int64_t i, int64_t k, int64_t c) {
        scale_to(src + i, out + i, k);
        epilogue(out + i, k, c, r ? r + i : nullptr);
      });
    };
    return conv_drive<U, UY>(g, N, plan_view(plan), plan[0].numel(), static_cast<const UY*>(bp), nullptr, build,
                             finish);
  };
  auto by_lanes = [&](auto* xp, auto* op) {
    switch (lanes) {
      case 16: return go(xp, op, uint16_t{}, uint32_t{});
      case 32: return go(xp, op, uint32_t{}, uint32_t{});
      case -16: return go(xp, op, uint16_t{}, uint64_t{});
      default: return go(xp, op, uint32_t{}, uint64_t{});
    }
  };
  const bool nan = x.dtype() == torch::kFloat32 ? by_lanes(x.data_ptr<float>(), y.data_ptr<float>())
                                                : by_lanes(x.data_ptr<double>(), y.data_ptr<double>());
  (void)avx;
  return std::make_tuple(y, nan);
}

// An integer-only model's conv layer in one call (deepshift::int_conv's CPU kernel): int32 or int64 x,
// requantised to the layer's input range while the table is built (RequantIn: round_shift by in_shift,
// clamp to [in_lo, in_hi]), the conv on int32 lanes (lanes 16: int16 table, |q| <= 128), then each
// output run, with epilogue (signs given), taken from the int32 sums through int_epilogue (BatchNorm
// as shifts, residual, clamp: in int64) while in cache, else converted. The result and the residual
// have x's dtype. bias: int32 (Cout,) in output units, or None. Bit for bit
// int_epilogue(shift_conv(int_epilogue(x, requantise)), ...) as the reference composes them.
torch::Tensor conv_int_fused(const torch::Tensor& x, std::vector<int64_t> ws, const std::vector<torch::Tensor>& plan,
                             const c10::optional<torch::Tensor>& bias, int64_t groups, std::vector<int64_t> stride,
                             std::vector<int64_t> pad, std::vector<int64_t> dil, int64_t in_shift, int64_t in_lo,
                             int64_t in_hi, int64_t lanes, const c10::optional<torch::Tensor>& signs,
                             const c10::optional<torch::Tensor>& lefts, const c10::optional<torch::Tensor>& ebias,
                             const c10::optional<torch::Tensor>& rights, int64_t pre,
                             const c10::optional<torch::Tensor>& residual, int64_t residual_shift, int64_t lo,
                             int64_t hi) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5 && x.is_contiguous() &&
                  (x.dtype() == torch::kInt64 || x.dtype() == torch::kInt32) && ws.size() == 5 && plan.size() == 5,
              "bad x / plan");
  const uint32_t* bp = fused_table_checks<uint32_t>(lanes, in_lo, in_hi, bias, ws[0]);
  const auto fg = fused_geometry(x, ws, plan, stride, pad, dil, groups);
  const Geom& g = fg.g;
  const int64_t N = fg.N;
  auto y = torch::empty(fg.ys, x.options());
  std::unique_ptr<IntEpilogue> ep;
  if (signs.has_value() && signs->defined()) {
    TORCH_CHECK(lefts.has_value() && rights.has_value(), "the epilogue needs signs, lefts and rights");
    ep = std::make_unique<IntEpilogue>(*signs, *lefts, ebias, *rights, pre, residual_shift, lo, hi);
    TORCH_CHECK(ep->C == 1 || ep->C == g.Cout, "the epilogue's channels must be the output's");
  }
  const bool has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_res || ep, "a residual needs the epilogue");
  if (has_res)
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->dtype() == x.dtype() && residual->is_contiguous(),
                "residual must be contiguous, of the output's shape and x's dtype");
  const int64_t ximg_stride = g.C * g.D * g.H * g.W;
  const int64_t yimg_stride = g.Cout * g.OD * g.OH * g.OW;
  const int64_t plane = g.OD * g.OH * g.OW;
  const bool avx = use_avx2();
  auto go = [&](auto table_tag, auto x_tag) {
    using U = decltype(table_tag);
    using X = decltype(x_tag);
    const X* xp = x.data_ptr<X>();
    X* op = y.data_ptr<X>();
    const X* rp = has_res ? residual->data_ptr<X>() : nullptr;
    auto build = [&](int64_t n, U* tbl, int64_t c0, int64_t c1) {
#ifdef DS_X86
      if (avx)
        return ds_avx2::build_table(xp + n * ximg_stride, tbl, g, c0, c1, ds_avx2::RequantIn<U, X>{in_shift, in_lo, in_hi});
#endif
      return ds_portable::build_table(xp + n * ximg_stride, tbl, g, c0, c1,
                                      ds_portable::RequantIn<U, X>{in_shift, in_lo, in_hi});
    };
    // `rows` runs of `count` values (at stride src_stride in src), consecutive in the output from dst.
    auto finish = [&](int64_t n, int64_t dst, const uint32_t* src, int64_t count, int64_t rows = 1,
                      int64_t src_stride = 0) {
      X* out = op + n * yimg_stride + dst;
      const int32_t* sums = reinterpret_cast<const int32_t*>(src);  // the int32 accumulators
      if (!ep) {
        for (int64_t j = 0; j < rows; ++j)
          for (int64_t i = 0; i < count; ++i) out[j * count + i] = sums[j * src_stride + i];  // sign-extended
        return;
      }
      const X* r = rp ? rp + n * yimg_stride + dst : nullptr;
      if (rows > 1) {  // rows of one channel (conv_drive's flat mode)
        const int64_t c = ep->C > 1 ? dst / plane : 0;
        ep->apply_rows(sums, src_stride, out, count, rows, count, c, r, avx);
        return;
      }
      // The run may span channels: one epilogue per channel segment, still in cache.
      for_channel_segments(dst, count, plane, [&](int64_t i, int64_t k, int64_t c) {
        ep->apply(sums + i, out + i, k, ep->C > 1 ? c : 0, r ? r + i : nullptr, avx);
      });
    };
    conv_drive<U, uint32_t>(g, N, plan_view(plan), plan[0].numel(), bp, nullptr, build, finish);
  };
  const bool wide = x.dtype() == torch::kInt64;
  if (lanes == 16) wide ? go(uint16_t{}, int64_t{}) : go(uint16_t{}, int32_t{});
  else wide ? go(uint32_t{}, int64_t{}) : go(uint32_t{}, int32_t{});
  (void)avx;
  return y;
}

}  // namespace deepshift_cpu
