// Fused log-softmax + NLL (cross-entropy) on the CPU.
//
// Forward reads each row once: per tile of kTile classes, one pass that sums the exps relative to a
// guess of the tile's max while it finds the max (tile_partial), merged across tiles by the
// online-softmax rule. It writes the loss and the row's logsumexp (lse); backward rebuilds
// softmax = exp(x - lse) and writes the gradient in one pass.
// The maths is in docs/cross_entropy.md.
//
// Work is split into (row, tile) units, and partial results are merged in a fixed order, so the
// result does not depend on the number of threads: many short rows parallelize over rows, a few
// long rows over tiles within a row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_io.h"
#include "cross_entropy_checks.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN
namespace {

// Classes per tile: a float tile (16 KiB) stays in the L1 data cache, which is 32 KiB or more on
// every x86-64 CPU of the last decade, for the rare second pass.
constexpr int64_t kTile = 4096;
// Elements per parallel task, so short rows are not one task each: starting a parallel region
// costs microseconds on any CPU, the work of a few thousand elements about as much.
constexpr int64_t kGrainElements = 32768;

// The logsumexp state of part of a row, relative to its max m (the online-softmax state), with
// the sums the label-smoothing and probability-target terms need:
//   sumexp = sum exp(x - m),  coef_sum = sum coef,  coef_dot = sum coef * (x - m),
// where coef is the class weight (smoothing) or weight * smoothed target (probability targets).
// A part whose values are all -inf has m = -inf, sumexp = 0 and coef_dot = sum coef * x.
template <typename acc_t>
struct RowPartial {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sumexp = 0;
  acc_t coef_sum = 0;
  acc_t coef_dot = 0;
};

template <typename acc_t>
RowPartial<acc_t> merge(const RowPartial<acc_t>& a, const RowPartial<acc_t>& b) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (a.max == -kInf || b.max == -kInf) {
    // An all -inf part adds nothing to sumexp; its coef_dot is already +-inf or NaN (or 0 without
    // coefficients), so it needs no shift.
    return {a.max == -kInf ? b.max : a.max, a.sumexp + b.sumexp, a.coef_sum + b.coef_sum, a.coef_dot + b.coef_dot};
  }
  if (!std::isfinite(a.max) || !std::isfinite(b.max)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, nan, nan, nan};
  }
  const acc_t m = std::max(a.max, b.max);
  return {m, a.sumexp * std::exp(a.max - m) + b.sumexp * std::exp(b.max - m), a.coef_sum + b.coef_sum,
          a.coef_dot + a.coef_sum * (a.max - m) + b.coef_dot + b.coef_sum * (b.max - m)};
}

// Per-class coefficients of the smoothing / probability-target terms, vectorized.
// kind NoCoef: not needed. UnitCoef: 1. WeightCoef: w[c]. ProbCoef: w[c] * (t[c] (1 - eps) + eps / C).
enum class Coef { kNone, kUnit, kWeight, kProb };

template <typename scalar_t, Coef kCoef>
struct CoefLoader {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const scalar_t* weight;  // may be null (ProbCoef without weight)
  const scalar_t* target;  // this row's target distribution (ProbCoef)
  acc_t keep;              // 1 - eps
  acc_t spread;            // eps / C

  Vec load(int64_t c, int64_t n) const {
    const bool full = n == IO::kWidth;
    if constexpr (kCoef == Coef::kUnit) {
      return full ? Vec(acc_t(1)) : Vec::set(Vec(acc_t(0)), Vec(acc_t(1)), n);
    } else if constexpr (kCoef == Coef::kWeight) {
      return full ? IO::load(weight + c) : IO::load(weight + c, n);
    } else {
      Vec t = full ? IO::load(target + c) : IO::load(target + c, n);
      Vec coef = at::vec::fmadd(t, Vec(keep), Vec(spread));
      if (weight != nullptr) coef = coef * (full ? IO::load(weight + c) : IO::load(weight + c, n));
      return full ? coef : Vec::set(Vec(acc_t(0)), coef, n);
    }
  }
};

// The exp-sum pass over n contiguous values, relative to ref: the RowPartial of the values with
// ref as its reference (`max`), and, when asked, the values' max into *max_out (a plain max, which
// may miss a NaN: the NaN's exp, and so the sum, is NaN anyway).
template <typename scalar_t, Coef kCoef, bool kTrackMax>
RowPartial<at::opmath_type<scalar_t>> exp_sum_pass(const scalar_t* x, int64_t c0, int64_t n,
                                                   const CoefLoader<scalar_t, kCoef>& coef,
                                                   at::opmath_type<scalar_t> ref, at::opmath_type<scalar_t>* max_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const Vec vref(ref);
  Vec vsum(acc_t(0)), vcoef_sum(acc_t(0)), vcoef_dot(acc_t(0)), vmax(-kInf);
  for (int64_t c = 0; c < n; c += W) {
    const int64_t len = std::min(W, n - c);
    // The next tile (of this row or the next) is what this thread reads next: fetch it from memory
    // while this pass computes. Only a hint: an address past the end of the logits is never touched.
    __builtin_prefetch(x + c + n);
    const Vec xv = len == W ? IO::load(x + c) : Vec::set(Vec(-kInf), IO::load(x + c, len), len);
    if constexpr (kTrackMax) vmax = at::vec::clamp_min(xv, vmax);
    Vec d = xv - vref;
    Vec e = vec_exp<acc_t>(d);
    if (len < W) {
      e = Vec::set(Vec(acc_t(0)), e, len);
      d = Vec::set(Vec(acc_t(0)), d, len);
    }
    vsum = vsum + e;
    if constexpr (kCoef != Coef::kNone) {
      const Vec cf = coef.load(c0 + c, len);
      vcoef_sum = vcoef_sum + cf;
      vcoef_dot = at::vec::fmadd(cf, d, vcoef_dot);
    }
  }
  auto add = [](Vec& a, Vec& b) { return a + b; };
  RowPartial<acc_t> out;
  out.max = ref;
  out.sumexp = at::vec::vec_reduce_all<acc_t>(add, vsum);
  if constexpr (kCoef != Coef::kNone) {
    out.coef_sum = at::vec::vec_reduce_all<acc_t>(add, vcoef_sum);
    out.coef_dot = at::vec::vec_reduce_all<acc_t>(add, vcoef_dot);
  }
  if constexpr (kTrackMax) {
    *max_out = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  }
  return out;
}

// The RowPartial of n contiguous values. The exps are taken relative to a reference at most kSlack
// below the values' max: that keeps every exp, and their sum over a tile (exp(64) * 4096), far
// inside float's range, and needs no pass of its own to find. The reference is the max of the
// first vector, and the one pass over the tile also finds the tile's max; only when that exceeds
// the reference by more than kSlack (or the first vector is all -inf) does the tile take a second
// pass, relative to its max. `coef` supplies coefficients for the classes [c0, c0 + n) of the row.
template <typename scalar_t, Coef kCoef>
RowPartial<at::opmath_type<scalar_t>> tile_partial(const scalar_t* x, int64_t c0, int64_t n,
                                                   const CoefLoader<scalar_t, kCoef>& coef) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kSlack = 64;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  auto vmax_of = [](const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
  };

  const Vec first = n >= W ? IO::load(x) : Vec::set(Vec(-kInf), IO::load(x, n), n);
  const acc_t guess = vmax_of(first);
  if (std::isnan(guess) || guess == kInf) return {guess, nan, nan, nan};
  acc_t m = guess;
  if (guess != -kInf) {
    RowPartial<acc_t> out = exp_sum_pass<scalar_t, kCoef, true>(x, c0, n, coef, guess, &m);
    if (std::isnan(m) || m == kInf) return {m, nan, nan, nan};
    if (m - guess <= kSlack) {
      // Moved to the tile's max as the reference, so that (max - x_t) + log(sumexp) loses nothing
      // to cancellation on a row whose target is its max (a small loss). The max's own term, the
      // float exp(m - guess) the pass added (the same function on the same value gives the same
      // bits), becomes exactly 1 rather than 1 plus that exp's rounding error.
      if (m > guess) {
        alignas(64) acc_t max_term[W];
        vec_exp<acc_t>(Vec(m) - Vec(guess)).store(max_term);
        const double rest = static_cast<double>(out.sumexp) - static_cast<double>(max_term[0]);
        out.sumexp = static_cast<acc_t>(rest * std::exp(static_cast<double>(guess) - static_cast<double>(m)) + 1.0);
        out.coef_dot += out.coef_sum * (guess - m);
        out.max = m;
      }
      return out;
    }
  } else {
    // A first vector of -inf only: the tile's max, by a max pass, as the reference.
    Vec vmax(-kInf);
    int64_t c = 0;
    for (; c + W <= n; c += W) vmax = at::vec::clamp_min(IO::load(x + c), vmax);
    if (c < n) vmax = at::vec::clamp_min(Vec::set(Vec(-kInf), IO::load(x + c, n - c), n - c), vmax);
    m = vmax_of(vmax);
    if (std::isnan(m) || m == kInf) return {m, nan, nan, nan};
  }
  // An all -inf tile keeps max -inf, with exps of 0 and coef_dot = sum coef * x (reference 0).
  RowPartial<acc_t> out = exp_sum_pass<scalar_t, kCoef, false>(x, c0, n, coef, m == -kInf ? acc_t(0) : m, nullptr);
  out.max = m;
  return out;
}

// One pass over the class-index targets: raises IndexError for an index outside [0, C) that is not
// ignore_index, and returns the divisor of reduction='mean': the summed weight of the non-ignored
// targets (their count without weights), or the number of rows for probability targets. Summed in
// a fixed order, so forward and backward agree bit for bit.
template <typename scalar_t>
double scan_targets(const int64_t* target, const scalar_t* weight, const Problem& pb, const char* op) {
  if (pb.prob_target) return static_cast<double>(pb.rows);
  double total = 0;
  for (const auto i : c10::irange(pb.rows)) {
    const int64_t t = target[i];
    if (t == pb.ignore_index) continue;
    if (t < 0 || t >= pb.classes) {
      TORCH_CHECK_INDEX(false, op, ": target[", i, "] = ", t, " is out of bounds: expected a class", " index in [0, ",
                        pb.classes, ") or ignore_index (", pb.ignore_index, ")");
    }
    total += weight ? static_cast<double>(weight[t]) : 1.0;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Rows of few classes (C <= kSmallClasses): a horizontal reduction per row would cost more than the
// row's arithmetic, so a block of kWidth rows is transposed into registers-sized columns, one row per
// vector lane, and the reductions run down the columns.

constexpr int64_t kSmallClasses = 32;

template <typename scalar_t>
struct RowBlock {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t W = IO::kWidth;
  alignas(64) acc_t col[kSmallClasses][W];  // col[c][lane] = x[row0 + lane][c]

  // Loads rows [row0, row0 + rows) (rows <= W); lanes past the last row hold 0.
  void load(const scalar_t* x, int64_t row0, int64_t rows, int64_t C) {
    for (int64_t lane = 0; lane < rows; ++lane) {
      const scalar_t* xr = x + (row0 + lane) * C;
      for (int64_t c = 0; c < C; ++c) col[c][lane] = static_cast<acc_t>(xr[c]);
    }
    for (int64_t lane = rows; lane < W; ++lane) {
      for (int64_t c = 0; c < C; ++c) col[c][lane] = acc_t(0);
    }
  }
  void store(scalar_t* out, int64_t row0, int64_t rows, int64_t C) const {
    for (int64_t lane = 0; lane < rows; ++lane) {
      scalar_t* orow = out + (row0 + lane) * C;
      for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(col[c][lane]);
    }
  }
  Vec column(int64_t c) const { return Vec::loadu(col[c]); }
};

// The RowPartial of each row of a block, as tile_partial computes it for a whole row. Coefficients
// are per class (kUnit, kWeight), the same for every row.
template <typename scalar_t, Coef kCoef>
void block_partials(const RowBlock<scalar_t>& blk, int64_t C, const scalar_t* weight,
                    RowPartial<at::opmath_type<scalar_t>>* out, int64_t rows) {
  using B = RowBlock<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  Vec vmax(-kInf);
  for (int64_t c = 0; c < C; ++c) vmax = at::vec::maximum(vmax, blk.column(c));
  const Vec ref = Vec::blendv(vmax, Vec(acc_t(0)), vmax == Vec(-kInf));
  Vec vsum(acc_t(0)), vcoef_sum(acc_t(0)), vcoef_dot(acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const Vec d = blk.column(c) - ref;
    vsum = vsum + vec_exp<acc_t>(d);
    if constexpr (kCoef != Coef::kNone) {
      const Vec cf(kCoef == Coef::kWeight ? static_cast<acc_t>(weight[c]) : acc_t(1));
      vcoef_sum = vcoef_sum + cf;
      vcoef_dot = at::vec::fmadd(cf, d, vcoef_dot);
    }
  }
  alignas(64) acc_t m[B::W], sum[B::W], cs[B::W], cd[B::W];
  vmax.store(m);
  vsum.store(sum);
  vcoef_sum.store(cs);
  vcoef_dot.store(cd);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t lane = 0; lane < rows; ++lane) {
    const bool poisoned = std::isnan(m[lane]) || m[lane] == kInf;  // as in tile_partial
    out[lane] = poisoned ? RowPartial<acc_t>{m[lane], nan, nan, nan}
                         : RowPartial<acc_t>{m[lane], sum[lane], cs[lane], cd[lane]};
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, Coef kCoef>
void forward_rows(const scalar_t* x, const int64_t* target, const scalar_t* prob_target, const scalar_t* weight,
                  const Problem& pb, at::opmath_type<scalar_t>* row_loss, double* lse_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.classes;
  const int64_t tiles = (C + kTile - 1) / kTile;
  const acc_t eps = static_cast<acc_t>(pb.label_smoothing);
  const acc_t keep = acc_t(1) - eps;
  const acc_t spread = eps / static_cast<acc_t>(C);

  auto coef_for_row = [&](int64_t row) {
    return CoefLoader<scalar_t, kCoef>{weight, prob_target ? prob_target + row * C : nullptr, keep, spread};
  };
  // log_sum = log(p.sumexp) = lse - m. The loss uses lse - x_t as (m - x_t) + log_sum, exact where
  // it matters; the saved lse is m + log_sum in double: at |logits| ~ 1e4 a float lse would be off
  // by up to 5e-4, and every softmax value rebuilt from it by as much, relatively. Rows of -inf
  // only, or with +inf or NaN, give NaN, as log_softmax does.
  // sum_c coef_c (lse - x_c) = coef_sum * (lse - m) - sum_c coef_c (x_c - m). Where a coefficient is
  // NaN or inf (a class weight or a target probability) and the logits are finite, that difference
  // can be inf - inf where stock's sum of its per-class terms is inf: such a row is summed class by
  // class.
  auto coef_term = [&](int64_t row, const RowPartial<acc_t>& p, acc_t log_sum) -> acc_t {
    if (!std::isfinite(p.max) || (std::isfinite(p.coef_sum) && std::isfinite(p.coef_dot))) {
      return p.coef_sum * log_sum - p.coef_dot;
    }
    acc_t s = 0;
    for (const auto c : c10::irange(C)) {
      const scalar_t* pt = prob_target ? prob_target + row * C : nullptr;
      const acc_t w = weight ? static_cast<acc_t>(weight[c]) : acc_t(1);
      const acc_t coef = pt ? w * (static_cast<acc_t>(pt[c]) * keep + spread) : w;
      s += coef * ((p.max - static_cast<acc_t>(x[row * C + c])) + log_sum);
    }
    return s;
  };
  auto finish_row = [&](int64_t row, const RowPartial<acc_t>& p, acc_t log_sum) {
    if (!std::isfinite(p.max)) log_sum = std::numeric_limits<acc_t>::quiet_NaN();
    lse_out[row] = static_cast<double>(p.max) + static_cast<double>(log_sum);
    acc_t loss;
    if (pb.prob_target) {
      loss = coef_term(row, p, log_sum);
    } else {
      const int64_t t = target[row];
      if (t == pb.ignore_index) {
        loss = 0;
      } else {
        const acc_t w = weight ? static_cast<acc_t>(weight[t]) : acc_t(1);
        loss = w * ((p.max - static_cast<acc_t>(x[row * C + t])) + log_sum);
        if constexpr (kCoef != Coef::kNone) {
          loss = keep * loss + spread * coef_term(row, p, log_sum);
        }
      }
    }
    row_loss[row] = loss;
  };

  const int64_t tile_len = std::min(C, kTile);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / tile_len);
  if constexpr (kCoef != Coef::kProb) {
    if (C <= kSmallClasses) {
      constexpr int64_t W = VecIO<scalar_t>::kWidth;
      const int64_t blocks = (pb.rows + W - 1) / W;
      at::parallel_for(0, blocks, std::max<int64_t>(1, grain / W), [&](int64_t begin, int64_t end) {
        RowBlock<scalar_t> blk;
        RowPartial<acc_t> parts[W];
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row0 = b * W, rows = std::min(W, pb.rows - row0);
          blk.load(x, row0, rows, C);
          block_partials<scalar_t, kCoef>(blk, C, weight, parts, rows);
          alignas(64) acc_t sums[W], log_sums[W];
          for (int64_t lane = 0; lane < W; ++lane) sums[lane] = lane < rows ? parts[lane].sumexp : acc_t(1);
          at::vec::Vectorized<acc_t>::loadu(sums).log().store(log_sums);
          for (int64_t lane = 0; lane < rows; ++lane) finish_row(row0 + lane, parts[lane], log_sums[lane]);
        }
      });
      return;
    }
  }
  if (tiles == 1) {
    at::parallel_for(0, pb.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const auto p = tile_partial<scalar_t, kCoef>(x + row * C, 0, C, coef_for_row(row));
        finish_row(row, p, std::log(p.sumexp));
      }
    });
    return;
  }
  // Long rows: every (row, tile) unit independently, then each row's tiles merged in order.
  std::vector<RowPartial<acc_t>> partials(pb.rows * tiles);
  at::parallel_for(0, pb.rows * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / tiles, c0 = (unit % tiles) * kTile;
      partials[unit] = tile_partial<scalar_t, kCoef>(x + row * C + c0, c0, std::min(kTile, C - c0), coef_for_row(row));
    }
  });
  at::parallel_for(0, pb.rows, std::max<int64_t>(1, 4096 / tiles), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowPartial<acc_t> p = partials[row * tiles];
      for (int64_t k = 1; k < tiles; ++k) p = merge(p, partials[row * tiles + k]);
      finish_row(row, p, std::log(p.sumexp));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& input_, const at::Tensor& target_,
                                                             const c10::optional<at::Tensor>& weight_,
                                                             int64_t reduction, int64_t ignore_index,
                                                             double label_smoothing) {
  constexpr const char* op = "fused_mlp::cross_entropy_forward";
  const Problem pb = check_problem(input_, target_, weight_, reduction, ignore_index, label_smoothing, op);
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  at::Tensor lse = at::empty({pb.rows}, input.options().dtype(at::kDouble));
  at::Tensor loss =
      pb.reduction == at::Reduction::None ? at::empty({pb.rows}, input.options()) : at::empty({}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* t = pb.prob_target ? nullptr : target.const_data_ptr<int64_t>();
    const scalar_t* pt = pb.prob_target ? target.const_data_ptr<scalar_t>() : nullptr;
    const double divisor = scan_targets<scalar_t>(t, w, pb, op);

    std::vector<acc_t> row_loss_buf;
    acc_t* row_loss;
    if (pb.reduction == at::Reduction::None && std::is_same_v<scalar_t, acc_t>) {
      row_loss = reinterpret_cast<acc_t*>(loss.mutable_data_ptr<scalar_t>());
    } else {
      row_loss_buf.resize(pb.rows);
      row_loss = row_loss_buf.data();
    }
    double* lse_ptr = lse.mutable_data_ptr<double>();
    if (pb.prob_target) {
      forward_rows<scalar_t, Coef::kProb>(x, t, pt, w, pb, row_loss, lse_ptr);
    } else if (pb.label_smoothing > 0 && w) {
      forward_rows<scalar_t, Coef::kWeight>(x, t, pt, w, pb, row_loss, lse_ptr);
    } else if (pb.label_smoothing > 0) {
      forward_rows<scalar_t, Coef::kUnit>(x, t, pt, w, pb, row_loss, lse_ptr);
    } else {
      forward_rows<scalar_t, Coef::kNone>(x, t, pt, w, pb, row_loss, lse_ptr);
    }

    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    if (pb.reduction == at::Reduction::None) {
      if (!std::is_same_v<scalar_t, acc_t>) {
        for (const auto i : c10::irange(pb.rows)) out[i] = static_cast<scalar_t>(row_loss[i]);
      }
      return;
    }
    double total = 0;  // a fixed-order sum: the same bits at any thread count
    for (const auto i : c10::irange(pb.rows)) total += static_cast<double>(row_loss[i]);
    if (pb.reduction == at::Reduction::Mean) total /= divisor;  // 0/0 = NaN, as PyTorch
    *out = static_cast<scalar_t>(total);
  });
  return {loss, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward: grad[j] = scale * (softmax_j * a - b_j), where for a class-index target y
//   a = (1 - eps) w_y + (eps / C) sum_c w_c,   b_j = (1 - eps) w_y [j == y] + (eps / C) w_j,
// and for a probability target (smoothed: t'_j = (1 - eps) t_j + eps / C)
//   a = sum_c w_c t'_c,                        b_j = w_j t'_j.

// The double lse as hi + lo in acc_t: x - hi is exact for the x that matter (those near lse),
// so softmax = exp((x - hi) - lo) keeps acc_t's full precision at any magnitude of the logits.
template <typename acc_t>
struct SplitLse {
  acc_t hi, lo;
  explicit SplitLse(double lse) : hi(static_cast<acc_t>(lse)), lo(static_cast<acc_t>(lse - static_cast<double>(hi))) {}
  acc_t softmax(acc_t x) const { return std::exp((x - hi) - lo); }
};

template <typename scalar_t, Coef kCoef>
void backward_tile(const scalar_t* x, scalar_t* grad, int64_t c0, int64_t n, SplitLse<at::opmath_type<scalar_t>> lse,
                   at::opmath_type<scalar_t> scale_a, at::opmath_type<scalar_t> scale,
                   const CoefLoader<scalar_t, kCoef>& coef) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const Vec vhi(lse.hi), vlo(lse.lo), va(scale_a), vscale(scale);
  for (int64_t c = 0; c < n; c += W) {
    const int64_t len = std::min(W, n - c);
    const Vec xv = len == W ? IO::load(x + c) : IO::load(x + c, len);
    Vec g = vec_exp<acc_t>((xv - vhi) - vlo) * va;
    if constexpr (kCoef != Coef::kNone) g = g - vscale * coef.load(c0 + c, len);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // The gradient is written once and read by someone else later: streaming stores skip reading
    // each line into the cache before overwriting it, a read of the gradient's size saved.
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (len == W && reinterpret_cast<uintptr_t>(grad + c) % sizeof(Vec) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_ps(grad + c, g);
#else
        _mm256_stream_ps(grad + c, g);
#endif
        continue;
      }
    }
#endif
    IO::store(grad + c, g, len);
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the target's own store
#endif
}

template <typename scalar_t, Coef kCoef>
void backward_rows(const scalar_t* grad_loss, int64_t grad_stride, const scalar_t* x, const int64_t* target,
                   const scalar_t* prob_target, const scalar_t* weight, const double* lse, const Problem& pb,
                   double divisor, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.classes;
  const acc_t eps = static_cast<acc_t>(pb.label_smoothing);
  const acc_t keep = acc_t(1) - eps;
  const acc_t spread = eps / static_cast<acc_t>(C);

  // sum_c w_c, needed for the smoothing term of class-index targets. Without smoothing no other
  // class's weight enters a row's gradient: a NaN or inf weight stays in the rows of its class.
  acc_t weight_total = static_cast<acc_t>(C);
  if (weight && kCoef == Coef::kWeight) {
    double s = 0;
    for (const auto c : c10::irange(C)) s += static_cast<double>(weight[c]);
    weight_total = static_cast<acc_t>(s);
  }
  // Probability targets: a = sum_c w_c t'_c per row, one pass over each target row.
  std::vector<acc_t> prob_mass;
  if (pb.prob_target) {
    prob_mass.resize(pb.rows);
    at::parallel_for(0, pb.rows, std::max<int64_t>(1, kGrainElements / C), [&](int64_t b, int64_t e) {
      using Vec = typename VecIO<scalar_t>::Vec;
      constexpr int64_t W = VecIO<scalar_t>::kWidth;
      for (int64_t row = b; row < e; ++row) {
        const CoefLoader<scalar_t, kCoef> coef{weight, prob_target + row * C, keep, spread};
        Vec acc(acc_t(0));
        for (int64_t c = 0; c < C; c += W) acc = acc + coef.load(c, std::min(W, C - c));
        prob_mass[row] = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, acc);
      }
    });
  }

  // Everything one row's gradient needs: grad_j = scale_a * softmax_j - scale_coef * coef_j, and
  // for a class-index target t, grad_t recomputed whole (rounded once).
  struct RowTerms {
    enum Kind { kValue, kZero, kNaN } kind = kZero;
    SplitLse<acc_t> lse{0.0};
    acc_t scale = 0, scale_a = 0, scale_coef = 0, w_t = 0;
    int64_t t = -1;
  };
  acc_t reduced_scale = 0;  // reduction mean / sum: the same scale for every row
  if (pb.reduction != at::Reduction::None) {
    reduced_scale =
        static_cast<acc_t>(static_cast<acc_t>(grad_loss[0]) / (pb.reduction == at::Reduction::Mean ? divisor : 1.0));
  }
  auto row_terms = [&](int64_t row) {
    RowTerms r;
    if (std::isnan(lse[row])) {  // NaN / inf logits: NaN gradient, as log_softmax's backward gives
      r.kind = RowTerms::kNaN;
      return r;
    }
    r.t = target ? target[row] : -1;
    if (target && r.t == pb.ignore_index) return r;  // kZero
    r.kind = RowTerms::kValue;
    r.lse = SplitLse<acc_t>(lse[row]);
    r.scale = pb.reduction == at::Reduction::None ? static_cast<acc_t>(grad_loss[row * grad_stride]) : reduced_scale;
    r.scale_coef = r.scale * (pb.prob_target ? acc_t(1) : spread);
    if (pb.prob_target) {
      r.scale_a = r.scale * prob_mass[row];
    } else {
      r.w_t = weight ? static_cast<acc_t>(weight[r.t]) : acc_t(1);
      r.scale_a = r.scale * (keep * r.w_t + spread * weight_total);
    }
    return r;
  };
  // The target's extra term: grad_t = scale_a * softmax_t - scale_coef * coef_t - target_term.
  auto target_term = [&](const RowTerms& r) { return r.scale * keep * r.w_t; };

  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if constexpr (kCoef != Coef::kProb) {
    if (C <= kSmallClasses) {
      using Vec = typename VecIO<scalar_t>::Vec;
      constexpr int64_t W = VecIO<scalar_t>::kWidth;
      const int64_t blocks = (pb.rows + W - 1) / W;
      at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / (C * W)), [&](int64_t begin, int64_t end) {
        RowBlock<scalar_t> blk;
        RowTerms terms[W];
        alignas(64) acc_t hi[W], lo[W], sa[W], sc[W], tt[W], tc[W];
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row0 = b * W, rows = std::min(W, pb.rows - row0);
          blk.load(x, row0, rows, C);
          for (int64_t lane = 0; lane < W; ++lane) {
            terms[lane] = lane < rows ? row_terms(row0 + lane) : RowTerms{};
            const RowTerms& r = terms[lane];
            hi[lane] = r.lse.hi, lo[lane] = r.lse.lo, sa[lane] = r.scale_a, sc[lane] = r.scale_coef;
            // The target class as a float (exact for C <= kSmallClasses), -1 for none.
            tc[lane] = r.kind == RowTerms::kValue ? static_cast<acc_t>(r.t) : acc_t(-1);
            tt[lane] = r.kind == RowTerms::kValue ? target_term(r) : acc_t(0);
          }
          const Vec vhi = Vec::loadu(hi), vlo = Vec::loadu(lo), vsa = Vec::loadu(sa), vsc = Vec::loadu(sc);
          const Vec vtc = Vec::loadu(tc), vtt = Vec::loadu(tt), zero(acc_t(0));
          for (int64_t c = 0; c < C; ++c) {
            Vec g = vec_exp<acc_t>((blk.column(c) - vhi) - vlo) * vsa;
            if constexpr (kCoef != Coef::kNone) {
              g = g - vsc * Vec(kCoef == Coef::kWeight ? static_cast<acc_t>(weight[c]) : acc_t(1));
            }
            g = g - Vec::blendv(zero, vtt, vtc == Vec(static_cast<acc_t>(c)));
            g.store(blk.col[c]);
          }
          for (int64_t lane = 0; lane < rows; ++lane) {
            const RowTerms& r = terms[lane];
            if (r.kind != RowTerms::kValue) {
              for (int64_t c = 0; c < C; ++c) blk.col[c][lane] = r.kind == RowTerms::kNaN ? nan : acc_t(0);
            }
          }
          blk.store(grad, row0, rows, C);
        }
      });
      return;
    }
  }

  const int64_t tiles = (C + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(C, kTile));
  at::parallel_for(0, pb.rows * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / tiles, c0 = (unit % tiles) * kTile, n = std::min(kTile, C - c0);
      const scalar_t* xr = x + row * C + c0;
      scalar_t* gr = grad + row * C + c0;
      const RowTerms r = row_terms(row);
      if (r.kind != RowTerms::kValue) {
        std::fill(gr, gr + n, static_cast<scalar_t>(r.kind == RowTerms::kNaN ? nan : acc_t(0)));
        continue;
      }
      const CoefLoader<scalar_t, kCoef> coef{weight, prob_target ? prob_target + row * C : nullptr, keep, spread};
      backward_tile<scalar_t, kCoef>(xr, gr, c0, n, r.lse, r.scale_a, r.scale_coef, coef);
      if (!pb.prob_target && r.t >= c0 && r.t < c0 + n) {
        // The target class, recomputed whole in acc_t so it is rounded once.
        const acc_t coef_t = kCoef == Coef::kNone ? acc_t(0) : r.w_t;
        gr[r.t - c0] = static_cast<scalar_t>(r.lse.softmax(static_cast<acc_t>(xr[r.t - c0])) * r.scale_a -
                                             r.scale_coef * coef_t - target_term(r));
      }
    }
  });
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss_, const at::Tensor& input_, const at::Tensor& target_,
                                      const c10::optional<at::Tensor>& weight_, const at::Tensor& lse_,
                                      int64_t reduction, int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "fused_mlp::cross_entropy_backward";
  const Problem pb = check_problem(input_, target_, weight_, reduction, ignore_index, label_smoothing, op);
  check_backward(pb, input_, grad_loss_, lse_, op);

  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor grad = at::empty_like(input, at::MemoryFormat::Contiguous);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* t = pb.prob_target ? nullptr : target.const_data_ptr<int64_t>();
    const scalar_t* pt = pb.prob_target ? target.const_data_ptr<scalar_t>() : nullptr;
    const double divisor = scan_targets<scalar_t>(t, w, pb, op);
    const scalar_t* g = grad_loss_.const_data_ptr<scalar_t>();
    const int64_t g_stride = pb.reduction == at::Reduction::None ? grad_loss_.stride(0) : 0;
    const double* l = lse.const_data_ptr<double>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    if (pb.prob_target) {
      backward_rows<scalar_t, Coef::kProb>(g, g_stride, x, t, pt, w, l, pb, divisor, out);
    } else if (pb.label_smoothing > 0 && w) {
      backward_rows<scalar_t, Coef::kWeight>(g, g_stride, x, t, pt, w, l, pb, divisor, out);
    } else if (pb.label_smoothing > 0) {
      backward_rows<scalar_t, Coef::kUnit>(g, g_stride, x, t, pt, w, l, pb, divisor, out);
    } else {
      backward_rows<scalar_t, Coef::kNone>(g, g_stride, x, t, pt, w, l, pb, divisor, out);
    }
  });
  return grad;
}

}  // namespace
FUSED_MLP_ISA_END

const CrossEntropyKernels& FUSED_MLP_THIS_CPU_VARIANT(cross_entropy_kernels)() {
  static constexpr CrossEntropyKernels kernels{&cross_entropy_forward_cpu, &cross_entropy_backward_cpu};
  return kernels;
}

}  // namespace fused_mlp::cpu
