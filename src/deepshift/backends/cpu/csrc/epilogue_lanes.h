// The integer-only models' epilogue arithmetic on a vector of int64 lanes (GCC vector types UV / IV
// of any width): included, like kernels.h, once per instruction-set region (common.h's namespaces and
// epilogue512.cpp), so that each copy is compiled for its ISA. No include guard, on purpose.
//
// For the lanes v of one channel: s = bias + sum_k (ns[k] ? -1 : 1) * (v << ls[k]) (wrapping sums,
// which commute, so adding or subtracting each term gives the reference's bits), then round_shift(s,
// right): to nearest, ties to even, for right > 0 (half = 2**(right-1) - 1), a left shift for
// right <= 0. The channel's signs are fixed: a predictable branch, not a negation per lane.
template <typename UV, typename IV>
inline IV epilogue_lanes(UV v, int kk, const int64_t* ls, const bool* ns, uint64_t bias, int64_t right,
                         uint64_t half) {
  UV sum = UV{} + bias;
  for (int k = 0; k < kk; ++k) {
    const UV t = v << ls[k];
    if (ns[k]) sum -= t;
    else sum += t;
  }
  if (right > 0) {
    const UV odd = (sum >> right) & 1;  // bit `right` of the sum: the kept value's lowest bit
    return reinterpret_cast<IV>(sum + (odd + half)) >> right;
  }
  return reinterpret_cast<IV>(sum << -right);
}

// A channel's left shifts and signs as locals, for epilogue_lanes: stores through the may_alias
// vectors would otherwise make the compiler reload them at every step. Vector loops take at most 8.
struct EpilogueTerms {
  int64_t ls[8];
  bool ns[8];
  int kk;
  EpilogueTerms(int k, const int64_t* left, const int64_t* neg) : kk(k) {
    for (int i = 0; i < k && i < 8; ++i) ls[i] = left[i], ns[i] = neg[i] != 0;
  }
};
