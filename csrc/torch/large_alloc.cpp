// Large CPU allocations, in two forms.
// - The block cache (qlora_ext.cpu_block_cache): torch's CPU allocator, replaced. Tensors of at least
//   min_bytes are anonymous mappings of their own, kept after they die and handed to the next tensor that
//   fits (policy at BlockCache). glibc's malloc instead serves blocks up to
//   its (growing) mmap threshold from its heap, where a training step's freed activations stay resident as
//   holes between long-lived tensors; and mapping each block afresh faults its pages in on every step.
// - Large outputs of the ops when the cache is off: 2 MiB-aligned mappings advised MADV_HUGEPAGE. A fresh
//   tensor above glibc's mmap threshold (32 MiB) is a new mapping on every call, filled with one first-touch
//   page fault per 4 KiB page (dequantize_4bit into a fresh 64 MiB float32 tensor: 10x the time of the out=
//   form where transparent huge pages are in "madvise" mode); advised mappings fault in 2 MiB pages.
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace qx_torch {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kPage = 4096;

// A fresh anonymous mapping of len bytes (a multiple of the page size), nullptr when the system refuses; with
// huge, 2 MiB-aligned and advised MADV_HUGEPAGE (len a multiple of 2 MiB).
void* map_bytes(size_t len, bool huge) {
  const size_t extra = huge ? kHuge : 0;
  void* raw = mmap(nullptr, len + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  if (!huge) return raw;
  // over-mapped by one huge page: trim to a 2 MiB-aligned range (THP needs aligned 2 MiB extents)
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw), aligned = (start + kHuge - 1) & ~(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = aligned + len, raw_end = start + len + extra;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
  void* p = reinterpret_cast<void*>(aligned);
  madvise(p, len, MADV_HUGEPAGE);  // advice only: a kernel without THP ignores it and 4 KiB pages remain
  return p;
}

struct Mapping {
  void* base;
  size_t len;
};

void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  munmap(m->base, m->len);
  delete m;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kLargeOutputBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t len = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* p = map_bytes(len, true);
    QX_CHECK(p != nullptr, "could not map ", nbytes, " bytes for an output tensor (out of memory?)");
    return {p, new Mapping{p, len}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

struct Block {
  void* p;
  size_t len;  // a multiple of the page size
  std::multimap<size_t, Block*>::iterator pos;  // in the free blocks, while cached
  std::list<Block*>::iterator lru;
};

// Policy. A request takes the smallest cached block that fits it with at most 1/8 to spare (tensors of nearly
// the same size share blocks; long-lived ones still get exact mappings), and of several that long the one freed
// last: it is the likeliest still in the CPU's caches (as glibc's heap reuses its last freed chunk); taking the
// oldest instead made a SmolLM2 training step 4-8% slower in each of 3 alternated rounds. Cached blocks are
// bounded twice: by the limit, and by the high-water mark of the blocks in use, so that in use + cached never
// exceeds the most ever in use at once: the cache then never raises the process's peak above what unmapping
// every freed block at once would give, and a training step, whose peak recurs every step, finds its freed
// activations again. Blocks that no longer fit go oldest first.
class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance() {
    static BlockCache* c = [] {
      auto* cache = new BlockCache();  // never destroyed: tensors may be freed at exit
      // a fork (a DataLoader worker) while another thread holds the lock must not leave it held in the child
      pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); },
                     [] { instance().mu_.unlock(); });
      return cache;
    }();
    return *c;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (!enabled_.load(std::memory_order_relaxed) || nbytes < min_bytes_)
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    // huge-page sized and aligned from 32 MiB on (<= 1/16 more), as the ops' large outputs are otherwise
    const size_t unit = nbytes >= kLargeOutputBytes ? kHuge : kPage;
    const size_t len = (nbytes + unit - 1) / unit * unit;
    Block* b = nullptr;
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(len);
      if (it != free_.end() && it->first <= len + len / 8) {
        it = std::prev(free_.upper_bound(it->first));  // of that length, the last freed (emplace puts it last)
        b = it->second;
        uncache_locked(b);
        ++hits_;
        use_locked(b);
      } else {
        // a new mapping: first make room under the high-water mark (it rises only if in use does)
        evict_locked(std::max(peak_live_, live_ + len) - live_ - len, drop);
      }
    }
    for (Block* d : drop) destroy(d);
    if (b == nullptr) {
      const bool huge = unit == kHuge;
      void* p = map_bytes(len, huge);
      if (p == nullptr) {  // the system is short: give back every cached block and try once more
        evict(0);
        p = map_bytes(len, huge);
      }
      QX_CHECK(p != nullptr, "could not map ", nbytes, " bytes for a CPU tensor (out of memory?)");
      b = new Block{p, len, {}, {}};
      std::lock_guard<std::mutex> g(mu_);
      ++maps_;
      use_locked(b);
    }
    // context == data pointer, as raw_allocate requires (some kernels take scratch memory that way)
    return {b->p, b->p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }
  // Frees what allocate gave, the cache's blocks and malloc's smaller ones alike (raw_deallocate).
  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void configure(bool on, size_t limit, size_t min_bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = limit;
      min_bytes_ = std::max<size_t>(min_bytes, 1);
      enabled_ = on;
    }
    evict(on ? limit : 0);
    if (on && !installed_) {
      c10::SetCPUAllocator(this, /*priority=*/1);
      installed_ = true;
    }
  }

  bool on() const { return enabled_.load(std::memory_order_relaxed); }

  // Cached blocks out, oldest first, until at most `limit` bytes stay cached.
  void evict(size_t limit) {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      evict_locked(limit, drop);
    }
    for (Block* b : drop) destroy(b);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(enabled_.load()), int64_t(live_), int64_t(cached_), int64_t(peak_live_), int64_t(hits_),
            int64_t(maps_)};
  }

 private:
  static void release(void* p) { instance().give_back(p); }

  static void destroy(Block* b) {
    munmap(b->p, b->len);
    delete b;
  }

  void give_back(void* p) {
    std::vector<Block*> drop;
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = in_use_.find(p);
      if (it != in_use_.end()) {
        b = it->second;
        in_use_.erase(it);
        live_ -= b->len;
        if (!enabled_.load(std::memory_order_relaxed) || b->len > limit_) {
          drop.push_back(b);
        } else {
          b->pos = free_.emplace(b->len, b);
          b->lru = lru_.insert(lru_.end(), b);
          cached_ += b->len;
          evict_locked(limit_, drop);
        }
      }
    }
    // not a block: one of malloc's, handed out by raw_allocate through this allocator
    if (b == nullptr) c10::GetDefaultCPUAllocator()->raw_deleter()(p);
    for (Block* d : drop) destroy(d);
  }

  void use_locked(Block* b) {
    in_use_[b->p] = b;
    live_ += b->len;
    peak_live_ = std::max(peak_live_, live_);
  }

  void uncache_locked(Block* b) {
    free_.erase(b->pos);
    lru_.erase(b->lru);
    cached_ -= b->len;
  }

  void evict_locked(size_t limit, std::vector<Block*>& drop) {
    while (cached_ > limit && !lru_.empty()) {
      Block* b = lru_.front();
      uncache_locked(b);
      drop.push_back(b);
    }
  }

  std::mutex mu_;
  std::atomic<bool> enabled_{false};
  bool installed_ = false;
  size_t limit_ = 0, min_bytes_ = 1, cached_ = 0, live_ = 0, peak_live_ = 0, hits_ = 0, maps_ = 0;
  std::multimap<size_t, Block*> free_;     // cached blocks by length
  std::list<Block*> lru_;                  // cached blocks, oldest first
  std::unordered_map<void*, Block*> in_use_;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu()) return at::empty(shape, opts);
  const size_t nbytes = size_t(checked_numel(shape)) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  // the block cache, when on, serves them (reused blocks fault nothing in)
  if (nbytes < kLargeOutputBytes || BlockCache::instance().on()) return at::empty(shape, opts);
  static HugePageAllocator alloc;
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, &alloc, /*resizable=*/true);
  return at::empty({0}, opts).set_(storage, 0, shape);
}

void cpu_block_cache(bool on, int64_t limit_bytes, int64_t min_bytes) {
  QX_CHECK(limit_bytes >= 0 && min_bytes >= 0, "cpu_block_cache: limit_bytes and min_bytes must be >= 0, got ",
           limit_bytes, " and ", min_bytes);
  BlockCache::instance().configure(on, size_t(limit_bytes), size_t(min_bytes));
}

std::vector<int64_t> cpu_block_cache_stats() { return BlockCache::instance().stats(); }

}  // namespace qx_torch
