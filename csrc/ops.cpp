// Every op schema of the fused_mlp namespace, in one place.
// Kernels are registered per backend: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

// An importable module, so `import fused_mlp._C` loads the library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fused_mlp, m) {
  // Cross-entropy over the last dimension of a 2-D input (rows, classes).
  // target: int64 class indices of shape (rows,), or class probabilities of the input's shape.
  // reduction: 0 = none, 1 = mean, 2 = sum (the values of at::Reduction).
  // Returns the loss (shape (rows,) for none, () otherwise) and each row's logsumexp, in float64
  // whatever the input dtype: all the backward needs besides the input itself.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor loss, Tensor logsumexp)");
  // grad_input = scale * (softmax(input) - target distribution), one pass, from the saved logsumexp.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor logsumexp, int reduction, int ignore_index, float label_smoothing) -> Tensor");
}
