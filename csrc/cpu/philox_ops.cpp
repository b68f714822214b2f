// The dropout generator as ops of its own, so tests can hold the C++ code to Random123's
// known-answer vectors and to fused_mlp.reference's torch implementation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <vector>

#include "common/philox.h"
#include "cpu/dropout_mask.h"
#include "cpu/kernels.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN
namespace {

// counter: (n, 4) int64 holding 32-bit words; key: (2,) int64 holding 32-bit words.
at::Tensor philox4x32_10_cpu(const at::Tensor& counter_, const at::Tensor& key_) {
  TORCH_CHECK(counter_.dim() == 2 && counter_.size(1) == 4 && counter_.scalar_type() == at::kLong,
              "fused_mlp::philox4x32_10: counter must be an int64 tensor of shape (n, 4)");
  TORCH_CHECK(key_.numel() == 2 && key_.scalar_type() == at::kLong,
              "fused_mlp::philox4x32_10: key must be an int64 tensor of 2 elements");
  const at::Tensor counter = counter_.contiguous(), key = key_.contiguous();
  at::Tensor out = at::empty_like(counter);
  const int64_t* c = counter.const_data_ptr<int64_t>();
  const int64_t* k = key.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (const auto i : c10::irange(counter.size(0))) {
    Philox4x32 ctr;
    for (int j = 0; j < 4; ++j) ctr.v[j] = static_cast<uint32_t>(c[i * 4 + j]);
    const Philox4x32 r = philox4x32_10(ctr, static_cast<uint32_t>(k[0]), static_cast<uint32_t>(k[1]));
    for (int j = 0; j < 4; ++j) o[i * 4 + j] = r.v[j];
  }
  return out;
}

// The keep mask of elements [start, start + numel) as the fused kernels generate it (batched).
at::Tensor dropout_mask_cpu(const at::Tensor& seed_offset_, int64_t numel, double p, int64_t start) {
  TORCH_CHECK(seed_offset_.numel() == 2 && seed_offset_.scalar_type() == at::kLong,
              "fused_mlp::dropout_mask: seed_offset must be an int64 tensor (seed, offset)");
  TORCH_CHECK(numel >= 0 && start >= 0, "fused_mlp::dropout_mask: numel and start must be >= 0");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fused_mlp::dropout_mask: p must be in [0, 1), got ", p);
  const at::Tensor so = seed_offset_.contiguous();
  const int64_t* s = so.const_data_ptr<int64_t>();
  std::vector<float> mult(numel);
  dropout_multipliers<float>(static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), static_cast<uint64_t>(start),
                             numel, static_cast<float>(p), 1.0f, mult.data());
  at::Tensor out = at::empty({numel}, so.options().dtype(at::kBool));
  bool* o = out.mutable_data_ptr<bool>();
  for (const auto i : c10::irange(numel)) o[i] = mult[i] != 0.0f;
  return out;
}

}  // namespace
FUSED_MLP_ISA_END

const DropoutKernels& FUSED_MLP_THIS_CPU_VARIANT(dropout_kernels)() {
  static constexpr DropoutKernels kernels{&philox4x32_10_cpu, &dropout_mask_cpu};
  return kernels;
}

}  // namespace fused_mlp::cpu
