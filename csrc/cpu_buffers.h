// Where the CPU kernels' large tensors come from (their outputs and workspaces): blocks freed by
// earlier calls, kept for the next ones, instead of fresh pages from the operating system at every
// call. Compiled once (csrc/cpu_buffers.cpp); the kernels of every instruction set call it.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_mlp::cpu {

// An uninitialized contiguous CPU tensor, as at::empty(sizes, options): from the block cache when it
// takes kMinCachedBytes or more, else from ATen's CPU allocator.
at::Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fused_mlp::cpu
