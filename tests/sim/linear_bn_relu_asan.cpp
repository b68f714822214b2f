// The Linear -> BatchNorm1d -> ReLU -> Dropout CUDA kernels (the ones around the GEMMs), simulated
// in a plain executable built with AddressSanitizer: every buffer is exactly its size, so an
// out-of-bounds access in the device code stops the run with a report. Results are checked against
// a direct double-precision computation from the definitions, with the dropout mask from the scalar
// Philox of csrc/common/philox.h. Prints one line per case and "N passed, M failed".
#include "sim/cuda_sim.h"

#include "cuda/linear_bn_relu.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace fused_mlp::cuda;

namespace {

int passed = 0, failed = 0;

struct Case {
  int64_t rows, features, in_features;
  float p;
  int sm_count;
};

bool close(double a, double b, double tol = 2e-4) {
  return std::fabs(a - b) <= tol * (1.0 + std::fabs(b));
}

struct Sim {
  cuda_sim::DeviceLimits device;
  LaunchLimits limits;
  template <typename Config, typename Kernel, typename... Args>
  void operator()(const Config& cfg, Kernel kernel, Args... args) const {
    cuda_sim::launch(device, cfg.grid, cfg.block, cfg.shared_bytes, kernel, args...);
  }
};

void run_case(const Case& k) {
  const int64_t N = k.rows, C = k.features, K = k.in_features;
  std::mt19937 rng(static_cast<unsigned>(N * 977 + C));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  std::vector<float> z(N * C), grad(N * C), gamma(C), beta(C), running_mean(C), running_var(C), bias(C);
  std::vector<float> w(C * K), G(C * K);
  for (auto& v : z) v = normal(rng) * 2.f + 0.5f;
  for (auto& v : grad) v = normal(rng);
  for (auto& v : w) v = normal(rng);
  for (auto& v : G) v = normal(rng);
  for (int64_t f = 0; f < C; ++f) {
    gamma[f] = uniform(rng);
    beta[f] = normal(rng) * 0.3f;
    running_mean[f] = normal(rng);
    running_var[f] = uniform(rng);
    bias[f] = normal(rng);
  }
  const std::vector<int64_t> seed_offset{0x1234567890abcdefLL, 0x42};
  const double eps = 1e-5;
  const DropoutArgs dropout{seed_offset.data(), k.p, k.p > 0 ? 1.0 / (1.0 - k.p) : 1.0};
  auto mult = [&](int64_t i) {
    if (!(k.p > 0)) return 1.0;
    return fused_mlp::dropout_keep_element(seed_offset[0], seed_offset[1], i, k.p) ? dropout.scale : 0.0;
  };

  Sim launch{cuda_sim::kH100, {k.sm_count, 1024}};
  launch.device.sm_count = k.sm_count;
  const int kF = C % kGroup == 0 ? kGroup : 1;
  const ReduceConfig rc = bn_reduce_config(N, C, kF, launch.limits);

  // Forward with batch statistics.
  std::vector<float> part_a(rc.chunks * C), part_b(rc.chunks * C), mean(C), invstd(C), var(C), affine(2 * C),
      out(N * C);
  if (kF == kGroup) {
    launch(rc, bn_stats_partial<float, kGroup>, z.data(), N, C, rc.rows_per_chunk, part_a.data(), part_b.data());
  } else {
    launch(rc, bn_stats_partial<float, 1>, z.data(), N, C, rc.rows_per_chunk, part_a.data(), part_b.data());
  }
  launch(bn_feature_config(C, launch.limits), bn_stats_finalize<float>, part_a.data(), part_b.data(), N, C,
         rc.rows_per_chunk, rc.chunks, eps, gamma.data(), beta.data(), mean.data(), invstd.data(), var.data(),
         affine.data());
  const GridConfig ew = bn_elementwise_config((N * C + 3) / 4, launch.limits);
  launch(ew, affine_relu_dropout<float>, z.data(), affine.data(), affine.data() + C, N * C, C, true, dropout,
         out.data());

  // Backward with batch statistics.
  std::vector<float> coef(2 * C), sum_dy(C), sum_dyz(C), dz(N * C);
  if (kF == kGroup) {
    launch(rc, bn_backward_partial<float, kGroup>, grad.data(), z.data(), N, C, rc.rows_per_chunk, true, affine.data(),
           mean.data(), invstd.data(), dropout, part_a.data(), part_b.data());
  } else {
    launch(rc, bn_backward_partial<float, 1>, grad.data(), z.data(), N, C, rc.rows_per_chunk, true, affine.data(),
           mean.data(), invstd.data(), dropout, part_a.data(), part_b.data());
  }
  launch(bn_feature_config(C, launch.limits), bn_backward_finalize<float>, part_a.data(), part_b.data(), N, C,
         rc.chunks, true, affine.data(), mean.data(), invstd.data(), sum_dy.data(), sum_dyz.data(), coef.data());
  launch(ew, bn_backward_input<float>, grad.data(), z.data(), N * C, C, true, true, affine.data(), coef.data(), dropout,
         dz.data());

  bool ok = true;
  for (int64_t f = 0; f < C; ++f) {
    double m = 0, v = 0;
    for (int64_t n = 0; n < N; ++n) m += z[n * C + f];
    m /= N;
    for (int64_t n = 0; n < N; ++n) v += (z[n * C + f] - m) * (z[n * C + f] - m);
    const double is = 1.0 / std::sqrt(v / N + eps), a = gamma[f] * is, b = beta[f] - m * a;
    ok = ok && close(mean[f], m) && close(invstd[f], is) && close(var[f], v / (N - 1));
    double sdy = 0, sdyz = 0;
    std::vector<double> dy(N);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * C + f;
      const double y = z[i] * a + b;
      ok = ok && close(out[i], std::max(y, 0.0) * mult(i));
      dy[n] = y > 0 ? grad[i] * mult(i) : 0.0;
      sdy += dy[n];
      sdyz += dy[n] * (z[i] - m) * is;
    }
    ok = ok && close(sum_dy[f], sdy, 1e-3) && close(sum_dyz[f], sdyz, 1e-3);
    for (int64_t n = 0; n < N; ++n) {
      const double want = a * (dy[n] - sdy / N - (z[n * C + f] - m) * is * sdyz / N);
      ok = ok && close(dz[n * C + f], want, 1e-3);
    }
  }

  // Running statistics: the folded forward's kernels, then the backward's.
  std::vector<float> run_invstd(C), folded_bias(C), folded_w(C * K), y(N * C), grad_w(C * K), grad_gamma(C),
      grad_bias(C);
  for (int64_t f = 0; f < C; ++f) run_invstd[f] = static_cast<float>(1.0 / std::sqrt(running_var[f] + eps));
  launch(bn_feature_config(C, launch.limits), bn_affine<float>, C, gamma.data(), beta.data(), running_mean.data(),
         run_invstd.data(), bias.data(), affine.data(), folded_bias.data());
  launch(bn_elementwise_config(C * K, launch.limits), scale_weight_rows<float>, w.data(), affine.data(), C, K,
         folded_w.data());
  y = z;  // stands for the GEMM's output x W'^T
  launch(ew, affine_relu_dropout<float>, y.data(), static_cast<const float*>(nullptr), folded_bias.data(), N * C, C,
         true, dropout, y.data());
  if (kF == kGroup) {
    launch(rc, bn_backward_partial<float, kGroup>, grad.data(), y.data(), N, C, rc.rows_per_chunk, false, affine.data(),
           running_mean.data(), run_invstd.data(), dropout, part_a.data(), part_b.data());
  } else {
    launch(rc, bn_backward_partial<float, 1>, grad.data(), y.data(), N, C, rc.rows_per_chunk, false, affine.data(),
           running_mean.data(), run_invstd.data(), dropout, part_a.data(), part_b.data());
  }
  launch(bn_feature_config(C, launch.limits), bn_backward_finalize<float>, part_a.data(), part_b.data(), N, C,
         rc.chunks, false, affine.data(), running_mean.data(), run_invstd.data(), sum_dy.data(), sum_dyz.data(),
         coef.data());
  launch(ew, bn_backward_input<float>, grad.data(), y.data(), N * C, C, true, false, affine.data(), coef.data(),
         dropout, dz.data());
  launch(bn_warp_per_feature_config(C, launch.limits), folded_weight_grad<float>, G.data(), w.data(), bias.data(),
         affine.data(), running_mean.data(), run_invstd.data(), sum_dy.data(), C, K, grad_w.data(), grad_gamma.data(),
         grad_bias.data());
  const double scale = k.p > 0 ? 1.0 / (1.0 - k.p) : 1.0;
  for (int64_t f = 0; f < C; ++f) {
    const double a = gamma[f] * double(run_invstd[f]), b = beta[f] - running_mean[f] * a;
    ok = ok && close(affine[f], a) && close(folded_bias[f], bias[f] * a + b);
    double sdy = 0, dot = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * C + f;
      const double want_y = std::max(z[i] + double(folded_bias[f]), 0.0) * mult(i);
      ok = ok && close(y[i], want_y);
      const double dy = y[i] > 0 ? grad[i] * scale : 0.0;
      ok = ok && close(dz[i], dy);
      sdy += dy;
    }
    ok = ok && close(sum_dy[f], sdy, 1e-3);
    for (int64_t j = 0; j < K; ++j) {
      ok = ok && close(folded_w[f * K + j], w[f * K + j] * a) && close(grad_w[f * K + j], G[f * K + j] * a);
      dot += double(G[f * K + j]) * w[f * K + j];
    }
    ok = ok && close(grad_gamma[f], run_invstd[f] * (dot + bias[f] * sdy - running_mean[f] * sdy), 1e-3) &&
         close(grad_bias[f], a * sdy, 1e-3);
  }
  std::printf("%s rows=%lld features=%lld in_features=%lld p=%.1f sm_count=%d chunks=%lld\n", ok ? "PASS" : "FAIL",
              static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(K), k.p, k.sm_count,
              static_cast<long long>(rc.chunks));
  (ok ? passed : failed)++;
}

}  // namespace

int main() {
  const Case cases[] = {
      {2, 1, 3, 0.0f, 132},    {3, 31, 5, 0.3f, 132},   {31, 32, 4, 0.9f, 132},
      {33, 33, 2, 0.3f, 132},  {2, 1023, 2, 0.3f, 132}, {5, 1025, 3, 0.0f, 132},
      {3, 4097, 2, 0.3f, 132}, {1025, 33, 3, 0.3f, 1},  {1025, 64, 2, 0.9f, 132},
  };
  for (const Case& k : cases) run_case(k);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
