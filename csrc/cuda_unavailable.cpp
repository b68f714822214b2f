// A build without CUDA kernels (no CUDA toolkit, or FUSED_MLP_CPU_ONLY=1) still receives CUDA
// tensors from users with a GPU. Without a kernel for the CUDA key, the dispatcher would answer
// with a NotImplementedError listing every backend; this says what happened and how to fix it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {

void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": this build of fused_mlp has no CUDA kernels: it was built without a CUDA toolkit, or with "
              "FUSED_MLP_CPU_ONLY=1. Rebuild it where nvcc and a CUDA build of torch are installed (CUDA_HOME set "
              "to the toolkit), with `pip install --no-build-isolation .` in the fused_mlp source tree; or move "
              "the tensors to the CPU.");
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mlp, CUDA, m) {
  for (const char* name :
       {"cross_entropy_forward", "cross_entropy_backward", "linear_bn_relu_forward", "linear_bn_relu_backward",
        "bn_batch_stats", "bn_relu_dropout", "bn_update_running_stats_", "linear_relu_dropout_forward", "philox4x32_10",
        "dropout_mask", "philox_seed_offset", "mlp_forward", "mlp_backward", "mlp_inference",
        "mlp_update_running_stats_", "bn_backward_sums", "bn_backward_finish", "mlp_train_step"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
