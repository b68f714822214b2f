// Mean and sum of squared deviations (M2) of a set of values, and the merge of two sets
// (Chan, Golub and LeVeque): the per-feature statistics of BatchNorm, exact in one pass over each
// part of the batch, merged in a fixed order. V may be a scalar or a vector type; the counts are
// scalars (every lane of a vector covers the same rows), and welford_merge needs both positive.
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

template <typename V, typename S>
FUSED_MLP_HD WelfordState<V, S> welford_merge(const WelfordState<V, S>& a, const WelfordState<V, S>& b) {
  const S count = a.count + b.count;
  const S b_share = b.count / count;
  const V delta = b.mean - a.mean;
  return {a.mean + delta * V(b_share), a.m2 + b.m2 + delta * delta * V(a.count * b_share), count};
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
