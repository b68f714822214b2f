// The cross-entropy CUDA kernels, simulated in a plain executable built with AddressSanitizer:
// every buffer is exactly its size, so an out-of-bounds read or write in the device code stops the
// run with a report. Results are checked against a direct double-precision computation.
// Prints one line per case and "N passed, M failed".
#include "sim/cuda_sim.h"

#include "cuda/cross_entropy.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace fused_mlp::cuda;

namespace {

int passed = 0, failed = 0;

struct Case {
  int64_t rows, classes;
  bool prob, weighted, ignore;
  double smoothing;
  int sm_count;
};

bool close(double a, double b) {
  return std::fabs(a - b) <= 1e-4 * (1.0 + std::fabs(b));
}

void run_case(const Case& k) {
  std::mt19937 rng(static_cast<unsigned>(k.rows * 131 + k.classes));
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  const int64_t R = k.rows, C = k.classes;
  std::vector<float> x(R * C), prob(k.prob ? R * C : 0), weight(k.weighted ? C : 0);
  std::vector<int64_t> target(k.prob ? 0 : R);
  for (auto& v : x) v = normal(rng);
  for (auto& v : weight) v = uniform(rng);
  for (int64_t r = 0; r < R && k.prob; ++r) {
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += (prob[r * C + c] = uniform(rng));
    for (int64_t c = 0; c < C; ++c) prob[r * C + c] = static_cast<float>(prob[r * C + c] / s);
  }
  for (int64_t r = 0; r < R && !k.prob; ++r)
    target[r] = (k.ignore && r % 3 == 0) ? -100 : static_cast<int64_t>(rng() % C);

  const LaunchLimits limits{k.sm_count, 1024};
  cuda_sim::DeviceLimits sim = cuda_sim::kH100;
  sim.sm_count = k.sm_count;
  std::vector<float> row_loss(R), grad(R * C), mass(k.prob ? R : 0), grad_out(R, 1.0f);
  std::vector<double> lse(R), scalars(2);
  const ForwardArgs<float> fa{.input = x.data(),
                              .target = k.prob ? nullptr : target.data(),
                              .prob_target = k.prob ? prob.data() : nullptr,
                              .weight = k.weighted ? weight.data() : nullptr,
                              .rows = R,
                              .classes = C,
                              .ignore_index = -100,
                              .label_smoothing = k.smoothing,
                              .row_loss = row_loss.data(),
                              .logsumexp = lse.data()};
  auto sim_launch = [&](const LaunchConfig& cfg, auto kernel, auto... args) {
    cuda_sim::launch(sim, cfg.grid, cfg.block, cfg.shared_bytes, kernel, args...);
  };
  const LaunchConfig rows_cfg = cross_entropy_rows_config(R, C, limits);
  if (cross_entropy_warp_per_row(C)) {
    launch_warp_rows<float>(sim_launch, rows_cfg, fa);
  } else {
    sim_launch(rows_cfg, cross_entropy_forward_block_rows<float>, fa);
  }
  sim_launch(cross_entropy_reduce_config(limits), cross_entropy_batch_scalars<float>, fa.target, fa.weight, R, C,
             int64_t(-100), scalars.data());
  if (k.prob) sim_launch(cross_entropy_warp_per_row_config(R, limits), cross_entropy_prob_mass<float>, fa, mass.data());
  const BackwardArgs<float> ba{.grad_loss = grad_out.data(),
                               .grad_stride = 1,
                               .input = x.data(),
                               .target = fa.target,
                               .prob_target = fa.prob_target,
                               .weight = fa.weight,
                               .logsumexp = lse.data(),
                               .scalars = scalars.data(),
                               .prob_mass = k.prob ? mass.data() : nullptr,
                               .rows = R,
                               .classes = C,
                               .ignore_index = -100,
                               .reduction = at::Reduction::None,
                               .label_smoothing = k.smoothing,
                               .grad_input = grad.data()};
  sim_launch(cross_entropy_elementwise_config(R * C, limits), cross_entropy_backward_elementwise<float>, ba);

  // The same in double, directly from the definitions.
  bool ok = true;
  const double eps = k.smoothing, keep = 1 - eps, spread = eps / C;
  for (int64_t r = 0; r < R; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, double(x[r * C + c]));
    for (int64_t c = 0; c < C; ++c) s += std::exp(double(x[r * C + c]) - m);
    const double l = m + std::log(s);
    auto w = [&](int64_t c) { return k.weighted ? double(weight[c]) : 1.0; };
    auto q = [&](int64_t c) {  // the target distribution, smoothed and weighted
      if (k.prob) return w(c) * (prob[r * C + c] * keep + spread);
      return (c == target[r] ? keep * w(c) : 0.0) + spread * w(c);
    };
    const bool ignored = !k.prob && target[r] == -100;
    double loss = 0, mass_r = 0;
    for (int64_t c = 0; c < C; ++c) {
      loss += q(c) * (l - x[r * C + c]);
      mass_r += q(c);
    }
    if (ignored) loss = 0;
    ok = ok && close(lse[r], l) && close(row_loss[r], loss);
    for (int64_t c = 0; c < C; ++c) {
      const double want = ignored ? 0.0 : std::exp(x[r * C + c] - l) * mass_r - q(c);
      ok = ok && close(grad[r * C + c], want);
    }
  }
  std::printf("%s rows=%lld classes=%lld prob=%d weighted=%d ignore=%d smoothing=%.1f sm_count=%d\n",
              ok ? "PASS" : "FAIL", static_cast<long long>(R), static_cast<long long>(C), k.prob, k.weighted, k.ignore,
              k.smoothing, k.sm_count);
  (ok ? passed : failed)++;
}

}  // namespace

int main() {
  const Case cases[] = {
      {1, 1, false, false, false, 0.0, 132},  {5, 2, false, true, true, 0.1, 132},
      {7, 31, true, true, false, 0.2, 132},   {33, 32, false, false, true, 0.0, 132},
      {9, 33, false, true, false, 0.3, 132},  {3, 1023, true, false, false, 0.0, 132},
      {2, 1025, false, true, true, 0.1, 132}, {2, 4097, true, true, false, 0.1, 132},
      {300, 10, false, true, true, 0.1, 1},   {40, 1100, false, false, false, 0.0, 1},
  };
  for (const Case& k : cases) run_case(k);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
