// The GEMMs of the CPU kernels (csrc/cpu/gemm.cpp): owned float32 micro-kernels on AVX2 and AVX-512,
// ATen's GEMM otherwise. Declared in each instruction set's namespace, so a kernel file calls its
// own variant's; csrc/cpu_dispatch.cpp reaches them through the GemmKernels table.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/host_device.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN

// input (M x K) times weight^T (weight: N x K, row-major or held column by column), plus bias (N): a
// Linear's forward.
at::Tensor gemm_nt(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Told of each block of a forward's float32 output as soon as the owned outer-product kernel has
// stored it, while it is still in cache: rows [row0, row0 + rows) by columns [col, col + cols), at c
// (row stride ldc). The blocks are row_block rows tall (the last one fewer) and cover the output
// once, each block told once, from whichever thread computed it. `seen` is set when the kernel tells
// it of the blocks (the forward taken transposed, for 32 to 64 rows on a row-major weight of 512
// rows or more, tells it too); where another kernel runs (ATen's or oneDNN's; the inner-product
// kernel, for a row-major weight below 64 rows otherwise) or the product makes too few blocks to
// share among the threads, it is not told, and `seen` stays false.
struct BlockObserver {
  int64_t row_block;
  void (*on_block)(void* context, const float* c, int64_t ldc, int64_t row0, int64_t rows, int64_t col, int64_t cols);
  void* context;
  bool seen;
};
// gemm_nt, telling the observer of each block of the output where the kernel can.
at::Tensor gemm_nt_observed(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            BlockObserver& observer);
// relu(input weight^T + bias): the ReLU in the owned kernels' epilogue, else torch.relu in place.
at::Tensor gemm_nt_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// a (M x R) times b (R x N): a Linear's input gradient, dz W.
at::Tensor gemm_nn(const at::Tensor& a, const at::Tensor& b);
// a^T (a: R x M) times b (R x N): a Linear's weight gradient, dz^T x.
at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b);

FUSED_MLP_ISA_END

// input weight^T + bias through oneDNN's matmul (torch's mkldnn::_linear_pointwise, no post-op:
// oneDNN's ReLU maps NaN to 0, torch.relu does not); undefined when the op is missing or refuses
// the call. Compiled once, in the baseline build (csrc/cpu_dispatch.cpp): it builds IValues, whose
// inline code must not come from an AVX variant.
at::Tensor onednn_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace fused_mlp::cpu
