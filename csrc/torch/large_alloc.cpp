// Large CPU outputs of the ops: 2 MiB-aligned anonymous mappings advised MADV_HUGEPAGE. A fresh tensor from
// torch's CPU allocator above glibc's mmap threshold (32 MiB) is a new mapping on every call, so filling it
// takes one first-touch page fault per 4 KiB page (dequantize_4bit into a fresh 64 MiB float32 tensor: 10x
// the time of the out= form on a machine whose transparent huge pages are in "madvise" mode). Advised
// mappings fault in 2 MiB pages where the kernel has them; the mapping is released when the tensor dies.
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdint>

#include "common.h"

namespace qx_torch {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

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
    // over-map by one huge page, then trim to a 2 MiB-aligned range (THP needs aligned 2 MiB extents)
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    QX_CHECK(raw != MAP_FAILED, "could not map ", nbytes, " bytes for an output tensor (out of memory?)");
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw), aligned = (start + kHuge - 1) & ~(kHuge - 1);
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = aligned + len, raw_end = start + len + kHuge;
    if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
    void* p = reinterpret_cast<void*>(aligned);
    madvise(p, len, MADV_HUGEPAGE);  // advice only: a kernel without THP ignores it and 4 KiB pages remain
    return {p, new Mapping{p, len}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu()) return at::empty(shape, opts);
  const size_t nbytes = size_t(checked_numel(shape)) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes < kLargeOutputBytes) return at::empty(shape, opts);
  static HugePageAllocator alloc;
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, &alloc, /*resizable=*/true);
  return at::empty({0}, opts).set_(storage, 0, shape);
}

}  // namespace qx_torch
