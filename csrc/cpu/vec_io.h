// Vectorized loads and stores that widen every floating dtype to its accumulation type:
// float, double, and float16 / bfloat16 widened to float. The CPU kernels are written once
// against these and at::vec::Vectorized<acc_t>.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr bool kReduced = !std::is_same_v<acc_t, scalar_t>;

  // Loads kWidth elements.
  static Vec load(const scalar_t* p) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    } else {
      return Vec::loadu(p);
    }
  }

  // Loads n < kWidth elements; the remaining lanes are zero.
  static Vec load(const scalar_t* p, int64_t n) {
    if constexpr (kReduced) {
      scalar_t buf[kWidth] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
      return load(buf);
    } else {
      return Vec::loadu(p, n);
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t n = kWidth) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
    } else {
      v.store(p, n);
    }
  }
};

// exp of a vector: the fast polynomial for float (about 20 ulp), the library one for double.
// Neither is relied on for NaN or +inf arguments: the kernels handle non-finite rows themselves.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vec_exp(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp::cpu
