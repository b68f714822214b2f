// Vectorized loads and stores that widen every floating dtype to its accumulation type:
// float, double, and float16 / bfloat16 widened to float. The CPU kernels are written once
// against these and at::vec::Vectorized<acc_t>.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/host_device.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN

// ReLU as torch.relu computes it: negative values become +0; NaN, +inf and -0 pass unchanged.
// (at::vec::maximum(y, 0) turns -0 into +0; a plain max with the operands the other way round
// turns NaN into 0.)
template <typename Vec>
inline Vec relu(const Vec& y) {
  return Vec::blendv(y, Vec(0), y < Vec(0));
}

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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace exp_detail {
// exp(d) = 2^n exp(r), n = round(d / ln 2), r = d - n ln 2 in two steps (ln 2 = kLn2Hi + kLn2Lo,
// kLn2Hi short enough that n * kLn2Hi is exact), so |r| <= ln 2 / 2; exp(r) by a degree-5
// polynomial fitted to that interval (1.4 ulp), 2 ulp in all.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[] = {0.00828929059f, 0.0418978221f, 0.166676521f, 0.499991506f, 0.999999701f, 1.0f};
}  // namespace exp_detail
#endif

// exp of a float vector whose lanes are <= 0 (up to rounding): what the cross-entropy kernels take
// the exponential of, x - max or x - logsumexp. About half the instructions of a general exp: no
// overflow handling (+inf gives NaN), and lanes below float's range (-inf included) give 0. NaN
// gives NaN, which is how the forward finds a NaN logit.
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  using namespace exp_detail;
  // Below -104 even the smallest subnormal rounds to 0; clamping keeps r finite for -inf. maxps
  // returns its second operand when either is NaN: v, so NaN goes through.
  const __m512 d = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), d);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  return _mm512_scalef_ps(p, n);  // p * 2^n, rounding to a subnormal or 0 below float's range
#elif defined(CPU_CAPABILITY_AVX2)
  using namespace exp_detail;
  // Down to -87.3, 2^n stays a normal float; below, the result is taken as 0.
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 d = _mm256_max_ps(lowest, v);  // NaN goes through, as above
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(d, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), d);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[i]));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
  return _mm256_andnot_ps(_mm256_cmp_ps(v, lowest, _CMP_LT_OQ), result);
#else
  return v.exp_u20();  // the baseline build: the C library's exp, lane by lane
#endif
}

// exp of a vector of x - max or x - logsumexp: exp_nonpositive for float, the library's for double.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vec_exp(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_nonpositive(v);
  } else {
    return v.exp();
  }
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp::cpu
