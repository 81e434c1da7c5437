// Shared helpers of the core: error reporting, aligned buffers, 16-bit float conversions.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include <sys/mman.h>

#include "llaisys.h"
#include "quant.hpp"

namespace llaisys {

// Raised inside the core for caller mistakes; the API layer turns it into a return code.
struct InvalidArgument : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void set_last_error(const std::string &message);
void clear_last_error();

// Size in bytes of one element of a float llaisys_dtype; 0 for a block type or a value that is not a dtype.
inline size_t dtype_size(int32_t dtype) {
    const TypeTraits *t = type_traits(dtype);
    return t && !t->quantized ? size_t(t->block_bytes) : 0;
}

inline const char *dtype_name(int32_t dtype) {
    const TypeTraits *t = type_traits(dtype);
    return t ? t->name : "unknown";
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return float(v);
}

inline uint16_t f32_to_f16(float f) {
    _Float16 v = _Float16(f);
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}

// A zero-initialised, 64-byte aligned byte buffer (cache lines and AVX-512 loads).
class Buffer {
  public:
    Buffer() = default;
    explicit Buffer(size_t bytes) : size_(bytes) {
        // Large buffers (weights, KV cache) are streamed every step: 2 MiB pages spare the TLB.
        const size_t align = bytes >= kHugePage ? kHugePage : 64;
        const size_t rounded = (bytes + 63) / 64 * 64; // whole vectors may be read at the end
        void *p = nullptr;
        if (posix_memalign(&p, align, rounded ? rounded : 64) != 0) throw std::bad_alloc();
        data_.reset(static_cast<uint8_t *>(p));
#ifdef MADV_HUGEPAGE
        if (align == kHugePage) madvise(p, (rounded + 4095) / 4096 * 4096, MADV_HUGEPAGE); // a hint only
#endif
        std::memset(p, 0, rounded);
    }
    uint8_t *data() { return data_.get(); }
    const uint8_t *data() const { return data_.get(); }
    size_t size() const { return size_; }
    template <class T> T *as() { return reinterpret_cast<T *>(data_.get()); }
    template <class T> const T *as() const { return reinterpret_cast<const T *>(data_.get()); }

  private:
    static constexpr size_t kHugePage = size_t(2) << 20;
    struct Free {
        void operator()(uint8_t *p) const { std::free(p); }
    };
    std::unique_ptr<uint8_t, Free> data_;
    size_t size_ = 0;
};

} // namespace llaisys
