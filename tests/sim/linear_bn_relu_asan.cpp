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
  const int64_t rows_per_chunk = bn_rows_per_chunk(N, C, kF, launch.limits);
  const int64_t chunks = bn_chunk_count(N, rows_per_chunk);
  const LaunchConfig rc = bn_column_reduce_config(C, kF, chunks);
  const LaunchConfig features = bn_feature_config(C, launch.limits);

  // Forward with batch statistics.
  std::vector<float> part_a(chunks * C), part_b(chunks * C), mean(C), invstd(C), var(C), affine(2 * C), out(N * C);
  const BatchStatsArgs<float> stats{.z = z.data(),
                                    .N = N,
                                    .C = C,
                                    .rows_per_chunk = rows_per_chunk,
                                    .chunks = chunks,
                                    .eps = eps,
                                    .gamma = gamma.data(),
                                    .beta = beta.data(),
                                    .part_mean = part_a.data(),
                                    .part_m2 = part_b.data(),
                                    .mean = mean.data(),
                                    .invstd = invstd.data(),
                                    .var = var.data(),
                                    .affine = affine.data()};
  if (kF == kGroup) {
    launch(rc, bn_stats_partial<float, kGroup>, stats);
  } else {
    launch(rc, bn_stats_partial<float, 1>, stats);
  }
  launch(features, bn_stats_finalize<float>, stats);
  const LaunchConfig ew = bn_elementwise_config((N * C + 3) / 4, launch.limits);
  launch(ew, affine_relu_dropout<float>,
         AffineReluDropoutArgs<float>{.in = z.data(),
                                      .A = affine.data(),
                                      .B = affine.data() + C,
                                      .numel = N * C,
                                      .C = C,
                                      .packed = true,
                                      .dropout = dropout,
                                      .out = out.data()});

  // Backward with batch statistics.
  std::vector<float> coef(2 * C), sum_dy(C), sum_dyz(C), dz(N * C);
  BnBackwardArgs<float> backward{.grad = grad.data(),
                                 .saved = z.data(),
                                 .N = N,
                                 .C = C,
                                 .rows_per_chunk = rows_per_chunk,
                                 .chunks = chunks,
                                 .count = N,
                                 .use_batch_stats = true,
                                 .packed = true,
                                 .affine = affine.data(),
                                 .mean = mean.data(),
                                 .invstd = invstd.data(),
                                 .dropout = dropout,
                                 .part_dy = part_a.data(),
                                 .part_dy_zhat = part_b.data(),
                                 .sum_dy = sum_dy.data(),
                                 .sum_dy_zhat = sum_dyz.data(),
                                 .coef = coef.data(),
                                 .dz = dz.data()};
  auto run_backward = [&] {
    if (kF == kGroup) {
      launch(rc, bn_backward_partial<float, kGroup>, backward);
    } else {
      launch(rc, bn_backward_partial<float, 1>, backward);
    }
    launch(features, bn_backward_finalize<float>, backward);
    launch(ew, bn_backward_input<float>, backward);
  };
  run_backward();

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
  launch(features, bn_affine<float>,
         BnAffineArgs<float>{.C = C,
                             .gamma = gamma.data(),
                             .beta = beta.data(),
                             .mean = running_mean.data(),
                             .invstd = run_invstd.data(),
                             .bias = bias.data(),
                             .affine = affine.data(),
                             .folded_bias = folded_bias.data()});
  launch(bn_elementwise_config(C * K, launch.limits), scale_weight_rows<float>, w.data(), affine.data(), C, K,
         folded_w.data());
  y = z;  // stands for the GEMM's output x W'^T
  launch(ew, affine_relu_dropout<float>,
         AffineReluDropoutArgs<float>{.in = y.data(),
                                      .A = nullptr,
                                      .B = folded_bias.data(),
                                      .numel = N * C,
                                      .C = C,
                                      .packed = true,
                                      .dropout = dropout,
                                      .out = y.data()});
  backward.saved = y.data();
  backward.use_batch_stats = false;
  backward.mean = running_mean.data();
  backward.invstd = run_invstd.data();
  run_backward();
  launch(bn_warp_per_feature_config(C, launch.limits), folded_weight_grad<float>,
         FoldedWeightGradArgs<float>{.G = G.data(),
                                     .weight = w.data(),
                                     .bias = bias.data(),
                                     .affine = affine.data(),
                                     .mean = running_mean.data(),
                                     .invstd = run_invstd.data(),
                                     .sum_dy = sum_dy.data(),
                                     .C = C,
                                     .K = K,
                                     .grad_weight = grad_w.data(),
                                     .grad_gamma = grad_gamma.data(),
                                     .grad_bias = grad_bias.data()});
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
              static_cast<long long>(chunks));
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
