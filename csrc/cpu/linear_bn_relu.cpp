// Fused Linear -> BatchNorm1d -> ReLU -> Dropout on the CPU.
//
// The GEMMs are csrc/cpu/gemm.h's; everything around them is fused here:
//   forward, batch statistics:   z = x W^T + b;  per-feature mean / variance of z (Welford);
//                                out = relu(z * A + B) * dropout, with A = gamma * invstd and
//                                B = beta - mean * A, in one write.
//   forward, running statistics: BN folded into the GEMM (W' = W * A, b' = (b - mean) * A + beta),
//                                then relu(...) * dropout in place on the GEMM's output.
//   backward, batch statistics:  one pass for dy (through dropout and ReLU) and the per-feature
//                                sums of dy and dy * zhat; a second for dz; then two GEMMs.
//   backward, running statistics: dy from the saved output, its per-feature sum, then GEMMs.
// The maths, and what is saved for backward, are in docs/linear_bn_relu.md.
//
// Reductions over the batch are split into (feature block, row block) units whose partial
// results are merged in a fixed order: the results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "bn_running_stats.h"
#include "common/welford.h"
#include "cpu/dropout_mask.h"
#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/vec_io.h"
#include "cpu_buffers.h"
#include "linear_bn_relu_checks.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN
namespace {

// A reduction unit: kRowBlock rows (the last block fewer) by a block of features. 96 rows: 16 tiles
// of the outer-product GEMM's, whose work items the forward's statistics are taken from while they
// are in cache (kRowBlock rows each then). Each feature's sums run over the unit's rows in row
// order, and the units' results merge in row-block order, so the width of the feature blocks
// changes no bit: it is chosen from the shapes for the memory traffic. Rows read whole are one contiguous stream; rows
// read in narrow blocks jump by a row's length at every row, which the hardware prefetchers follow poorly (measured
// here: the backward's first pass over 1024 x 512 took most of its time waiting on loads with 64-feature blocks). So a
// block is as wide as the rows, split only until there are kUnitsWanted units to share among the
// threads, and never below kMinFeatureVecs vectors.
constexpr int64_t kRowBlock = 96;
constexpr int64_t kMinFeatureVecs = 4;
constexpr int64_t kUnitsWanted = 8;

int64_t row_blocks_of(int64_t N) {
  return (N + kRowBlock - 1) / kRowBlock;
}
// Two threads from 8K elements up: below that the work costs less than starting a parallel region.
constexpr int64_t kGrainElements = 8192;

// The dropout of one layer call: which elements survive, and the scale of the survivors.
struct Dropout {
  bool active = false;
  float p = 0.f;
  double scale = 1.0;
  uint64_t seed = 0, offset = 0;

  Dropout(double p_, const at::Tensor& seed_offset) {
    if (p_ <= 0.0) return;
    active = true;
    p = static_cast<float>(p_);
    scale = 1.0 / (1.0 - p_);
    const int64_t* so = seed_offset.const_data_ptr<int64_t>();
    seed = static_cast<uint64_t>(so[0]);
    offset = static_cast<uint64_t>(so[1]);
  }
  // Multipliers (0 or scale) of elements [begin, begin + n) into buf.
  template <typename T>
  void multipliers(uint64_t begin, int64_t n, T* buf) const {
    dropout_multipliers<T>(seed, offset, begin, n, p, static_cast<T>(scale), buf);
  }
  // The same for `rows` spans of n elements, span r starting at begin + r * stride, into buf[r * n + k].
  template <typename T>
  void multipliers_rows(uint64_t begin, uint64_t stride, int64_t rows, int64_t n, T* buf) const {
    dropout_multipliers_rows<T>(seed, offset, begin, stride, rows, n, p, static_cast<T>(scale), buf);
  }
};

// Loads n <= kWidth values at p: the full-width load when it can.
template <typename scalar_t>
inline typename VecIO<scalar_t>::Vec load_n(const scalar_t* p, int64_t n) {
  using IO = VecIO<scalar_t>;
  return n == IO::kWidth ? IO::load(p) : IO::load(p, n);
}
template <typename acc_t>
inline at::vec::Vectorized<acc_t> load_acc(const acc_t* p, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}

// Whether any lane of v is NaN.
template <typename Vec>
inline bool any_nan(const Vec& v) {
  return v.isnan().zero_mask() != (1 << Vec::size()) - 1;
}

// The dropout multiplier of `len` elements starting at flat index idx, read off the layer's output
// out = relu(y) * m (m: 0 or kept_scale; 1 without dropout): 0 where out <= 0, kept_scale elsewhere.
// Where relu(y) > 0 that is m itself. A NaN output hides whether the unit was dropped, so there the
// multiplier is regenerated from (seed, offset).
template <typename Vec>
inline Vec multiplier_off_output(const Vec& out, const Vec& kept_scale, const Dropout& dropout, int64_t idx,
                                 int64_t len) {
  using acc_t = typename Vec::value_type;
  Vec m = Vec::blendv(kept_scale, Vec(0), out <= Vec(0));
  if (dropout.active && any_nan(out)) {
    acc_t mult[Vec::size()];
    dropout.multipliers(static_cast<uint64_t>(idx), len, mult);
    m = Vec::blendv(m, Vec::loadu(mult, len), out.isnan());
  }
  return m;
}

// The gradient through dropout and ReLU, read off the saved output. As torch.relu's backward
// (threshold_backward), the gradient stops where relu's output is <= 0 and passes elsewhere, at NaN
// included; out <= 0 exactly where relu(y) <= 0 or the unit was dropped.
template <typename Vec>
inline Vec grad_through_output(const Vec& g, const Vec& out, const Vec& kept_scale, const Dropout& dropout, int64_t idx,
                               int64_t len) {
  return Vec::blendv(g * multiplier_off_output(out, kept_scale, dropout, idx, len), Vec(0), out <= Vec(0));
}

// The (feature block, row block) units of an (N, C) reduction.
struct Units {
  int64_t rows, features, width, feature_blocks, row_blocks;
  Units(int64_t N, int64_t C, int64_t vec_width) : rows(N), features(C), row_blocks(row_blocks_of(N)) {
    const int64_t vecs = std::max<int64_t>(1, (C + vec_width - 1) / vec_width);
    const int64_t splits = std::clamp<int64_t>((kUnitsWanted + row_blocks - 1) / std::max<int64_t>(row_blocks, 1), 1,
                                               std::max<int64_t>(1, vecs / kMinFeatureVecs));
    width = (vecs + splits - 1) / splits * vec_width;
    feature_blocks = (C + width - 1) / width;
  }
  int64_t count() const { return feature_blocks * row_blocks; }
  int64_t grain() const { return std::max<int64_t>(1, kGrainElements / (width * kRowBlock)); }
};

// ---------------------------------------------------------------------------------------------
// Batch statistics: per feature, the mean and the biased and unbiased variances of z's columns.

// The moments of one block of z, exactly: nr rows (row stride ldz) by nf features, into mean_part
// and m2_part (zero on entry): per feature, the block's mean, then the sum of the squared
// deviations from it. Both passes read the block row by row; the second finds it still in cache.
// The forward's GEMM epilogue and the pass below take each block's moments through this one
// function, so they agree to the bit.
template <typename scalar_t>
void block_moments(const scalar_t* block, int64_t ldz, int64_t nr, int64_t nf, at::opmath_type<scalar_t>* mean_part,
                   at::opmath_type<scalar_t>* m2_part) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t f = 0; f < nf; f += W) {
      const int64_t len = std::min(W, nf - f);
      (load_acc(mean_part + f, len) + load_n(block + r * ldz + f, len)).store(mean_part + f, len);
    }
  }
  for (int64_t f = 0; f < nf; f += W) {
    const int64_t len = std::min(W, nf - f);
    (load_acc(mean_part + f, len) / Vec(static_cast<acc_t>(nr))).store(mean_part + f, len);
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t f = 0; f < nf; f += W) {
      const int64_t len = std::min(W, nf - f);
      const Vec d = load_n(block + r * ldz + f, len) - load_acc(mean_part + f, len);
      at::vec::fmadd(d, d, load_acc(m2_part + f, len)).store(m2_part + f, len);
    }
  }
}

// Every row block's moments of the features of an (N, C) matrix (mean[rb * C + f], m2[...]), zero
// until block_moments fills them.
template <typename acc_t>
struct BlockMoments {
  int64_t N, C;
  std::vector<acc_t> mean, m2;

  BlockMoments(int64_t rows, int64_t features)
      : N(rows), C(features), mean(row_blocks_of(rows) * features, acc_t(0)), m2(mean.size(), acc_t(0)) {}

  // Row block rb's from feature f on.
  acc_t* mean_at(int64_t rb, int64_t f) { return mean.data() + rb * C + f; }
  acc_t* m2_at(int64_t rb, int64_t f) { return m2.data() + rb * C + f; }

  // The blocks merged per feature in row-block order: (mean, invstd = 1 / sqrt(biased variance +
  // eps), unbiased variance), tensors of `options`.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> merged(double eps, const at::TensorOptions& options) const {
    at::Tensor mean_t = at::empty({C}, options), invstd_t = at::empty({C}, options), var_t = at::empty({C}, options);
    acc_t* out_mean = mean_t.mutable_data_ptr<acc_t>();
    acc_t* out_invstd = invstd_t.mutable_data_ptr<acc_t>();
    acc_t* out_var = var_t.mutable_data_ptr<acc_t>();
    const int64_t row_blocks = row_blocks_of(N);
    // The merge is small (C x row_blocks states): a parallel region would cost more than it saves.
    at::parallel_for(0, C, std::max<int64_t>(C, 65536 / std::max<int64_t>(row_blocks, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t f = begin; f < end; ++f) {
                         WelfordState<acc_t, acc_t> s{mean[f], m2[f], static_cast<acc_t>(std::min(kRowBlock, N))};
                         for (int64_t rb = 1; rb < row_blocks; ++rb) {
                           const acc_t count = static_cast<acc_t>(std::min(kRowBlock, N - rb * kRowBlock));
                           s = welford_merge(s, WelfordState<acc_t, acc_t>{mean[rb * C + f], m2[rb * C + f], count});
                         }
                         out_mean[f] = s.mean;
                         out_invstd[f] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(s.m2 / s.count) + eps));
                         out_var[f] = s.m2 / (s.count - 1);
                       }
                     });
    return {mean_t, invstd_t, var_t};
  }
};

// Each row block's moments of z (N, C), in units.
template <typename scalar_t>
void block_moments_pass(const scalar_t* z, BlockMoments<at::opmath_type<scalar_t>>& moments) {
  const int64_t N = moments.N, C = moments.C;
  const Units u(N, C, VecIO<scalar_t>::kWidth);
  at::parallel_for(0, u.count(), u.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t fb = unit % u.feature_blocks, rb = unit / u.feature_blocks;
      const int64_t f0 = fb * u.width, nf = std::min(u.width, C - f0);
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, N - r0);
      block_moments<scalar_t>(z + r0 * C + f0, C, nr, nf, moments.mean_at(rb, f0), moments.m2_at(rb, f0));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes, parallel over rows.

// out = relu(z * A + B) * dropout, with A, B per feature (A null: no affine). out may alias z.
template <typename scalar_t>
void affine_relu_dropout(const scalar_t* z, scalar_t* out, int64_t N, int64_t C, const at::opmath_type<scalar_t>* A,
                         const at::opmath_type<scalar_t>* B, const Dropout& dropout) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  // The mask is a function of the flat index, so the multipliers of several consecutive rows come
  // from one call: at least kMaskElements of them, which the mask generator takes many Philox
  // blocks at a time, instead of a call per (perhaps short) row.
  constexpr int64_t kMaskElements = 2048;
  const int64_t mask_rows = std::max<int64_t>(1, kMaskElements / std::max<int64_t>(C, 1));
  at::parallel_for(
      0, N, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> mult(dropout.active ? std::min(mask_rows, end - begin) * C : 0);
        for (int64_t n = begin; n < end; ++n) {
          const int64_t mask_row = (n - begin) % mask_rows;
          if (dropout.active && mask_row == 0) {
            dropout.multipliers(static_cast<uint64_t>(n * C), std::min(mask_rows, end - n) * C, mult.data());
          }
          const acc_t* row_mult = mult.data() + mask_row * C;
          const scalar_t* zr = z + n * C;
          scalar_t* orow = out + n * C;
          for (int64_t f = 0; f < C; f += W) {
            const int64_t len = std::min(W, C - f);
            Vec y = load_n(zr + f, len);
            if (A) y = at::vec::fmadd(y, load_acc(A + f, len), load_acc(B + f, len));
            y = relu(y);
            // A product, as nn.Dropout's: a dropped NaN or inf becomes NaN.
            if (dropout.active) y = y * load_acc(row_mult + f, len);
            IO::store(orow + f, y, len);
          }
        }
      });
}

// relu(x W^T + b) * dropout: one GEMM with the ReLU in its epilogue, or with dropout the GEMM, then
// ReLU and dropout in one pass in place on its output.
at::Tensor linear_relu_dropout(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                               const Dropout& dropout) {
  const auto b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (!dropout.active) return gemm_nt_relu(input, weight, b);
  at::Tensor out = gemm_nt(input, weight, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_relu_dropout", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    affine_relu_dropout<scalar_t>(o, o, out.size(0), out.size(1), nullptr, nullptr, dropout);  // ReLU too
  });
  return out;
}

// The folded BN affine of each feature: y = z * A + B == gamma * (z - mean) * invstd + beta.
template <typename acc_t>
void bn_affine(int64_t C, const acc_t* gamma, const acc_t* beta, const acc_t* mean, const acc_t* invstd, acc_t* A,
               acc_t* B) {
  for (const auto f : c10::irange(C)) {
    A[f] = (gamma ? gamma[f] : acc_t(1)) * invstd[f];
    B[f] = (beta ? beta[f] : acc_t(0)) - mean[f] * A[f];
  }
}

// out[f, :] = w[f, :] * scale[f] for a (C, K) matrix: the folded weight W' = W * A.
template <typename scalar_t>
void scale_rows(const scalar_t* w, const at::opmath_type<scalar_t>* scale, int64_t C, int64_t K, scalar_t* out) {
  using IO = VecIO<scalar_t>;
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1)), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const typename IO::Vec a(scale[f]);
      for (int64_t k = 0; k < K; k += IO::kWidth) {
        const int64_t len = std::min<int64_t>(IO::kWidth, K - k);
        IO::store(out + f * K + k, load_n(w + f * K + k, len) * a, len);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Per feature of z (N, C): the mean, invstd = 1 / sqrt(biased variance + eps), and the unbiased
// variance, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats_of(const at::Tensor& z, double eps) {
  const auto options = z.options().dtype(at::toOpMathType(z.scalar_type()));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_batch_stats", [&] {
    BlockMoments<at::opmath_type<scalar_t>> moments(z.size(0), z.size(1));
    block_moments_pass<scalar_t>(z.const_data_ptr<scalar_t>(), moments);
    stats = moments.merged(eps, options);
  });
  return stats;
}

// z = x W^T + b and its batch statistics. For float32 the outer-product GEMM hands each finished
// block of z (kRowBlock rows) to block_moments while the block is in cache; where another kernel
// ran, the moments are taken in a pass over z. Either way the same blocks, the same arithmetic.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_with_batch_stats(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps) {
  if (input.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) {
    at::Tensor z = gemm_nt(input, weight, defined(bias) ? bias : std::nullopt);
    auto [mean, invstd, var] = batch_stats_of(z, eps);
    return {z, mean, invstd, var};
  }
  BlockMoments<float> moments(input.size(0), weight.size(0));
  BlockObserver observer{
      kRowBlock,
      [](void* context, const float* c, int64_t ldc, int64_t row0, int64_t rows, int64_t col, int64_t cols) {
        auto& m = *static_cast<BlockMoments<float>*>(context);
        const int64_t rb = row0 / kRowBlock;
        block_moments<float>(c, ldc, rows, cols, m.mean_at(rb, col), m.m2_at(rb, col));
      },
      &moments, false};
  at::Tensor z = gemm_nt_observed(input, weight, defined(bias) ? bias : std::nullopt, observer);
  TORCH_INTERNAL_ASSERT(z.is_contiguous(), "the forward's GEMM returned a non-contiguous output");
  if (!observer.seen) block_moments_pass<float>(z.const_data_ptr<float>(), moments);
  auto [mean, invstd, var] = moments.merged(eps, z.options());
  return {z, mean, invstd, var};
}

// relu(gamma * (z - mean) * invstd + beta) * dropout into a fresh tensor; gamma and beta are acc
// tensors or undefined (no affine).
at::Tensor normalize_relu_dropout(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                                  const at::Tensor& gamma, const at::Tensor& beta, const Dropout& dropout) {
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor out = buffer(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_relu_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> A(C), B(C);
    bn_affine<acc_t>(C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.const_data_ptr<acc_t>(),
                     invstd.const_data_ptr<acc_t>(), A.data(), B.data());
    affine_relu_dropout<scalar_t>(z.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C, A.data(),
                                  B.data(), dropout);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_forward_cpu(
    const at::Tensor& input_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool use_batch_stats,
    double eps, double dropout_p, const at::Tensor& seed_offset_) {
  constexpr const char* op = "fused_mlp::linear_bn_relu_forward";
  check_layer(input_, weight_, bias, bn_weight, bn_bias, dropout_p, seed_offset_, op);
  const int64_t C = weight_.size(0);
  check_statistics_mode(input_, C, use_batch_stats, running_mean, running_var, op);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const Dropout dropout(dropout_p, seed_offset_.contiguous());

  if (use_batch_stats) {
    auto [pre_bn, mean, invstd, var] = linear_with_batch_stats(input, weight, bias, eps);
    at::Tensor out = normalize_relu_dropout(pre_bn, mean, invstd, gamma, beta, dropout);
    return {out, pre_bn, mean, invstd, var};
  }
  // Running statistics: fold the BN affine into the GEMM, then ReLU (+ dropout) in place.
  at::Tensor mean = running_mean->to(acc).contiguous().clone();
  at::Tensor var = running_var->to(acc).contiguous().clone();
  at::Tensor invstd = (var + eps).rsqrt();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> A(C), B(C);
    bn_affine<acc_t>(C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.const_data_ptr<acc_t>(),
                     invstd.const_data_ptr<acc_t>(), A.data(), B.data());
    at::Tensor folded_weight = buffer(weight.sizes(), weight.options());
    at::Tensor folded_bias = at::empty({C}, weight.options());
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* fw = folded_weight.mutable_data_ptr<scalar_t>();
    scalar_t* fb = folded_bias.mutable_data_ptr<scalar_t>();
    const at::Tensor bias_c = defined(bias) ? bias->contiguous() : at::Tensor();
    const scalar_t* b = ptr_or_null<scalar_t>(bias_c);
    scale_rows<scalar_t>(w, A.data(), C, weight.size(1), fw);
    for (const auto f : c10::irange(C)) {
      fb[f] = static_cast<scalar_t>((b ? static_cast<acc_t>(b[f]) : acc_t(0)) * A[f] + B[f]);
    }
    out = linear_relu_dropout(input, folded_weight, folded_bias, dropout);
  });
  return {out, at::empty({0}, input.options()), mean, invstd, var};
}

// The stages of the forward with batch statistics after its GEMM, as ops of their own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_batch_stats_cpu(const at::Tensor& pre_bn, double eps) {
  check_pre_bn(pre_bn, /*batch_stats=*/true, "fused_mlp::bn_batch_stats");
  return batch_stats_of(pre_bn.contiguous(), eps);
}

at::Tensor bn_relu_dropout_cpu(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                               const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                               double dropout_p, const at::Tensor& seed_offset) {
  constexpr const char* op = "fused_mlp::bn_relu_dropout";
  check_pre_bn(pre_bn, /*batch_stats=*/false, op);
  check_feature_stats(pre_bn, mean, invstd, op);
  check_bn_params(pre_bn, pre_bn.size(1), bn_weight, bn_bias, op);
  check_dropout(pre_bn, dropout_p, seed_offset, op);
  const auto acc = at::toOpMathType(pre_bn.scalar_type());
  return normalize_relu_dropout(pre_bn.contiguous(), mean.contiguous(), invstd.contiguous(), as_acc(bn_weight, acc),
                                as_acc(bn_bias, acc), Dropout(dropout_p, seed_offset.contiguous()));
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Pass 1 over the (N, C) gradient: dy = grad_out through dropout and ReLU, written to dy_out (acc_t),
// and its per-feature sums sum(dy) and, with batch statistics, sum(dy * zhat), merged in row-block
// order. With batch statistics the ReLU mask is recomputed from z exactly as the forward computed
// it, and the dropout multiplier is read off the layer's output `kept` where given (out > 0: kept;
// where relu's input is positive, out == 0: dropped; a NaN output, regenerated) or else regenerated
// from (seed, offset): the same multipliers either way. With running statistics both masks are read
// off the saved output (out > 0 exactly where the unit was active and kept).
template <typename scalar_t>
void grad_through_relu_dropout(const scalar_t* g, const scalar_t* saved, const scalar_t* kept, int64_t N, int64_t C,
                               bool use_batch_stats, const at::opmath_type<scalar_t>* A,
                               const at::opmath_type<scalar_t>* B, const at::opmath_type<scalar_t>* mean,
                               const at::opmath_type<scalar_t>* invstd, const Dropout& dropout,
                               at::opmath_type<scalar_t>* dy_out, at::opmath_type<scalar_t>* sum_dy,
                               at::opmath_type<scalar_t>* sum_dy_zhat) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const Units u(N, C, W);
  // Each unit sums into its own slice of part_dy and part_dyz, row by row.
  std::vector<acc_t> part_dy(u.row_blocks * C, acc_t(0)), part_dyz(use_batch_stats ? u.row_blocks * C : 0, acc_t(0));
  at::parallel_for(0, u.count(), u.grain(), [&](int64_t begin, int64_t end) {
    constexpr int64_t kMaskRows = 4;  // rows of multipliers generated together
    std::vector<acc_t> mult(kMaskRows * u.width);
    const Vec zero(acc_t(0));
    const Vec kept_scale(static_cast<acc_t>(dropout.active ? dropout.scale : 1.0));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t fb = unit % u.feature_blocks, rb = unit / u.feature_blocks;
      const int64_t f0 = fb * u.width, nf = std::min(u.width, C - f0);
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, N - r0);
      acc_t* s_dy = part_dy.data() + rb * C + f0;
      acc_t* s_dyz = use_batch_stats ? part_dyz.data() + rb * C + f0 : nullptr;
      for (int64_t n = r0; n < r0 + nr; ++n) {
        const bool regenerate = use_batch_stats && dropout.active && kept == nullptr;
        const int64_t mask_row = (n - r0) % kMaskRows;
        if (regenerate && mask_row == 0) {
          dropout.multipliers_rows(static_cast<uint64_t>(n * C + f0), static_cast<uint64_t>(C),
                                   std::min(kMaskRows, r0 + nr - n), nf, mult.data());
        }
        const acc_t* row_mult = mult.data() + mask_row * nf;
        for (int64_t f = 0; f < nf; f += W) {
          const int64_t len = std::min(W, nf - f), idx = n * C + f0 + f;
          const Vec gv = load_n(g + idx, len);
          const Vec sv = load_n(saved + idx, len);
          Vec dy;
          if (use_batch_stats) {
            // relu's input exactly as the forward computed it; the gradient stops where y <= 0 and
            // passes elsewhere, NaN included, as torch.relu's backward does.
            const Vec y = at::vec::fmadd(sv, load_acc(A + f0 + f, len), load_acc(B + f0 + f, len));
            const Vec gm = kept != nullptr
                               ? gv * multiplier_off_output(load_n(kept + idx, len), kept_scale, dropout, idx, len)
                           : regenerate ? gv * load_acc(row_mult + f, len)
                                        : gv;
            dy = Vec::blendv(gm, zero, y <= zero);
            const Vec zhat = (sv - load_acc(mean + f0 + f, len)) * load_acc(invstd + f0 + f, len);
            at::vec::fmadd(dy, zhat, load_acc(s_dyz + f, len)).store(s_dyz + f, len);
          } else {
            dy = grad_through_output(gv, sv, kept_scale, dropout, idx, len);
          }
          (load_acc(s_dy + f, len) + dy).store(s_dy + f, len);
          dy.store(dy_out + idx, len);
        }
      }
    }
  });
  for (const auto f : c10::irange(C)) {
    acc_t a = 0, b = 0;
    for (int64_t rb = 0; rb < u.row_blocks; ++rb) {
      a += part_dy[rb * C + f];
      if (use_batch_stats) b += part_dyz[rb * C + f];
    }
    sum_dy[f] = a;
    sum_dy_zhat[f] = b;
  }
}

// Pass 2 with batch statistics: dz = A * (dy - c1 - zhat * c2), zhat = (z - mean) * invstd, with
// c1 = sum(dy) / count and c2 = sum(dy * zhat) / count from sums over `count` rows (this call's N,
// or every process's rows once the sums are all-reduced). Term by term as stock BatchNorm's
// backward, so a NaN or inf in the gradient or in z spreads to the same elements as there.
template <typename scalar_t>
void batch_stats_input_grad(const at::opmath_type<scalar_t>* dy, const scalar_t* z, int64_t N, int64_t C,
                            const at::opmath_type<scalar_t>* A, const at::opmath_type<scalar_t>* mu,
                            const at::opmath_type<scalar_t>* is, const at::opmath_type<scalar_t>* sdy,
                            const at::opmath_type<scalar_t>* sdz, int64_t count, scalar_t* dz) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  std::vector<acc_t> c1(C), c2(C);
  for (const auto f : c10::irange(C)) {
    c1[f] = sdy[f] / static_cast<acc_t>(count);
    c2[f] = sdz[f] / static_cast<acc_t>(count);
  }
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t n = begin; n < end; ++n) {
                       for (int64_t f = 0; f < C; f += W) {
                         const int64_t len = std::min(W, C - f), idx = n * C + f;
                         const Vec zhat = (load_n(z + idx, len) - load_acc(mu + f, len)) * load_acc(is + f, len);
                         const Vec centered = load_acc(dy + idx, len) - load_acc(c1.data() + f, len);
                         const Vec v = (centered - zhat * load_acc(c2.data() + f, len)) * load_acc(A + f, len);
                         IO::store(dz + idx, v, len);
                       }
                     }
                   });
}

// The Linear bias's gradient with batch statistics, sum_n dz: zero, since BatchNorm cancels any
// constant added before it, but NaN where a NaN or inf reached the feature's sums or its affine,
// as the sum of stock's dz would be.
template <typename scalar_t>
at::Tensor batch_stats_bias_grad(const at::Tensor& like, int64_t C, const at::opmath_type<scalar_t>* A,
                                 const at::opmath_type<scalar_t>* sdy, const at::opmath_type<scalar_t>* sdz) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor grad_bias = at::empty({C}, like.options());
  scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
  for (const auto f : c10::irange(C)) gb[f] = static_cast<scalar_t>((sdy[f] + sdz[f]) * A[f] * acc_t(0));
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& weight_,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& saved_, const at::Tensor& mean_,
    const at::Tensor& invstd_, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset_,
    bool need_grad_input, bool need_grad_weight, const at::Tensor& output_) {
  constexpr const char* op = "fused_mlp::linear_bn_relu_backward";
  check_layer(input_, weight_, bias, bn_weight, bn_bias, dropout_p, seed_offset_, op);
  const int64_t N = input_.size(0), C = weight_.size(0), K = weight_.size(1);
  check_backward_tensors(grad_out_, input_, saved_, mean_, invstd_, C, op);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const at::Tensor g = grad_out_.contiguous(), input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor saved = saved_.contiguous(), mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor seed_offset = seed_offset_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const bool has_bias = defined(bias);
  const Dropout dropout(dropout_p, seed_offset);
  // The layer's output with batch statistics, relu(y) * dropout (the network ops pass it): which
  // units were kept is read off it instead of regenerated, for float and double. (In a reduced
  // dtype a kept output can round to 0, which would read as dropped.)
  const bool read_kept = use_batch_stats && dropout.active && output_.defined() &&
                         (input_.scalar_type() == at::kFloat || input_.scalar_type() == at::kDouble) &&
                         output_.scalar_type() == input_.scalar_type() && output_.sizes() == saved_.sizes();
  const at::Tensor output = read_kept ? output_.contiguous() : at::Tensor();

  at::Tensor grad_input, grad_weight, grad_bias;
  at::Tensor sum_dy = at::empty({C}, input.options().dtype(acc));
  at::Tensor sum_dy_zhat = at::empty({C}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t W = IO::kWidth;
    std::vector<acc_t> A(C), B(C);
    bn_affine<acc_t>(C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.const_data_ptr<acc_t>(),
                     invstd.const_data_ptr<acc_t>(), A.data(), B.data());
    // dy in acc_t; for float and double it is written straight into the tensor that becomes dz.
    at::Tensor dz = buffer({N, C}, input.options());
    at::Tensor dy_buf = IO::kReduced ? buffer({N, C}, input.options().dtype(acc)) : dz;
    acc_t* dy = dy_buf.mutable_data_ptr<acc_t>();
    grad_through_relu_dropout<scalar_t>(g.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
                                        read_kept ? output.const_data_ptr<scalar_t>() : nullptr, N, C, use_batch_stats,
                                        A.data(), B.data(), mean.const_data_ptr<acc_t>(),
                                        invstd.const_data_ptr<acc_t>(), dropout, dy, sum_dy.mutable_data_ptr<acc_t>(),
                                        sum_dy_zhat.mutable_data_ptr<acc_t>());
    const acc_t* sdy = sum_dy.const_data_ptr<acc_t>();
    const acc_t* sdz = sum_dy_zhat.const_data_ptr<acc_t>();
    const acc_t* mu = mean.const_data_ptr<acc_t>();
    const acc_t* is = invstd.const_data_ptr<acc_t>();

    if (use_batch_stats) {
      batch_stats_input_grad<scalar_t>(dy, saved.const_data_ptr<scalar_t>(), N, C, A.data(), mu, is, sdy, sdz, N,
                                       dz.mutable_data_ptr<scalar_t>());
      grad_input = need_grad_input ? gemm_nn(dz, weight) : at::empty({0}, input.options());
      grad_weight = need_grad_weight ? gemm_tn(dz, input) : at::empty({0}, input.options());
      grad_bias = batch_stats_bias_grad<scalar_t>(input, C, A.data(), sdy, sdz);
      return;
    }
    // Running statistics: y = x W'^T + b' with W' = W * A, b' = (b - mean) * A + beta.
    if constexpr (IO::kReduced) {
      dz.copy_(dy_buf);  // dy, rounded to the input dtype for the GEMMs
    }
    if (need_grad_input) {
      at::Tensor folded_weight = buffer(weight.sizes(), weight.options());
      scale_rows<scalar_t>(weight.const_data_ptr<scalar_t>(), A.data(), C, K,
                           folded_weight.mutable_data_ptr<scalar_t>());
      grad_input = gemm_nn(dz, folded_weight);
    } else {
      grad_input = at::empty({0}, input.options());
    }
    at::Tensor G = gemm_tn(dz, input);  // dL/dW' = dy^T x
    grad_weight = buffer(weight.sizes(), weight.options());
    grad_bias = at::empty({C}, input.options());
    const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
    const scalar_t* b = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    acc_t* gg = sum_dy_zhat.mutable_data_ptr<acc_t>();  // becomes dL/dgamma = sum_n dy * zhat
    at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1)), [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        // sum_n dy * z = sum_k G[f, k] W[f, k] + b[f] sum_n dy, since z = x W^T + b.
        Vec dot(acc_t(0));
        const Vec a(A[f]);
        for (int64_t k = 0; k < K; k += W) {
          const int64_t len = std::min(W, K - k);
          const Vec gv = load_n(Gp + f * K + k, len);
          dot = at::vec::fmadd(gv, load_n(w + f * K + k, len), dot);
          IO::store(gw + f * K + k, gv * a, len);
        }
        const acc_t dy_z = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, dot) +
                           (b ? static_cast<acc_t>(b[f]) : acc_t(0)) * sdy[f];
        gg[f] = is[f] * (dy_z - mu[f] * sdy[f]);
        gb[f] = static_cast<scalar_t>(A[f] * sdy[f]);
      }
    });
  });
  return {grad_input, grad_weight, grad_bias, sum_dy_zhat.to(param_type(bn_weight, acc)),
          sum_dy.to(param_type(bn_bias, acc))};
}

// The backward with batch statistics as two stages, for a caller that reduces the sums across
// processes in between (synchronized BatchNorm); each recomputes dy from grad_out and pre_bn.
std::tuple<at::Tensor, at::Tensor> bn_backward_sums_cpu(const at::Tensor& grad_out_, const at::Tensor& pre_bn_,
                                                        const at::Tensor& mean_, const at::Tensor& invstd_,
                                                        const c10::optional<at::Tensor>& bn_weight,
                                                        const c10::optional<at::Tensor>& bn_bias, double dropout_p,
                                                        const at::Tensor& seed_offset) {
  constexpr const char* op = "fused_mlp::bn_backward_sums";
  check_backward_stage(grad_out_, pre_bn_, mean_, invstd_, bn_weight, bn_bias, dropout_p, seed_offset, op);
  const int64_t N = pre_bn_.size(0), C = pre_bn_.size(1);
  const auto acc = at::toOpMathType(pre_bn_.scalar_type());
  const at::Tensor g = grad_out_.contiguous(), z = pre_bn_.contiguous(), mean = mean_.contiguous(),
                   invstd = invstd_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  at::Tensor sum_dy = at::empty({C}, z.options().dtype(acc)), sum_dy_zhat = at::empty({C}, z.options().dtype(acc));
  const Dropout dropout(dropout_p, seed_offset.contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_backward_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> A(C), B(C), dy(N * C);
    bn_affine<acc_t>(C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.const_data_ptr<acc_t>(),
                     invstd.const_data_ptr<acc_t>(), A.data(), B.data());
    grad_through_relu_dropout<scalar_t>(g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), nullptr, N, C, true,
                                        A.data(), B.data(), mean.const_data_ptr<acc_t>(),
                                        invstd.const_data_ptr<acc_t>(), dropout, dy.data(),
                                        sum_dy.mutable_data_ptr<acc_t>(), sum_dy_zhat.mutable_data_ptr<acc_t>());
  });
  return {sum_dy, sum_dy_zhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finish_cpu(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& pre_bn_,
    const at::Tensor& mean_, const at::Tensor& invstd_, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& sum_dy_, const at::Tensor& sum_dy_zhat_, int64_t count,
    double dropout_p, const at::Tensor& seed_offset, bool need_grad_input) {
  constexpr const char* op = "fused_mlp::bn_backward_finish";
  check_backward_finish(grad_out_, input_, weight_, pre_bn_, mean_, invstd_, bn_weight, bn_bias, sum_dy_, sum_dy_zhat_,
                        count, dropout_p, seed_offset, op);
  const int64_t N = input_.size(0), C = weight_.size(0);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const at::Tensor g = grad_out_.contiguous(), input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor z = pre_bn_.contiguous(), mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor sum_dy = sum_dy_.contiguous(), sum_dy_zhat = sum_dy_zhat_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const Dropout dropout(dropout_p, seed_offset.contiguous());
  at::Tensor dz = buffer({N, C}, input.options()), grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_finish", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> A(C), B(C), dy(N * C), local_dy(C), local_dyz(C);
    const acc_t* mu = mean.const_data_ptr<acc_t>();
    const acc_t* is = invstd.const_data_ptr<acc_t>();
    bn_affine<acc_t>(C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mu, is, A.data(), B.data());
    grad_through_relu_dropout<scalar_t>(g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), nullptr, N, C, true,
                                        A.data(), B.data(), mu, is, dropout, dy.data(), local_dy.data(),
                                        local_dyz.data());
    batch_stats_input_grad<scalar_t>(dy.data(), z.const_data_ptr<scalar_t>(), N, C, A.data(), mu, is,
                                     sum_dy.const_data_ptr<acc_t>(), sum_dy_zhat.const_data_ptr<acc_t>(), count,
                                     dz.mutable_data_ptr<scalar_t>());
    grad_bias = batch_stats_bias_grad<scalar_t>(input, C, A.data(), sum_dy.const_data_ptr<acc_t>(),
                                                sum_dy_zhat.const_data_ptr<acc_t>());
  });
  at::Tensor grad_input = need_grad_input ? gemm_nn(dz, weight) : at::empty({0}, input.options());
  return {grad_input, gemm_tn(dz, input), grad_bias, sum_dy_zhat.to(param_type(bn_weight, acc)),
          sum_dy.to(param_type(bn_bias, acc))};
}

// The gradient of relu(z) * dropout with respect to z, read off the saved output (a layer without
// BatchNorm); the flat index of an element is its dropout index.
at::Tensor relu_dropout_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& output_, double dropout_p,
                                     const at::Tensor& seed_offset) {
  const at::Tensor g = grad_out_.contiguous(), out = output_.contiguous();
  at::Tensor gz = buffer(out.sizes(), out.options());
  const Dropout dropout(dropout_p, seed_offset.contiguous());
  const int64_t numel = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_dropout_backward", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    constexpr int64_t W = IO::kWidth;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    scalar_t* dp = gz.mutable_data_ptr<scalar_t>();
    const Vec kept_scale(static_cast<acc_t>(dropout.active ? dropout.scale : 1.0));
    at::parallel_for(0, (numel + W - 1) / W, kGrainElements / W, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t idx = v * W, len = std::min(W, numel - idx);
        IO::store(dp + idx,
                  grad_through_output(load_n(gp + idx, len), load_n(op + idx, len), kept_scale, dropout, idx, len),
                  len);
      }
    });
  });
  return gz;
}

// Inference with BN already folded into (weight, bias): relu(x W^T + b) * dropout.
at::Tensor linear_relu_dropout_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, double dropout_p,
                                           const at::Tensor& seed_offset) {
  constexpr const char* op = "fused_mlp::linear_relu_dropout_forward";
  check_layer(input, weight, bias, c10::nullopt, c10::nullopt, dropout_p, seed_offset, op);
  const at::Tensor b = defined(bias) ? bias->contiguous() : at::Tensor();
  // The weight as it is held: gemm_nt reads a row-major one or one held column by column (the
  // inference caches' packed layout) without a copy.
  return linear_relu_dropout(input.contiguous(), weight, b, Dropout(dropout_p, seed_offset.contiguous()));
}

// The running-statistics update in one pass when the running and batch statistics share a float
// dtype and are contiguous (a float32 or float64 model): the four ATen calls of the general form
// cost more than the arithmetic on a few hundred features. Same formula, same order.
void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, double factor) {
  const auto dtype = running_mean.scalar_type();
  const bool one_pass = (dtype == at::kFloat || dtype == at::kDouble) && running_var.scalar_type() == dtype &&
                        batch_mean.scalar_type() == dtype && batch_var.scalar_type() == dtype &&
                        running_mean.is_contiguous() && running_var.is_contiguous() && batch_mean.is_contiguous() &&
                        batch_var.is_contiguous() && batch_mean.device().is_cpu() && batch_var.device().is_cpu();
  if (!one_pass) {
    bn_update_running_stats(running_mean, running_var, batch_mean, batch_var, factor);
    return;
  }
  check_running_stats_update(running_mean, running_var, batch_mean, batch_var, factor);
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_update_running_stats_", [&] {
    const scalar_t keep = static_cast<scalar_t>(1.0 - factor), take = static_cast<scalar_t>(factor);
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    const scalar_t* bm = batch_mean.const_data_ptr<scalar_t>();
    const scalar_t* bv = batch_var.const_data_ptr<scalar_t>();
    for (int64_t f = 0; f < running_mean.numel(); ++f) {
      const scalar_t m = rm[f] * keep, v = rv[f] * keep;  // rounded, as mul_ rounds, before the add
      rm[f] = m + take * bm[f];
      rv[f] = v + take * bv[f];
    }
  });
  // Written through raw pointers: bump the version counters as in-place ATen ops do, so whatever
  // keys on them (autograd's saved-tensor checks, LinearBNReLU's folded-weight cache) sees the change.
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
FUSED_MLP_ISA_END

const LinearBnReluKernels& FUSED_MLP_THIS_CPU_VARIANT(linear_bn_relu_kernels)() {
  static constexpr LinearBnReluKernels kernels{
      &linear_bn_relu_forward_cpu, &linear_bn_relu_backward_cpu,     &bn_batch_stats_cpu,
      &bn_relu_dropout_cpu,        &linear_relu_dropout_forward_cpu, &bn_update_running_stats_cpu,
      &bn_backward_sums_cpu,       &bn_backward_finish_cpu,          &relu_dropout_backward_cpu};
  return kernels;
}

}  // namespace fused_mlp::cpu
