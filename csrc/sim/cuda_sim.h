// A CPU simulation of CUDA's execution model, so that device code (csrc/cuda/*.cuh) compiled by
// g++ runs on the host with the semantics a GPU gives it:
//   - the blocks of a grid run one after another; the threads of a block run concurrently as real
//     threads (a pool, reused across blocks and launches);
//   - __syncthreads() is a barrier across the block; the __shfl_*_sync intrinsics exchange values
//     within a warp of 32 through a warp barrier, and only with a full mask;
//   - threadIdx, blockIdx, blockDim and gridDim are per thread; static __shared__ arrays are per
//     block (blocks run one at a time); dynamic shared memory, through
//     fused_mlp::cuda::dynamic_shared<T>(), has the launch's size and is poisoned before each block;
//   - atomicAdd is atomic; the math functions map to the standard ones.
// It refuses what a GPU would (more threads or shared memory than the device limits), and reports a
// barrier or shuffle that not every thread reaches as an error after a timeout, never a hang.
// docs/cuda_simulation.md says how it works and what it cannot catch.
#pragma once

#if defined(__CUDACC__)
#error "cuda_sim.h is for host compilers: nvcc compiles the device code for real"
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static  // blocks run one at a time, so a static array is per block
// A register budget for nvcc; the simulation has no registers to budget.
#define __launch_bounds__(...)

namespace cuda_sim {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The limits a launch is checked against: a real device's, passed in rather than queried.
struct DeviceLimits {
  int max_threads_per_block = 1024;
  size_t max_shared_bytes_per_block = 227 * 1024;  // opt-in maximum
  int sm_count = 132;
  int warp_size = 32;
};
// An H100 SXM's.
inline constexpr DeviceLimits kH100{1024, 227 * 1024, 132, 32};

class SimError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A thread stopped because another thread of its block failed first: not the error to report.
class SimAborted : public SimError {
 public:
  using SimError::SimError;
};

namespace detail {

inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local unsigned char* dynamic_smem = nullptr;

// What a block's threads share while it runs.
struct BlockState;
inline thread_local BlockState* current_block = nullptr;

inline std::chrono::milliseconds& barrier_timeout() {
  static std::chrono::milliseconds timeout{3000};
  return timeout;
}

// A reusable barrier for `count` threads that gives up after the timeout, or at once when the
// block is being aborted, so a missing participant is reported rather than waited for forever.
class Barrier {
 public:
  void reset(int count) {
    count_ = count;
    waiting_ = 0;
    generation_ = 0;
  }
  // Returns normally when all `count` threads have arrived; throws SimError otherwise.
  void wait(std::atomic<bool>& abort, const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (abort.load()) throw SimAborted(std::string(what) + ": the block was aborted");
    const uint64_t gen = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, barrier_timeout(), [&] { return generation_ != gen || abort.load(); });
    if (generation_ != gen) return;
    abort.store(true);
    cv_.notify_all();
    if (done) throw SimAborted(std::string(what) + ": the block was aborted");
    throw SimError(std::string(what) + " not reached by every thread of the block (timed out)");
  }
  void wake_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0, waiting_ = 0;
  uint64_t generation_ = 0;
};

struct BlockState {
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> shuffle_slots;  // one 8-byte slot per thread
  std::atomic<bool> abort{false};
  int threads = 0;
};

// A pool of threads that run the threads of one block at a time.
class Pool {
 public:
  static Pool& instance() {
    static Pool pool;
    return pool;
  }
  // Runs body(t) for t in [0, n) on n pool threads, concurrently; returns when all are done.
  void run(int n, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { worker(id); });
    }
    body_ = &body;
    active_ = n;
    remaining_ = n;
    ++round_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& w : workers_) w.join();
  }

 private:
  void worker(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* body;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || (round_ != seen && id < active_); });
        if (stop_) return;
        seen = round_;
        body = body_;
      }
      (*body)(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t round_ = 0;
  bool stop_ = false;
};

inline int linear_thread() {
  return static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
}

inline BlockState& block() {
  if (current_block == nullptr) throw SimError("a device intrinsic was called outside a simulated launch");
  return *current_block;
}

template <typename T>
T shuffle(unsigned mask, T value, int (*source)(int lane, int arg, int width), int arg, int width, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  BlockState& b = block();
  if (mask != 0xffffffffu) {
    throw SimError(std::string(what) + ": only a full mask (0xffffffff) is allowed");
  }
  const int t = linear_thread(), warp = t / 32, lane = t % 32;
  if ((warp + 1) * 32 > b.threads) {
    throw SimError(std::string(what) + " in a partial warp (the block's size is not a multiple of 32)");
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.shuffle_slots[t] = bits;
  b.warp_barriers[warp].wait(b.abort, what);
  const int src = source(lane, arg, width);
  std::memcpy(&value, &b.shuffle_slots[warp * 32 + src], sizeof(T));
  b.warp_barriers[warp].wait(b.abort, what);  // nobody overwrites a slot before all have read
  return value;
}

}  // namespace detail

inline void set_barrier_timeout(std::chrono::milliseconds timeout) {
  detail::barrier_timeout() = timeout;
}

// Runs kernel(args...) over grid x block threads with `shared_bytes` of dynamic shared memory,
// checked against the limits. Throws SimError for what a GPU would refuse and for barrier or
// shuffle misuse; rethrows the first exception a simulated thread raised.
template <typename Kernel, typename... Args>
void launch(const DeviceLimits& limits, dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > limits.max_threads_per_block) {
    std::ostringstream msg;
    msg << "launch refused: " << threads << " threads per block (the device allows 1 to "
        << limits.max_threads_per_block << ")";
    throw SimError(msg.str());
  }
  if (shared_bytes > limits.max_shared_bytes_per_block) {
    std::ostringstream msg;
    msg << "launch refused: " << shared_bytes << " bytes of shared memory per block (the device allows "
        << limits.max_shared_bytes_per_block << ")";
    throw SimError(msg.str());
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    throw SimError("launch refused: invalid grid dimensions");
  }
  detail::BlockState state;
  state.threads = static_cast<int>(threads);
  state.shuffle_slots.assign(threads, 0);
  state.warp_barriers = std::vector<detail::Barrier>((threads + 31) / 32);
  std::vector<unsigned char> smem(std::max<size_t>(shared_bytes, 1));
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        state.block_barrier.reset(state.threads);
        for (size_t w = 0; w < state.warp_barriers.size(); ++w) state.warp_barriers[w].reset(32);
        state.abort.store(false);
        std::fill(smem.begin(), smem.end(), 0xFF);  // poison: unwritten floats read as NaN
        std::exception_ptr error, consequence;      // the first failure, and the aborts it caused
        std::mutex error_mutex;
        detail::Pool::instance().run(state.threads, [&](int t) {
          detail::thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          detail::block_idx = dim3(bx, by, bz);
          detail::block_dim = block;
          detail::grid_dim = grid;
          detail::dynamic_smem = smem.data();
          detail::current_block = &state;
          try {
            kernel(args...);
          } catch (const SimAborted&) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!consequence) consequence = std::current_exception();
          } catch (...) {
            state.abort.store(true);
            state.block_barrier.wake_all();
            for (auto& wb : state.warp_barriers) wb.wake_all();
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
          }
          detail::current_block = nullptr;
        });
        if (error) std::rethrow_exception(error);
        if (consequence) std::rethrow_exception(consequence);
      }
    }
  }
}

}  // namespace cuda_sim

// The CUDA built-ins and intrinsics the device code may use.
#define threadIdx (::cuda_sim::detail::thread_idx)
#define blockIdx (::cuda_sim::detail::block_idx)
#define blockDim (::cuda_sim::detail::block_dim)
#define gridDim (::cuda_sim::detail::grid_dim)
using cuda_sim::dim3;

inline void __syncthreads() {
  auto& b = ::cuda_sim::detail::block();
  b.block_barrier.wait(b.abort, "__syncthreads()");
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::cuda_sim::detail::shuffle<T>(
      mask, value, [](int lane, int src, int w) { return (lane / w) * w + ((src % w) + w) % w; }, src_lane, width,
      "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::cuda_sim::detail::shuffle<T>(
      mask, value,
      [](int lane, int m, int w) {
        const int src = lane ^ m;
        return (src / w == lane / w) ? src : lane;  // outside the segment: one's own value
      },
      lane_mask, width, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_sim::detail::shuffle<T>(
      mask, value, [](int lane, int d, int w) { return (lane % w) + d < w ? lane + d : lane; }, static_cast<int>(delta),
      width, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_sim::detail::shuffle<T>(
      mask, value, [](int lane, int d, int w) { return (lane % w) >= d ? lane - d : lane; }, static_cast<int>(delta),
      width, "__shfl_up_sync");
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline float __expf(float x) {
  return std::exp(x);
}
inline float __logf(float x) {
  return std::log(x);
}
inline float __fdividef(float a, float b) {
  return a / b;
}
inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}
inline double rsqrt(double x) {
  return 1.0 / std::sqrt(x);
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// A failed device-side assert stops the launch with an error, as a GPU's stops the kernel.
#define FUSED_MLP_DEVICE_ASSERT(cond)                                             \
  do {                                                                            \
    if (!(cond)) throw ::cuda_sim::SimError("device-side assert failed: " #cond); \
  } while (0)

namespace fused_mlp::cuda {
// The launch's dynamic shared memory, as T. No kernel uses dynamic shared memory yet, so only the
// self-tests call this; the first kernel that does adds the device counterpart to
// csrc/cuda/device_common.cuh (an `extern __shared__` array, cast to T), under the same name.
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(::cuda_sim::detail::dynamic_smem);
}
}  // namespace fused_mlp::cuda
