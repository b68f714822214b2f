// The GEMMs of the CPU kernels, owned: float32 micro-kernels written once over at::vec::Vectorized
// and compiled for AVX2 and AVX-512 (the per-instruction-set build), with a thread plan derived from
// the shapes. The DEFAULT build, and every other dtype, takes ATen's GEMM: the same results to
// float32 rounding, and the same NaN and inf, since every product and sum is taken in either.
//
// The three products of a layer, on row-major operands as the layer holds them, none transposed or
// packed first:
//   nt: C = A B^T (+ bias)   the forward, x W^T: an inner-product kernel, each output the dot
//                            product of a row of A and a row of B, both read along K; or, where B
//                            is held column by column (B^T contiguous: the inference caches pack
//                            their folded weights so, once) or A has 64 rows or more (each block
//                            of B^T's columns is then packed from B's rows by the thread that
//                            takes it), the outer-product kernel below on B^T; a batch of 32
//                            to 64 rows on a wide weight takes its transpose, B A^T, with A
//                            packed instead (swapped_forward);
//   nn: C = A B              grad_input = dz W: an outer-product kernel, each step a scalar of A
//                            broadcast against a vector of B's row;
//   tn: C = A^T B            grad_weight = dz^T x: the same outer-product kernel, A read down its
//                            columns; with AVX-512, over more than kReductionBlock rows (batch
//                            1024), in blocks of that many rows, each block of B's columns packed,
//                            and each tile's sums resumed from the previous block's.
// Each output element is one thread's, summed over the whole of K in one fixed order (per vector
// lane, then across the lanes): the same bits at any thread count. Why these kernels and not
// oneDNN's brgemm: docs/cpu_dispatch.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/vec_io.h"
#include "cpu_buffers.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveMicroKernels = true;
#else
constexpr bool kHaveMicroKernels = false;  // Vectorized is emulated here: ATen's GEMM is faster
#endif

// Register blocking: the accumulators and the operands of one step fit the 32 (AVX-512) or 16
// (AVX2) vector registers.
constexpr int kNtRows = W == 16 ? 4 : 3;  // nt: a tile of kNtRows x kNtCols dot products
constexpr int kNtCols = W == 16 ? 4 : 3;
constexpr int kOuterRows = 6;  // nn, tn: kOuterRows rows by kOuterVecs vectors of columns
constexpr int kOuterVecs = W == 16 ? 4 : 2;
constexpr int64_t kOuterCols = kOuterVecs * W;
// Rows of A per block of the nt loop: the block (at most 64 rows of K floats) stays in the L2 cache
// while every tile of this thread's columns reads it.
constexpr int64_t kNtRowBlock = 64;

inline Vec load(const float* p, int64_t n) {
  return n == W ? Vec::loadu(p) : Vec::loadu(p, n);
}

// C[i][j] = sum_k A[i][k] B[j][k] (+ bias[j]) for a tile of kNtRows x kNtCols; rows and columns past
// the ends (rows, cols) repeat the last one's pointers and are not stored.
void nt_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, bool relu,
             float* c, int64_t ldc, int64_t rows, int64_t cols) {
  const float* ar[kNtRows];
  const float* br[kNtCols];
  for (int i = 0; i < kNtRows; ++i) ar[i] = a + std::min<int64_t>(i, rows - 1) * lda;
  for (int j = 0; j < kNtCols; ++j) br[j] = b + std::min<int64_t>(j, cols - 1) * ldb;
  Vec acc[kNtRows][kNtCols];
  for (int i = 0; i < kNtRows; ++i) {
    for (int j = 0; j < kNtCols; ++j) acc[i][j] = Vec(0.f);
  }
  const auto step = [&](int64_t k, int64_t n) {
    Vec bv[kNtCols];
    for (int j = 0; j < kNtCols; ++j) bv[j] = load(br[j] + k, n);
    for (int i = 0; i < kNtRows; ++i) {
      const Vec av = load(ar[i] + k, n);
      for (int j = 0; j < kNtCols; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + W <= K; k += W) step(k, W);
  if (k < K) step(k, K - k);
  for (int i = 0; i < rows && i < kNtRows; ++i) {
    for (int j = 0; j < cols && j < kNtCols; ++j) {
      const float dot = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[i][j]);
      const float y = bias ? dot + bias[j] : dot;
      c[i * ldc + j] = relu && y < 0.f ? 0.f : y;
    }
  }
}

// What a tile does to its sums before it stores them: add the bias (per column), then ReLU as
// torch.relu (y < 0 ? +0 : y; NaN, +inf and -0 pass).
// Then, for a whole work item of the outer-product kernel, the observer (if any) is told of it.
// `resume`: the tile's sums start from what C holds (the sums over the earlier blocks of the
// reduction, stored exactly) instead of zero, so a sum taken in blocks is the same sum in the same
// order as one taken whole.
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
  BlockObserver* observer = nullptr;
  bool resume = false;
};

// What the epilogue stores for the sums y of a vector of columns whose bias (where there is one) is
// b: the outer-product tile and the transposed forward store through this one expression.
inline Vec finish(const Epilogue& epi, Vec y, const Vec& b) {
  if (epi.bias) y = y + b;
  return epi.relu ? relu(y) : y;
}

// C[i][j] = sum_r A(i, r) B[r][j] (then the epilogue) for kOuterRows rows by cols <= kVecs * W
// columns, A(i, r) = a[i * a_row + r * a_red]; B holds kVecs * W readable columns (a remainder
// block is padded first), and only `cols` are stored. Rows past `rows` repeat the last one's and are
// not stored. A function of its own, never inlined: inlined into its callers, the three-vector
// tile's accumulators went to the stack on every step (GCC 12), and its blocks (33 to 48 columns) ran
// at a third of the others' rate (784 x 48 at 512 rows: 230 us, 83 us so; 64 columns: 107 us).
// kDownColumns: A is read down its columns (a_row is 1: the weight gradient's dz^T), and the six
// rows' scalars of a step are read at fixed offsets from one pointer, advanced by a_red; else along
// its rows (a_red is 1), a pointer per row. With the direction a value, the columns' case kept six
// pointers, each advanced at every step: the weight gradient at batch 64 ran 4-8% slower.
template <int kVecs, bool kDownColumns>
C10_NOINLINE void outer_tile(const float* a, int64_t a_row, int64_t a_red, const float* b, int64_t ldb, int64_t R,
                             Epilogue epi, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  const float* ar[kOuterRows];
  int64_t offset[kOuterRows];
  for (int i = 0; i < kOuterRows; ++i) {
    offset[i] = std::min<int64_t>(i, rows - 1);
    ar[i] = a + offset[i] * a_row;
  }
  Vec acc[kOuterRows][kVecs];
  for (int i = 0; i < kOuterRows; ++i) {
    for (int v = 0; v < kVecs; ++v) acc[i][v] = Vec(0.f);
  }
  if (epi.resume) {
    for (int i = 0; i < kOuterRows; ++i) {
      for (int v = 0; v < kVecs && v * W < cols; ++v) {
        acc[i][v] = load(c + offset[i] * ldc + v * W, std::min<int64_t>(W, cols - v * W));
      }
    }
  }
  const float* column = a;  // kDownColumns: A(i, r) is column[offset[i]] at step r
  for (int64_t r = 0; r < R; ++r) {
    const float* br = b + r * ldb;
    Vec bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = Vec::loadu(br + v * W);
    for (int i = 0; i < kOuterRows; ++i) {
      const Vec av(kDownColumns ? column[offset[i]] : ar[i][r]);
      for (int v = 0; v < kVecs; ++v) acc[i][v] = at::vec::fmadd(av, bv[v], acc[i][v]);
    }
    if constexpr (kDownColumns) column += a_red;
  }
  for (int v = 0; v < kVecs && v * W < cols; ++v) {
    const int64_t n = std::min<int64_t>(W, cols - v * W);
    const Vec bias = epi.bias ? load(epi.bias + v * W, n) : Vec(0.f);
    for (int i = 0; i < rows && i < kOuterRows; ++i) finish(epi, acc[i][v], bias).store(c + i * ldc + v * W, n);
  }
}

// Work items of at least this many multiply-adds each, so that a small product stays on one
// thread: a parallel region costs microseconds to start.
constexpr int64_t kGrainMacs = 1 << 17;

int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(macs_per_item, 1));
}

// body(t0, t1) over items [0, count) of `macs` multiply-adds in all, one contiguous run of items per
// thread, the runs of about equal cost(t): at::parallel_for would give each thread as many items,
// and the items of a GEMM differ (a remainder block of rows or of columns costs less). As many
// threads as there are kGrainMacs of work, at most one per item. Which thread computes an item
// changes no bit of it.
template <typename Cost, typename Body>
void parallel_items(int64_t count, int64_t macs, const Cost& cost, const Body& body) {
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), count, std::max<int64_t>(1, macs / kGrainMacs)});
  if (threads <= 1 || at::in_parallel_region()) return body(0, count);
  // Plain arrays: std::vector<int64_t>'s filling constructor, compiled out of line in this variant
  // with AVX-512, would be the one the linker keeps for the whole library, every variant's callers
  // included.
  const std::unique_ptr<int64_t[]> prefix(new int64_t[count + 1]), bounds(new int64_t[threads + 1]);
  prefix[0] = 0;
  for (int64_t t = 0; t < count; ++t) prefix[t + 1] = prefix[t] + cost(t);
  // Run k starts at the item boundary nearest to k total / threads (never before run k - 1's start).
  bounds[0] = 0;
  bounds[threads] = count;
  for (int64_t k = 1, t = 0; k < threads; ++k) {
    const int64_t start = prefix[count] * k / threads;
    while (t < count && prefix[t] < start) ++t;
    if (t - 1 > bounds[k - 1] && start - prefix[t - 1] < prefix[t] - start) --t;
    bounds[k] = t;
  }
  at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (bounds[k] < bounds[k + 1]) body(bounds[k], bounds[k + 1]);
    }
  });
}

// C (M x N) = A (M x K) B^T, B (N x K); threads take groups of kNtCols columns (rows of B), and
// walk A in blocks of kNtRowBlock rows.
void gemm_nt_f32(const float* a, const float* b, Epilogue epi, float* c, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = (N + kNtCols - 1) / kNtCols;
  at::parallel_for(0, groups, grain_for(M * K * kNtCols), [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < M; m0 += kNtRowBlock) {
      const int64_t m1 = std::min(M, m0 + kNtRowBlock);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n = g * kNtCols, cols = std::min<int64_t>(kNtCols, N - n);
        for (int64_t m = m0; m < m1; m += kNtRows) {
          nt_tile(a + m * K, K, b + n * K, K, K, epi.bias ? epi.bias + n : nullptr, epi.relu, c + m * N + n, N,
                  std::min<int64_t>(kNtRows, m1 - m), cols);
        }
      }
    }
  });
}

// Rows of C per work item of the outer-product loop: 16 tiles. A block of B's columns (R x kOuterCols
// floats) stays in the L2 cache while its thread walks its rows. Where the columns make fewer than
// kOuterItemsWanted blocks, the rows are cut finer (whole tiles), so that a narrow product still
// makes enough items, small enough, to share evenly among the threads: 256 rows of a 64-column
// layer in blocks of 96 would make 3 items, two for one thread and one (of 64 rows) for the other.
constexpr int64_t kOuterRowBlock = 16 * kOuterRows;
constexpr int64_t kOuterItemsWanted = 16;

int64_t outer_row_block(int64_t rows, int64_t col_blocks) {
  const int64_t row_blocks = (kOuterItemsWanted + col_blocks - 1) / col_blocks;
  const int64_t tiles = ((rows + row_blocks - 1) / row_blocks + kOuterRows - 1) / kOuterRows;
  return std::clamp<int64_t>(tiles * kOuterRows, kOuterRows, kOuterRowBlock);
}

// Rows from i0 to i1 (a work item's) of C's columns [col, col + n), in tiles of kVecs vectors whose
// B (R x kVecs * W, row stride ldb) is readable in full. A is read along its rows (a_red 1) or down
// its columns (a_row 1).
template <int kVecs>
void outer_rows(const float* a, int64_t a_row, int64_t a_red, const float* b, int64_t ldb, Epilogue epi, float* c,
                int64_t ldc, int64_t i0, int64_t i1, int64_t n, int64_t R) {
  TORCH_INTERNAL_ASSERT(a_red == 1 || a_row == 1);
  // Called directly, not through a pointer: a tile whose address is taken keeps its full signature,
  // where a direct call lets the compiler pass the epilogue's fields in registers.
  for (int64_t i = i0; i < i1; i += kOuterRows) {
    const int64_t rows = std::min<int64_t>(kOuterRows, i1 - i);
    if (a_red == 1) {
      outer_tile<kVecs, false>(a + i * a_row, a_row, 1, b, ldb, R, epi, c + i * ldc, ldc, rows, n);
    } else {
      outer_tile<kVecs, true>(a + i, 1, a_red, b, ldb, R, epi, c + i * ldc, ldc, rows, n);
    }
  }
}

// Rows [0, rows) by columns [0, cols) of src (row stride ld_src) into dst transposed (dst[j][i] =
// src[i][j], row stride ld_dst): ATen's in-register blocks, 16 x 16 with AVX-512, 8 x 8 with AVX2
// (whose transpose of any size is element by element), element by element at the edges there.
void transpose_into(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  if constexpr (W == 16) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(rows), static_cast<int>(cols));
  } else {
    constexpr int64_t kBlock = 8;
    const int64_t full_rows = rows / kBlock * kBlock, full_cols = cols / kBlock * kBlock;
    for (int64_t i = 0; i < full_rows; i += kBlock) {
      for (int64_t j = 0; j < full_cols; j += kBlock) {
        at::vec::transpose_mxn<float, kBlock, kBlock>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = i < full_rows ? full_cols : 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// A thread's panel: grown as needed, never zero-filled (pack_panel writes every element a tile reads).
struct Panel {
  std::unique_ptr<float[]> data;
  int64_t size = 0;
  float* at_least(int64_t n) {
    if (n > size) {
      data.reset(new float[n]);
      size = n;
    }
    return data.get();
  }
};

// The panel of B's columns [col, col + n) that a tile `width` columns wide reads (R x width, the
// columns past n zero): copied from B's rows, or, where B is given by its transpose bt (cols x R,
// row-major: a Linear's weight as training holds it), transposed from bt's rows. Packing a block
// just before its tiles read it costs a fraction of what a separate transposed copy of the whole
// weight did: the block's rows of bt are read once either way, and the panel is still in the cache
// when the tiles read it.
void pack_panel(const float* b, int64_t ldb, const float* bt, int64_t col, int64_t n, int64_t width, int64_t R,
                Panel& panel) {
  float* p = panel.at_least(R * width);
  if (bt != nullptr) {
    transpose_into(bt + col * R, R, p, width, n, R);
  } else {
    for (int64_t r = 0; r < R; ++r) std::copy(b + r * ldb + col, b + r * ldb + col + n, p + r * width);
  }
  if (n < width) {
    for (int64_t r = 0; r < R; ++r) std::fill(p + r * width + n, p + (r + 1) * width, 0.f);
  }
}

// Where A is read down its columns (the weight gradient, dz^T x, or on its narrow path x^T dz) and
// the reduction is longer than this, with AVX-512, it is taken in blocks of this many rows of B, each block of B's
// columns packed into a panel (kReductionBlock x kOuterCols floats, 128 KiB) before its tiles read it. Read in place, a
// block of B's columns at 1024 rows is 256 KiB of rows a whole row of B apart (2 KiB for a 512-wide layer: in the L2
// cache's sets, too few of them), and every tile of the item reads it again: the 512 x 256 weight gradient at batch
// 1024 ran at 380 GFLOP/s against the forward's 470 (AMD EPYC, AVX-512, 2 threads). A rule of the shapes, never of
// timing.
constexpr int64_t kReductionBlock = 512;

// C (rows x cols) = sum_r A(i, r) B[r][j], then the epilogue, in blocks of kVecs vectors of columns.
// A work item is a block of columns by a block of rows (outer_row_block), numbered column block by
// column block, so a thread's run of items mostly shares one block of B; it walks its rows in tiles
// of kOuterRows. The last block's columns, when fewer, are copied into a zero-padded panel as wide
// as the vectors they need, and take a tile that wide: no masked loads in the loop, no lanes summed
// for nothing. Where B is given by its transpose bt (a row-major weight in the forward), or the
// reduction is taken in blocks (kReductionBlock), every block is packed into a panel first, by the
// thread that takes it, once for its run of items in that block.
template <int kVecs>
void outer_blocks(const float* a, int64_t a_row, int64_t a_red, const float* b, int64_t ldb, const float* bt,
                  Epilogue epi, float* c, int64_t ldc, int64_t rows, int64_t cols, int64_t R) {
  constexpr int64_t block = kVecs * W;
  const int64_t col_blocks = (cols + block - 1) / block;
  TORCH_INTERNAL_ASSERT(epi.observer == nullptr || epi.observer->row_block > 0);
  const int64_t row_block = epi.observer ? epi.observer->row_block : outer_row_block(rows, col_blocks);
  const int64_t row_blocks = (rows + row_block - 1) / row_block;
  const int64_t reduction_block = W == 16 && a_red != 1 && bt == nullptr && R > kReductionBlock ? kReductionBlock : R;
  // Taken in blocks, a tile's sums are stored between them: the epilogue would see partial sums.
  TORCH_INTERNAL_ASSERT(reduction_block == R || (epi.bias == nullptr && !epi.relu && epi.observer == nullptr));
  // An item's cost: its tiles' steps, each weighed by the larger of its multiply-adds (two vectors a
  // cycle) and its loads (the vectors of B and kOuterRows broadcasts), in half cycles. The last row
  // block and the last column block are usually smaller than the rest. Where A is read down its
  // columns (the weight gradient), each step's broadcasts come from another cache line, and a
  // narrow tile's step costs about twice its loads: with AVX-512, a 16-column tile's step of the
  // 784-column product at 1024 rows took 1.9 ns, a 64-column tile's 3.0 ns (loads alone: 7 and 24
  // half cycles), and with the loads weighed once the thread given the 16-column block finished
  // 130 us after the other (of 2.1 ms). AVX2's tiles, not measured so, keep the plain weights.
  const int64_t load_weight = W == 16 && a_red != 1 ? 2 : 1;
  const auto cost = [&](int64_t t) {
    const int64_t col = (t / row_blocks) * block, vecs = (std::min(block, cols - col) + W - 1) / W;
    const int64_t i0 = (t % row_blocks) * row_block;
    const int64_t tiles = (std::min(rows - i0, row_block) + kOuterRows - 1) / kOuterRows;
    return tiles * std::max<int64_t>(kOuterRows * vecs, load_weight * (vecs + kOuterRows));
  };
  parallel_items(col_blocks * row_blocks, rows * cols * R, cost, [&](int64_t t0, int64_t t1) {
    Panel panel;
    // The thread's items [g0, g1) of one block of columns, block of the reduction by block.
    for (int64_t g0 = t0, g1 = 0; g0 < t1; g0 = g1) {
      g1 = std::min(t1, (g0 / row_blocks + 1) * row_blocks);
      const int64_t col = (g0 / row_blocks) * block, n = std::min(block, cols - col);
      const int64_t vecs = (n + W - 1) / W, width = vecs * W;
      const bool packed = n < block || bt != nullptr || reduction_block < R;
      // At least one block: an empty reduction (R = 0) still stores its zeros.
      int64_t r0 = 0;
      do {
        const int64_t rc = std::min(reduction_block, R - r0);
        if (packed) pack_panel(b + r0 * ldb, ldb, bt, col, n, width, rc, panel);
        const float* p = packed ? panel.data.get() : b + col;
        const int64_t ldp = packed ? width : ldb;
        const float* ar = a + r0 * a_red;
        const Epilogue tile_epi{epi.bias ? epi.bias + col : nullptr, epi.relu, nullptr, r0 > 0};
        for (int64_t t = g0; t < g1; ++t) {
          const int64_t i0 = (t % row_blocks) * row_block, i1 = std::min(rows, i0 + row_block);
          switch (vecs) {
            case 1:
              outer_rows<1>(ar, a_row, a_red, p, ldp, tile_epi, c + col, ldc, i0, i1, n, rc);
              break;
            case 2:
              outer_rows<std::min(2, kVecs)>(ar, a_row, a_red, p, ldp, tile_epi, c + col, ldc, i0, i1, n, rc);
              break;
            case 3:
              outer_rows<std::min(3, kVecs)>(ar, a_row, a_red, p, ldp, tile_epi, c + col, ldc, i0, i1, n, rc);
              break;
            default:
              outer_rows<kVecs>(ar, a_row, a_red, p, ldp, tile_epi, c + col, ldc, i0, i1, n, rc);
          }
          if (epi.observer) epi.observer->on_block(epi.observer->context, c + i0 * ldc + col, ldc, i0, i1 - i0, col, n);
        }
        r0 += rc;
      } while (r0 < R);
    }
  });
}

// The columns of the outer-product GEMM's blocks for a product `cols` wide: kOuterVecs vectors, or
// fewer where all the columns fit in fewer.
int64_t outer_block_cols(int64_t cols) {
  if (cols <= W) return W;
  if (kOuterVecs > 2 && cols <= 2 * W) return 2 * W;
  return kOuterCols;
}

// The outer-product GEMM: blocks of kOuterVecs vectors of columns, or, where all the columns fit in
// fewer, a tile just that wide (a narrow layer, such as the 10 classes of the output, would leave
// most lanes idle). Every element is summed by one tile in one order (r = 0, 1, ...), whatever the
// tile's width and the split among threads: the same bits at any thread count.
void gemm_outer_f32(const float* a, int64_t a_row, int64_t a_red, const float* b, int64_t ldb, const float* bt,
                    Epilogue epi, float* c, int64_t ldc, int64_t rows, int64_t cols, int64_t R) {
  const int64_t vecs = outer_block_cols(cols) / W;
  if (vecs == 1) return outer_blocks<1>(a, a_row, a_red, b, ldb, bt, epi, c, ldc, rows, cols, R);
  if (vecs == 2) return outer_blocks<std::min(2, kOuterVecs)>(a, a_row, a_red, b, ldb, bt, epi, c, ldc, rows, cols, R);
  outer_blocks<kOuterVecs>(a, a_row, a_red, b, ldb, bt, epi, c, ldc, rows, cols, R);
}

// A small batch's forward, C (M x N) = A (M x K) B^T with B a row-major weight (N x K) and M at
// most one block of columns (kVecs * W >= M), taken as its transpose: C^T = B A^T by the
// outer-product kernel, B's rows read in place as its A operand and A packed into each thread's one
// panel (A^T, M x K floats, where the forward proper packs the weight's N x K). Each item is
// kSwapItemRows of B's rows: their block of C^T, in a buffer on the stack, is transposed into C's
// columns, which then take the epilogue (the bias, the ReLU) and, row block by row block, the
// observer. Every element is the sum the forward proper takes, in the same order (fma(a, b, acc) is
// fma(b, a, acc)): the same bits.
constexpr int64_t kSwapItemRows = 4 * kOuterRows;

template <int kVecs>
void swapped_forward(const float* a, const float* b, const Epilogue& epi, float* c, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t width = kVecs * W;
  TORCH_INTERNAL_ASSERT(epi.observer == nullptr || epi.observer->row_block > 0);
  const int64_t items = (N + kSwapItemRows - 1) / kSwapItemRows;
  const auto cost = [&](int64_t t) { return std::min(kSwapItemRows, N - t * kSwapItemRows); };
  parallel_items(items, M * N * K, cost, [&](int64_t t0, int64_t t1) {
    Panel panel;
    pack_panel(nullptr, 0, a, 0, M, width, K, panel);
    float block[kSwapItemRows * width];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t col = t * kSwapItemRows, n = std::min(kSwapItemRows, N - col);
      outer_rows<kVecs>(b + col * K, K, 1, panel.data.get(), width, Epilogue{}, block, width, 0, n, M, K);
      float* cc = c + col;
      transpose_into(block, width, cc, N, n, M);
      if (epi.bias != nullptr || epi.relu) {
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t j = 0; j < n; j += W) {
            const int64_t len = std::min<int64_t>(W, n - j);
            const Vec bias = epi.bias ? load(epi.bias + col + j, len) : Vec(0.f);
            finish(epi, load(cc + i * N + j, len), bias).store(cc + i * N + j, len);
          }
        }
      }
      if (BlockObserver* obs = epi.observer) {
        for (int64_t i0 = 0; i0 < M; i0 += obs->row_block) {
          obs->on_block(obs->context, cc + i0 * N, N, i0, std::min(obs->row_block, M - i0), col, n);
        }
      }
    }
  });
}

// Where the forward takes its transpose (swapped_forward): from two vectors of rows up to one block
// of columns, on a weight of at least eight blocks' rows, with AVX-512. Measured here (AMD EPYC, 2
// threads, microseconds through mlp_inference, the forward proper / transposed): 784-512 at 32 rows
// 69.1 / 62.0, at 48 99.8 / 88.2, at 64 125.9 / 116.2 (three runs' means); 512-256 at 64 42.6 /
// 43.3 and 784-128 at 64 33.1 / 35.5 (the weight's transpose saves less than the transpose back
// costs); 784-512 at 16 37.9 / 38.7. A rule of the shapes, never of timing.
bool transposed_forward_pays(int64_t M, int64_t N) {
  return W == 16 && M >= 2 * W && M <= kOuterCols && N >= 8 * kOuterCols;
}

void gemm_swapped_f32(const float* a, const float* b, const Epilogue& epi, float* c, int64_t M, int64_t N, int64_t K) {
  if (M <= 2 * W) return swapped_forward<std::min(2, kOuterVecs)>(a, b, epi, c, M, N, K);
  if (M <= 3 * W) return swapped_forward<std::min(3, kOuterVecs)>(a, b, epi, c, M, N, K);
  swapped_forward<kOuterVecs>(a, b, epi, c, M, N, K);
}

// weight (N x K) held column by column: weight^T is a contiguous K x N matrix.
bool columns_contiguous(const at::Tensor& weight) {
  return weight.dim() == 2 && !weight.is_contiguous() && weight.t().is_contiguous();
}

// From this many rows of A up, the forward runs the outer-product kernel on a row-major weight too,
// each block of 64 of the weight's rows transposed into a panel by the thread that takes it: the
// packing (16 x 16 blocks in registers; about 16 us of the 784-512 layer's 117 at batch 64, 2
// threads) then costs less than the faster kernel saves. Measured here (AMD EPYC, AVX-512, 2
// threads; microseconds, inner-product kernel / packed outer-product kernel / weight held column by
// column): 784-512 at 32 rows 73.9 / 84.6 / 69, at 48 102.1 / 103.5 / 88, at 64 134.5 / 133.4 / 119,
// at 256 526 (transposed first: 538) / 422 / 443; 256-128 at 64 22.6 / 17.1 / 14.9. A rule of the
// shapes, never of timing: the same program always takes the same kernel.
constexpr int64_t kPackFromRows = 64;

// Which GEMM the kernels run, fixed for the process by FUSED_MLP_GEMM and never chosen by timing,
// so the same program gives the same bits on every run:
//   owned (the default): the kernels above, for float32 on AVX2 and AVX-512 (else ATen's);
//   aten: ATen's GEMM (at::addmm / at::mm: MKL or oneDNN, as ATen picks), everywhere;
//   onednn: oneDNN's matmul (torch's mkldnn::_linear_pointwise, bias in its epilogue) for the
//           forward products of float32 and bfloat16, ATen's for the rest.
// The three round differently, so results differ between them in the last bits. On this project's
// machines each was the fastest somewhere: docs/cpu_dispatch.md.
enum class GemmMode { kOwned, kAten, kOneDnn };

GemmMode gemm_mode() {
  static const GemmMode mode = [] {
    const char* env = std::getenv("FUSED_MLP_GEMM");
    const std::string value = env ? env : "";
    if (value.empty() || value == "owned") return GemmMode::kOwned;
    if (value == "aten") return GemmMode::kAten;
    TORCH_CHECK(value == "onednn", "FUSED_MLP_GEMM must be owned, aten or onednn, got '", value, "'");
    return GemmMode::kOneDnn;
  }();
  return mode;
}

bool owned(const at::Tensor& a, const at::Tensor& b) {
  return kHaveMicroKernels && gemm_mode() == GemmMode::kOwned && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat;
}

constexpr int64_t kFewestObservedItems = 4;

// input weight^T + bias, then ReLU if asked: in the owned kernels' epilogue, else torch.relu in place
// on the output of oneDNN's or ATen's GEMM. The outer-product kernel tells the observer, if any, of
// its blocks.
at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool relu,
                  BlockObserver* observer = nullptr) {
  if (gemm_mode() == GemmMode::kOneDnn) {
    at::Tensor out = onednn_linear(input, weight, bias);
    if (out.defined()) return relu ? at::relu_(out) : out;
  }
  if (!owned(input, weight) || (bias.has_value() && bias->scalar_type() != at::kFloat)) {
    at::Tensor out = bias.has_value() ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
    return relu ? at::relu_(out) : out;
  }
  const at::Tensor a = input.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = a.size(0), K = a.size(1), N = weight.size(0);
  at::Tensor c = buffer({M, N}, a.options());
  if (M * N == 0) return c;
  const bool held_by_columns = columns_contiguous(weight);
  const bool swapped = !held_by_columns && transposed_forward_pays(M, N);
  const bool outer = held_by_columns || M >= kPackFromRows;
  // The observer's blocks fix the items' rows; a narrow product (fewer than kFewestObservedItems
  // items of them, e.g. 256 rows of 64 columns: 3) keeps its finer items, and the observer is not
  // told (the caller then reads the output once more: the same results).
  if (observer != nullptr) {
    const int64_t col_blocks = (N + outer_block_cols(N) - 1) / outer_block_cols(N);
    const int64_t items = col_blocks * ((M + observer->row_block - 1) / observer->row_block);
    observer->seen = swapped || (outer && items >= kFewestObservedItems);
  }
  const Epilogue epi{bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr, relu,
                     observer != nullptr && observer->seen ? observer : nullptr};
  if (swapped) {
    const at::Tensor w = weight.contiguous();
    gemm_swapped_f32(a.const_data_ptr<float>(), w.const_data_ptr<float>(), epi, c.mutable_data_ptr<float>(), M, N, K);
  } else if (outer) {
    // The outer-product kernel on B = weight^T (K x N), A read along its rows: B as the weight holds
    // it (column by column), or each block of B's columns packed from the weight's rows by the thread
    // that takes it.
    const at::Tensor w = held_by_columns ? weight : weight.contiguous();
    const float* data = w.const_data_ptr<float>();
    gemm_outer_f32(a.const_data_ptr<float>(), K, 1, held_by_columns ? data : nullptr, N,
                   held_by_columns ? nullptr : data, epi, c.mutable_data_ptr<float>(), N, M, N, K);
  } else {
    const at::Tensor b = weight.contiguous();
    gemm_nt_f32(a.const_data_ptr<float>(), b.const_data_ptr<float>(), epi, c.mutable_data_ptr<float>(), M, N, K);
  }
  return c;
}

}  // namespace

at::Tensor gemm_nt(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear(input, weight, bias, false);
}

at::Tensor gemm_nt_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear(input, weight, bias, true);
}

at::Tensor gemm_nt_observed(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            BlockObserver& observer) {
  observer.seen = false;
  return linear(input, weight, bias, false, &observer);
}

at::Tensor gemm_nn(const at::Tensor& a_, const at::Tensor& b_) {
  if (!owned(a_, b_)) return at::mm(a_, b_);
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t M = a.size(0), R = a.size(1), N = b.size(1);
  at::Tensor c = buffer({M, N}, a.options());
  if (M * N == 0) return c;
  gemm_outer_f32(a.const_data_ptr<float>(), R, 1, b.const_data_ptr<float>(), N, nullptr, {},
                 c.mutable_data_ptr<float>(), N, M, N, R);
  return c;
}

at::Tensor gemm_tn(const at::Tensor& a_, const at::Tensor& b_) {
  if (!owned(a_, b_)) return at::mm(a_.t(), b_);
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  at::Tensor c = buffer({M, N}, a.options());
  if (M * N == 0) return c;
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.const_data_ptr<float>();
  float* pc = c.mutable_data_ptr<float>();
  // Columns past the last whole block (784 = 12 x 64 + 16: the first layer's inputs) would take
  // tiles a vector wide, each step of which reads A down a column for 6 multiply-adds. Their
  // transpose, B's narrow block times A (rows of B's columns, A's columns wide), takes whole tiles
  // instead, and is transposed into place: the same sums in the same order, so the same bits. With
  // AVX-512, 16 of 784 columns at 512 x 1024: 166 us on one thread as narrow tiles, 101 us so.
  const int64_t narrow = N > kOuterCols ? N % kOuterCols : 0;
  if (W == 16 && narrow > 0 && M >= kOuterCols) {
    const int64_t whole = N - narrow;
    gemm_outer_f32(pa, 1, M, pb, N, nullptr, {}, pc, N, M, whole, R);
    at::Tensor t = buffer({narrow, M}, a.options());
    float* pt = t.mutable_data_ptr<float>();
    gemm_outer_f32(pb + whole, 1, N, pa, M, nullptr, {}, pt, M, narrow, M, R);
    transpose_into(pt, M, pc + whole, N, narrow, M);
    return c;
  }
  gemm_outer_f32(pa, 1, M, pb, N, nullptr, {}, pc, N, M, N, R);
  return c;
}

FUSED_MLP_ISA_END

const GemmKernels& FUSED_MLP_THIS_CPU_VARIANT(gemm_kernels)() {
  static constexpr GemmKernels kernels{&gemm_nt, &gemm_nn, &gemm_tn};
  return kernels;
}

}  // namespace fused_mlp::cpu
