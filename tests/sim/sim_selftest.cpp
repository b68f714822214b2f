// Self-tests of the CUDA simulation (csrc/sim/cuda_sim.h): kernels whose results a GPU defines,
// and kernels a GPU would reject or hang on. Prints one line per test and "N passed, M failed".
// `sim_selftest oob` instead runs a kernel that writes past its buffer, for AddressSanitizer.
#include "sim/cuda_sim.h"

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float partial[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  partial[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {  // needs every barrier
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void shuffles(int* out) {
  const int lane = threadIdx.x % 32, base = (threadIdx.x / 32) * 32 * 6;
  const int v = lane * 10;
  out[base + lane * 6 + 0] = __shfl_sync(0xffffffffu, v, 3);
  out[base + lane * 6 + 1] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[base + lane * 6 + 2] = __shfl_down_sync(0xffffffffu, v, 1);
  out[base + lane * 6 + 3] = __shfl_up_sync(0xffffffffu, v, 2);
  out[base + lane * 6 + 4] = __shfl_xor_sync(0xffffffffu, v, 4, 8);
  out[base + lane * 6 + 5] = __shfl_down_sync(0xffffffffu, v, 4, 8);
}

__global__ void warp_sum(const float* x, float* out) {
  float v = x[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

__global__ void atomics(float* f, int* i) {
  atomicAdd(f, 1.0f);
  atomicAdd(i, static_cast<int>(threadIdx.x));
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void early_return_before_shuffle(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shuffle_in_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void read_unwritten_shared(float* out) {
  float* smem = fused_mlp::cuda::dynamic_shared<float>();
  out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void write_past_the_end(float* out, int n) {
  out[n + threadIdx.x] = 1.0f;  // one block of n threads writes n floats past the buffer
}

int passed = 0, failed = 0;

void check(const std::string& name, const std::function<bool()>& body) {
  bool ok = false;
  std::string detail;
  try {
    ok = body();
  } catch (const std::exception& e) {
    detail = e.what();
  }
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  (ok ? passed : failed)++;
}

// True when `launch_it` throws a SimError whose message contains `expected`.
bool refused(const std::function<void()>& launch_it, const std::string& expected) {
  try {
    launch_it();
  } catch (const cuda_sim::SimError& e) {
    const bool match = std::string(e.what()).find(expected) != std::string::npos;
    if (!match) std::printf("  unexpected message: %s\n", e.what());
    return match;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  using cuda_sim::kH100;
  cuda_sim::set_barrier_timeout(std::chrono::milliseconds(300));
  if (argc > 1 && std::string(argv[1]) == "oob") {
    std::vector<float>* out = new std::vector<float>(64);
    cuda_sim::launch(kH100, dim3(1), dim3(64), 0, write_past_the_end, out->data(), 64);
    std::printf("wrote past the end without a report\n");
    return 0;
  }

  check("a block reduction that needs __syncthreads", [] {
    const int n = 1000;
    std::vector<float> x(n), out(4);
    for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7);
    cuda_sim::launch(kH100, dim3(4), dim3(256), 0, block_sum, x.data(), out.data(), n);
    double total = 0, want = 0;
    for (float v : out) total += v;
    for (float v : x) want += v;
    return total == want;
  });
  check("__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync, with width", [] {
    std::vector<int> out(64 * 6);
    cuda_sim::launch(kH100, dim3(1), dim3(64), 0, shuffles, out.data());
    for (int warp = 0; warp < 2; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        const int* o = out.data() + warp * 32 * 6 + lane * 6;
        const int seg = (lane / 8) * 8;
        const int want[6] = {30,
                             (lane ^ 1) * 10,
                             (lane < 31 ? lane + 1 : lane) * 10,
                             (lane >= 2 ? lane - 2 : lane) * 10,
                             (seg + ((lane % 8) ^ 4)) * 10,
                             ((lane % 8) + 4 < 8 ? lane + 4 : lane) * 10};
        for (int k = 0; k < 6; ++k) {
          if (o[k] != want[k]) return false;
        }
      }
    }
    return true;
  });
  check("a butterfly warp sum", [] {
    std::vector<float> x(32), out(32);
    for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i);
    cuda_sim::launch(kH100, dim3(1), dim3(32), 0, warp_sum, x.data(), out.data());
    for (float v : out) {
      if (v != 496.0f) return false;
    }
    return true;
  });
  check("atomicAdd from 4 blocks of 256 threads", [] {
    float f = 0;
    int i = 0;
    cuda_sim::launch(kH100, dim3(4), dim3(256), 0, atomics, &f, &i);
    return f == 1024.0f && i == 4 * (255 * 256 / 2);
  });
  check("a divergent __syncthreads is reported, not hung on", [] {
    std::vector<float> out(64);
    return refused([&] { cuda_sim::launch(kH100, dim3(1), dim3(64), 0, divergent_barrier, out.data()); },
                   "__syncthreads() not reached by every thread");
  });
  check("an early return before a full-mask shuffle is reported", [] {
    std::vector<float> out(32);
    return refused([&] { cuda_sim::launch(kH100, dim3(1), dim3(32), 0, early_return_before_shuffle, out.data()); },
                   "__shfl_xor_sync not reached by every thread");
  });
  check("a full-mask shuffle in a partial warp is reported", [] {
    std::vector<float> out(48);
    return refused([&] { cuda_sim::launch(kH100, dim3(1), dim3(48), 0, shuffle_in_partial_warp, out.data()); },
                   "partial warp");
  });
  check("more threads per block than the device allows is refused", [] {
    std::vector<float> out(2048);
    return refused([&] { cuda_sim::launch(kH100, dim3(1), dim3(2048), 0, divergent_barrier, out.data()); },
                   "2048 threads per block");
  });
  check("more shared memory than the device allows is refused", [] {
    std::vector<float> out(32);
    return refused([&] { cuda_sim::launch(kH100, dim3(1), dim3(32), 300 * 1024, read_unwritten_shared, out.data()); },
                   "bytes of shared memory");
  });
  check("dynamic shared memory starts poisoned (unwritten floats are NaN)", [] {
    std::vector<float> out(32);
    cuda_sim::launch(kH100, dim3(1), dim3(32), 32 * sizeof(float), read_unwritten_shared, out.data());
    for (float v : out) {
      if (!std::isnan(v)) return false;
    }
    return true;
  });
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
