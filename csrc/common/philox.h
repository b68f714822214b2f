// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind every dropout mask of fused_mlp, on every backend.
//
// The mapping from (seed, offset, element index i) to a keep / drop decision is fixed here, once:
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = ((i / 4) low 32 bits, (i / 4) high 32 bits, offset low 32 bits, offset high 32 bits)
//   word    = output word i % 4 of philox4x32_10(counter, key)
//   keep    = (word >> 8) * 2^-24 >= p
// fused_mlp/reference.py implements the same mapping in torch integer ops, on any device.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
}  // namespace philox_detail

// One block of four 32-bit words.
FUSED_MLP_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.v[2];
    ctr = Philox4x32{{static_cast<uint32_t>(p1 >> 32) ^ ctr.v[1] ^ key0, static_cast<uint32_t>(p1),
                      static_cast<uint32_t>(p0 >> 32) ^ ctr.v[3] ^ key1, static_cast<uint32_t>(p0)}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// The counter of the block that holds element `index`'s word.
FUSED_MLP_HD Philox4x32 dropout_counter(uint64_t index, uint64_t offset) {
  const uint64_t block = index / 4;
  return Philox4x32{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(offset),
                     static_cast<uint32_t>(offset >> 32)}};
}

// keep iff the word's top 24 bits, as a fraction of 2^24, are >= p.
FUSED_MLP_HD bool dropout_keep(uint32_t word, float p) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f) >= p;
}

// The keep decision of element `index` alone (kernels generate four at a time).
FUSED_MLP_HD bool dropout_keep_element(uint64_t seed, uint64_t offset, uint64_t index, float p) {
  const Philox4x32 r =
      philox4x32_10(dropout_counter(index, offset), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return dropout_keep(r.v[index % 4], p);
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
