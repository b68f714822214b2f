// Mean and sum of squared deviations (M2) of a set of values, and the merge of two sets
// (Chan, Golub and LeVeque): the per-feature statistics of BatchNorm, exact in one pass over each
// part of the batch, merged in a fixed order. welford_merge needs both counts positive.
#pragma once

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

template <typename V, typename S>
struct WelfordState {
  V mean;
  V m2;
  S count;
};

// Whether x is finite (inf - inf and NaN - NaN are NaN, which equals nothing).
template <typename V>
FUSED_MLP_HD bool welford_finite(V x) {
  return (x - x) == (x - x);
}

// With an inf or NaN in either part, its mean is not finite: the merged mean is then what a plain
// sum gives (inf with finite values stays inf, +inf with -inf or NaN is NaN), as stock BatchNorm's
// mean on the CPU; the update through delta would turn every inf into NaN. M2 is NaN in that part.
// V is a scalar.
template <typename V, typename S>
FUSED_MLP_HD WelfordState<V, S> welford_merge(const WelfordState<V, S>& a, const WelfordState<V, S>& b) {
  const S count = a.count + b.count;
  const S b_share = b.count / count;
  const V delta = b.mean - a.mean;
  const V mean = welford_finite(a.mean) && welford_finite(b.mean) ? a.mean + delta * V(b_share) : a.mean + b.mean;
  return {mean, a.m2 + b.m2 + delta * delta * V(a.count * b_share), count};
}

// The same merge where either part may be empty (count 0): a thread that saw no rows.
template <typename V, typename S>
FUSED_MLP_HD WelfordState<V, S> welford_merge_or_empty(const WelfordState<V, S>& a, const WelfordState<V, S>& b) {
  if (b.count == S(0)) return a;
  if (a.count == S(0)) return b;
  return welford_merge(a, b);
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
