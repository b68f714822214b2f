// The block cache of csrc/cpu_buffers.h.
//
// A training step at batch 1024 allocates tens of megabytes of activations, gradients and GEMM
// outputs and frees them before the next step. Blocks that large come from glibc as fresh mappings
// (or from the top of its heap, which it trims after the step), so every step faulted its pages in
// again and had the kernel zero them: a quarter of the class-notes TrainStep's time at batch 1024
// on this project's machines (docs/cpu_dispatch.md, "Buffers").
// Here a freed block of kMinCachedBytes or more goes onto a list of its size, and the next request
// of that size takes it back; a step asks for the same sizes every time. Smaller blocks are glibc's,
// which keeps them in its heap anyway.
//
// What the cache holds is bounded: FUSED_MLP_CPU_CACHE_MB (default 256) megabytes of freed blocks;
// a block freed beyond that goes back to the system, and 0 turns the cache off. Blocks in use are
// not counted: they belong to their tensors. When the system refuses a block, the cache gives back
// what it holds and asks once more. Values never depend on it: a block is handed out uninitialized,
// as at::empty's (filled with NaN under torch.use_deterministic_algorithms with
// torch.utils.deterministic.fill_uninitialized_memory, as at::empty's are). Each DataPtr's context
// is its data pointer, as the default CPU allocator's is, so copy-on-write clones work on these
// tensors too. The lock is taken around fork(), so a child never inherits it held.
#include "cpu_buffers.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fused_mlp::cpu {
namespace {

constexpr std::size_t kMinCachedBytes = std::size_t{128} << 10;  // glibc's default mmap threshold
constexpr std::size_t kPage = 4096;

constexpr long long kMaxCacheMb = 1LL << 20;  // a tebibyte: anything larger is a typo

std::size_t cache_limit_bytes() {
  const char* env = std::getenv("FUSED_MLP_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return std::size_t{256} << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(std::isdigit(static_cast<unsigned char>(*env)) && *end == '\0' && errno == 0 && mb <= kMaxCacheMb,
              "FUSED_MLP_CPU_CACHE_MB must be a whole number of megabytes from 0 to ", kMaxCacheMb, ", got '", env,
              "'");
  return static_cast<std::size_t>(mb) << 20;
}

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() : limit_(cache_limit_bytes()) {}

  c10::DataPtr allocate(std::size_t nbytes) override {
    if (nbytes < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(nbytes);
    const std::size_t size = (nbytes + kPage - 1) / kPage * kPage;
    void* data = take(size);
    if (data == nullptr) {
      try {
        data = c10::alloc_cpu(size);
      } catch (const c10::Error&) {
        release_all();  // the blocks it holds may be what the system is short of
        data = c10::alloc_cpu(size);
      }
      std::lock_guard<std::mutex> guard(mutex_);
      sizes_[data] = size;
    }
    return {data, data, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  static BlockCache& instance() {
    static BlockCache* cache = [] {
      auto* created = new BlockCache();  // never destroyed: tensors may outlive static destructors
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return created;
    }();
    return *cache;
  }

 private:
  void* take(std::size_t size) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* data = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    return data;
  }

  void put(void* data) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = sizes_.find(data);
      TORCH_INTERNAL_ASSERT(it != sizes_.end());
      const std::size_t size = it->second;
      if (cached_ + size <= limit_) {
        free_[size].push_back(data);
        cached_ += size;
        return;
      }
      sizes_.erase(it);
    }
    c10::free_cpu(data);
  }

  void release_all() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto& [size, list] : free_) {
        for (void* data : list) sizes_.erase(data);
        blocks.insert(blocks.end(), list.begin(), list.end());
      }
      free_.clear();
      cached_ = 0;
    }
    for (void* data : blocks) c10::free_cpu(data);
  }

  static void release(void* data) { instance().put(data); }

  const std::size_t limit_;
  std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;  // freed blocks by size
  std::unordered_map<void*, std::size_t> sizes_;              // the size of every block it allocated
  std::size_t cached_ = 0;
};

}  // namespace

at::Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  at::Tensor out = at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  const at::Context& context = at::globalContext();
  if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(out);
  }
  return out;
}

}  // namespace fused_mlp::cpu
