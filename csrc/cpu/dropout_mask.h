// Dropout masks on the CPU: the Philox mapping of csrc/common/philox.h, many blocks at a time.
// With AVX-512 (AVX2), sixteen (eight) Philox blocks run in the lanes of one register; the
// 32x32 -> 64-bit products come from vpmuludq on the even and the odd lanes. Without either,
// the scalar function of csrc/common/philox.h runs block by block. All paths give the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "common/host_device.h"
#include "common/philox.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN

// keep iff (word >> 8) >= threshold: the integer form of (word >> 8) * 2^-24 >= p, exact since
// both sides scale by a power of two.
inline uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
}

#if defined(CPU_CAPABILITY_AVX512)
namespace philox_simd {
constexpr int kLanes = 16;
using V = __m512i;
inline V set1(uint32_t v) {
  return _mm512_set1_epi32(static_cast<int>(v));
}
inline V xor3(V a, V b, V c) {
  return _mm512_xor_si512(_mm512_xor_si512(a, b), c);
}
// hi and lo 32 bits of a * m in each lane.
inline void mulhilo(V a, V m, V& hi, V& lo) {
  const V even = _mm512_mul_epu32(a, m);
  const V odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline V add(V a, V b) {
  return _mm512_add_epi32(a, b);
}
inline V iota() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
// hi + 1 in the lanes where lo_sum = lo + (something) wrapped below lo.
inline V add_carry(V hi, V lo_sum, V lo) {
  return _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(lo_sum, lo), hi, _mm512_set1_epi32(1));
}
inline void store(uint32_t* p, V v) {
  _mm512_storeu_si512(p, v);
}
}  // namespace philox_simd
#elif defined(CPU_CAPABILITY_AVX2)
namespace philox_simd {
constexpr int kLanes = 8;
using V = __m256i;
inline V set1(uint32_t v) {
  return _mm256_set1_epi32(static_cast<int>(v));
}
inline V xor3(V a, V b, V c) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}
inline void mulhilo(V a, V m, V& hi, V& lo) {
  const V even = _mm256_mul_epu32(a, m);
  const V odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline V add(V a, V b) {
  return _mm256_add_epi32(a, b);
}
inline V iota() {
  return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
}
inline V add_carry(V hi, V lo_sum, V lo) {
  const V sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned compare via signed
  const V wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(lo_sum, sign));
  return _mm256_sub_epi32(hi, wrapped);  // wrapped lanes are -1
}
inline void store(uint32_t* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<V*>(p), v);
}
}  // namespace philox_simd
#endif

// The four output words of G runs of kLanes consecutive Philox blocks, run g starting at block0[g]:
// words[g][w][l] = word w of block block0[g] + l. The G runs go through the ten rounds together:
// independent chains that keep the multipliers busy while each one waits on its own products.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <int G>
inline void philox_blocks(uint64_t seed, uint64_t offset, const uint64_t* block0,
                          uint32_t (*words)[4][philox_simd::kLanes]) {
  using namespace philox_simd;
  using namespace philox_detail;
  V c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    // Counter words 0 and 1: the block index block0 + lane, its low half formed in the vector and
    // any wrap past 2^32 carried into the high half (vector ops only: assembling the lanes through
    // memory would stall on store forwarding).
    const V base_lo = set1(static_cast<uint32_t>(block0[g])), base_hi = set1(static_cast<uint32_t>(block0[g] >> 32));
    const V start = add(base_lo, iota());
    c0[g] = start;
    c1[g] = add_carry(base_hi, start, base_lo);
    c2[g] = set1(static_cast<uint32_t>(offset));
    c3[g] = set1(static_cast<uint32_t>(offset >> 32));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const V m0 = set1(kMul0), m1 = set1(kMul1);
  for (int round = 0; round < 10; ++round) {
    const V key0 = set1(k0), key1 = set1(k1);
    for (int g = 0; g < G; ++g) {
      V hi0, lo0, hi1, lo1;
      mulhilo(c0[g], m0, hi0, lo0);
      mulhilo(c2[g], m1, hi1, lo1);
      c0[g] = xor3(hi1, c1[g], key0);
      c1[g] = lo1;
      c2[g] = xor3(hi0, c3[g], key1);
      c3[g] = lo0;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  for (int g = 0; g < G; ++g) {
    store(words[g][0], c0[g]);
    store(words[g][1], c1[g]);
    store(words[g][2], c2[g]);
    store(words[g][3], c3[g]);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The float multipliers of the 64 elements of 16 blocks, in element order: element 4 l + w takes
// word w of block l, so the four word vectors are interleaved by a 4 x 16 transpose.
inline void multipliers64(const uint32_t (*words)[16], uint32_t threshold, float scale, float* out) {
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 s = _mm512_set1_ps(scale);
  __m512 f[4];
  for (int w = 0; w < 4; ++w) {
    const __m512i top24 = _mm512_srli_epi32(_mm512_loadu_si512(words[w]), 8);
    f[w] = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(top24, t), s);
  }
  // Within each 128-bit lane k (blocks 4k .. 4k + 3): b_j = the four words of block 4k + j.
  const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  const __m512 a0 = _mm512_unpacklo_ps(f[0], f[1]), a1 = _mm512_unpackhi_ps(f[0], f[1]);
  const __m512 a2 = _mm512_unpacklo_ps(f[2], f[3]), a3 = _mm512_unpackhi_ps(f[2], f[3]);
  const __m512 b0 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a0), pd(a2)));
  const __m512 b1 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a0), pd(a2)));
  const __m512 b2 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a1), pd(a3)));
  const __m512 b3 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a1), pd(a3)));
  // Then a 4 x 4 transpose of 128-bit lanes: output vector k = blocks 4k .. 4k + 3.
  const __m512 c0 = _mm512_shuffle_f32x4(b0, b1, 0x44), c1 = _mm512_shuffle_f32x4(b0, b1, 0xEE);
  const __m512 c2 = _mm512_shuffle_f32x4(b2, b3, 0x44), c3 = _mm512_shuffle_f32x4(b2, b3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(c0, c2, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(c0, c2, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(c1, c3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(c1, c3, 0xDD));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Runs of 64 elements taken kRunGroup at a time by the AVX-512 float paths.
constexpr int kRunGroup = 4;
constexpr int64_t kRun = 4 * philox_simd::kLanes;  // 64 elements: 16 blocks

// The float multipliers of G runs of 64 elements, run g starting at element first[g] (a multiple
// of 4), written to out[g] .. out[g] + 63.
template <int G>
inline void multiplier_runs(uint64_t seed, uint64_t offset, const uint64_t* first, uint32_t threshold, float scale,
                            float* const* out) {
  alignas(64) uint32_t words[G][4][philox_simd::kLanes];
  uint64_t block0[G];
  for (int g = 0; g < G; ++g) block0[g] = first[g] / 4;
  philox_blocks<G>(seed, offset, block0, words);
  for (int g = 0; g < G; ++g) multipliers64(words[g], threshold, scale, out[g]);
}
#endif

// out[k] = scale if element begin + k is kept, else 0, for k in [0, n).
template <typename T>
void dropout_multipliers(uint64_t seed, uint64_t offset, uint64_t begin, int64_t n, float p, T scale, T* out) {
  if (n <= 0) return;
  const uint64_t end = begin + static_cast<uint64_t>(n);
  const uint32_t threshold = dropout_threshold(p);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int kLanes = philox_simd::kLanes;
  uint64_t block0 = begin / 4;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (begin % 4 == 0) {  // whole runs of 64, four at a time
      for (; (block0 + kRunGroup * kLanes) * 4 <= end; block0 += kRunGroup * kLanes) {
        uint64_t first[kRunGroup];
        float* dst[kRunGroup];
        for (int g = 0; g < kRunGroup; ++g) {
          first[g] = (block0 + g * kLanes) * 4;
          dst[g] = out + (first[g] - begin);
        }
        multiplier_runs<kRunGroup>(seed, offset, first, threshold, scale, dst);
      }
    }
  }
#endif
  alignas(64) uint32_t words[1][4][kLanes];
  for (; block0 * 4 < end; block0 += kLanes) {
    philox_blocks<1>(seed, offset, &block0, words);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      if (block0 * 4 >= begin && (block0 + kLanes) * 4 <= end) {
        multipliers64(words[0], threshold, scale, out + (block0 * 4 - begin));
        continue;
      }
    }
#endif
    const uint64_t first = std::max(begin, block0 * 4);
    const uint64_t last = std::min(end, (block0 + kLanes) * 4);
    for (uint64_t i = first; i < last; ++i) {
      out[i - begin] = (words[0][i % 4][i / 4 - block0] >> 8) >= threshold ? scale : T(0);
    }
  }
#else
  for (uint64_t block = begin / 4; block * 4 < end; ++block) {
    const Philox4x32 r = philox4x32_10(dropout_counter(block * 4, offset), static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32));
    const uint64_t first = std::max(begin, block * 4), last = std::min(end, block * 4 + 4);
    for (uint64_t i = first; i < last; ++i) out[i - begin] = (r.v[i % 4] >> 8) >= threshold ? scale : T(0);
  }
#endif
}

// The multipliers of `rows` spans of n elements, span r starting at element begin + r * stride,
// into out[r * n + k]: the backward's rows of one feature block. With AVX-512, float, and spans
// made of whole aligned runs of 64, runs of four rows go through Philox together.
template <typename T>
void dropout_multipliers_rows(uint64_t seed, uint64_t offset, uint64_t begin, uint64_t stride, int64_t rows, int64_t n,
                              float p, T scale, T* out) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (begin % 4 == 0 && stride % 4 == 0 && n % kRun == 0) {
      const uint32_t threshold = dropout_threshold(p);
      for (; r + kRunGroup <= rows; r += kRunGroup) {
        for (int64_t k = 0; k < n; k += kRun) {
          uint64_t first[kRunGroup];
          float* dst[kRunGroup];
          for (int g = 0; g < kRunGroup; ++g) {
            first[g] = begin + static_cast<uint64_t>(r + g) * stride + static_cast<uint64_t>(k);
            dst[g] = out + (r + g) * n + k;
          }
          multiplier_runs<kRunGroup>(seed, offset, first, threshold, scale, dst);
        }
      }
    }
  }
#endif
  for (; r < rows; ++r)
    dropout_multipliers<T>(seed, offset, begin + static_cast<uint64_t>(r) * stride, n, p, scale, out + r * n);
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp::cpu
