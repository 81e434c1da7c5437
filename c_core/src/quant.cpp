// The traits table and the GGUF block types: decoding, packing for the int8 kernels, dequantizing.
// Built with -ffp-contract=off (meson.build): scale * w - min must round twice, as numpy does.
#include "quant.hpp"

#include <cstring>
#include <vector>

#include "common.hpp"

namespace llaisys {
namespace {

constexpr int32_t kQK = 256; // elements of a K-quant super-block

uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

float load_f16(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

void fill(float *dst, int32_t count, float value) {
    for (int32_t i = 0; i < count; ++i) dst[i] = value;
}

// Q8_0: f16 d, 32 int8; value d * q.
void decode_q8_0(const uint8_t *b, int8_t *w, float *scale, float *min) {
    std::memcpy(w, b + 2, 32);
    fill(scale, 2, load_f16(b));
    fill(min, 2, 0.0f);
}

// Q4_0: f16 d, 16 bytes; element j is the low nibble of byte j, element j + 16 its high nibble; d * (q - 8).
void decode_q4_0(const uint8_t *b, int8_t *w, float *scale, float *min) {
    const uint8_t *qs = b + 2;
    for (int32_t j = 0; j < 16; ++j) {
        w[j] = int8_t((qs[j] & 0x0F) - 8);
        w[j + 16] = int8_t((qs[j] >> 4) - 8);
    }
    fill(scale, 2, load_f16(b));
    fill(min, 2, 0.0f);
}

// Q5_0: f16 d, 32 high bits, then Q4_0's nibbles; d * (q - 16).
void decode_q5_0(const uint8_t *b, int8_t *w, float *scale, float *min) {
    const uint32_t qh = load_u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int32_t j = 0; j < 16; ++j) {
        w[j] = int8_t(((qs[j] & 0x0F) | ((qh >> j) & 1) << 4) - 16);
        w[j + 16] = int8_t(((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16);
    }
    fill(scale, 2, load_f16(b));
    fill(min, 2, 0.0f);
}

// Q4_K: f16 d and dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
// nibbles (each 32 bytes: low nibbles one sub-block, high nibbles the next); (d * sc) * q - dmin * m.
void decode_q4_k(const uint8_t *b, int8_t *w, float *scale, float *min) {
    const float d = load_f16(b), dmin = load_f16(b + 2);
    const uint8_t *s = b + 4, *qs = b + 16;
    for (int32_t j = 0; j < 8; ++j) {
        const int32_t sc = j < 4 ? s[j] & 0x3F : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        const int32_t m = j < 4 ? s[j + 4] & 0x3F : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        fill(scale + 2 * j, 2, d * float(sc));
        fill(min + 2 * j, 2, dmin * float(m));
    }
    for (int32_t c = 0; c < 4; ++c)
        for (int32_t l = 0; l < 32; ++l) {
            w[64 * c + l] = int8_t(qs[32 * c + l] & 0x0F);
            w[64 * c + 32 + l] = int8_t(qs[32 * c + l] >> 4);
        }
}

// Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16), f16 d;
// (d * scale) * (q - 32). Element 128 n + 32 q + l takes nibble q / 2 of ql[64 n + 32 (q % 2) + l]
// and bits 2q, 2q + 1 of qh[32 n + l].
void decode_q6_k(const uint8_t *b, int8_t *w, float *scale, float *min) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = reinterpret_cast<const int8_t *>(b + 192);
    const float d = load_f16(b + 208);
    for (int32_t n = 0; n < 2; ++n)
        for (int32_t q = 0; q < 4; ++q)
            for (int32_t l = 0; l < 32; ++l) {
                const int32_t lo = (ql[64 * n + 32 * (q % 2) + l] >> (4 * (q / 2))) & 0x0F;
                const int32_t hi = (qh[32 * n + l] >> (2 * q)) & 0x03;
                w[128 * n + 32 * q + l] = int8_t((lo | hi << 4) - 32);
            }
    for (int32_t g = 0; g < 16; ++g) scale[g] = d * float(sc[g]);
    fill(min, 16, 0.0f);
}

constexpr TypeTraits kF32 = {LLAISYS_DTYPE_F32, "f32", 1, 4, false, 0, 0, 0, false, false, nullptr};
constexpr TypeTraits kF16 = {LLAISYS_DTYPE_F16, "f16", 1, 2, false, 0, 0, 0, false, false, nullptr};
constexpr TypeTraits kBF16 = {LLAISYS_DTYPE_BF16, "bf16", 1, 2, false, 0, 0, 0, false, false, nullptr};
constexpr TypeTraits kQ8_0 = {LLAISYS_DTYPE_Q8_0, "q8_0", 32, 34, true, 32, 8, 0, false, true, decode_q8_0};
constexpr TypeTraits kQ4_0 = {LLAISYS_DTYPE_Q4_0, "q4_0", 32, 18, true, 32, 4, 8, false, true, decode_q4_0};
constexpr TypeTraits kQ5_0 = {LLAISYS_DTYPE_Q5_0, "q5_0", 32, 22, true, 32, 5, 16, false, true, decode_q5_0};
constexpr TypeTraits kQ4_K = {LLAISYS_DTYPE_Q4_K, "q4_k", kQK, 144, true, 32, 4, 0, true, false, decode_q4_k};
constexpr TypeTraits kQ6_K = {LLAISYS_DTYPE_Q6_K, "q6_k", kQK, 210, true, 16, 6, 32, false, false, decode_q6_k};

constexpr int32_t kMaxBlock = kQK;

// Decoded blocks of one row, one block at a time.
struct BlockDecoder {
    const TypeTraits &t;
    int8_t w[kMaxBlock];
    float scale[kMaxBlock / 16], min[kMaxBlock / 16];
    void decode(const uint8_t *block) { t.decode(block, w, scale, min); }
    // The exact value of element e of the decoded block.
    float value(int32_t e) const { return scale[e / 16] * float(w[e]) - min[e / 16]; }
};

// Where column e of row r lives in a packed group's weights (quant.hpp's layouts).
struct PackedPos {
    size_t low;         // the byte holding q (8 bits) or its low nibble
    int32_t low_shift;  // 0 or 4: which nibble
    size_t high;        // the byte holding the high bits (5 and 6 bits)
    int32_t high_shift; // their position in it
};

PackedPos packed_pos(const TypeTraits &t, int32_t r, int32_t e) {
    const int32_t step = e / 4, col = e % 4;
    if (t.bits == 8) return {size_t((step * kQuantPanel + r) * 4 + col), 0, 0, 0};
    const int32_t half = t.group / 8;
    return {size_t(((step % half) * kQuantPanel + r) * 4 + col), step < half ? 0 : 4,
            size_t(t.group) * kQuantPanel / 2 + size_t(r * 4 + col), (t.bits - 4) * step};
}

void put_q(const TypeTraits &t, uint8_t *weights, int32_t r, int32_t e, int8_t w) {
    const PackedPos at = packed_pos(t, r, e);
    if (t.bits == 8) {
        weights[at.low] = uint8_t(w);
        return;
    }
    const uint32_t q = uint32_t(w + t.offset);
    weights[at.low] = uint8_t(weights[at.low] | (q & 0x0F) << at.low_shift);
    if (t.bits > 4) weights[at.high] = uint8_t(weights[at.high] | (q >> 4) << at.high_shift);
}

// q - offset of column e of row r.
int32_t get_w(const TypeTraits &t, const uint8_t *weights, int32_t r, int32_t e) {
    const PackedPos at = packed_pos(t, r, e);
    if (t.bits == 8) return int8_t(weights[at.low]);
    int32_t q = (weights[at.low] >> at.low_shift) & 0x0F;
    if (t.bits > 4) q |= ((weights[at.high] >> at.high_shift) & ((1 << (t.bits - 4)) - 1)) << 4;
    return q - t.offset;
}

// Scale (or min) i of a packed group, f16 or f32 as the type keeps them.
void put_scale(const TypeTraits &t, uint8_t *scales, int32_t i, float value) {
    if (t.half_scale) {
        const uint16_t h = f32_to_f16(value); // exact: the value was an f16
        std::memcpy(scales + 2 * i, &h, 2);
    } else {
        std::memcpy(scales + 4 * i, &value, 4);
    }
}

float get_scale(const TypeTraits &t, const uint8_t *scales, int32_t i) {
    if (t.half_scale) return load_f16(scales + 2 * i);
    float value;
    std::memcpy(&value, scales + 4 * i, 4);
    return value;
}

} // namespace

const TypeTraits *type_traits(int32_t dtype) {
    switch (static_cast<llaisys_dtype>(dtype)) {
    case LLAISYS_DTYPE_F32: return &kF32;
    case LLAISYS_DTYPE_F16: return &kF16;
    case LLAISYS_DTYPE_BF16: return &kBF16;
    case LLAISYS_DTYPE_Q8_0: return &kQ8_0;
    case LLAISYS_DTYPE_Q4_0: return &kQ4_0;
    case LLAISYS_DTYPE_Q5_0: return &kQ5_0;
    case LLAISYS_DTYPE_Q4_K: return &kQ4_K;
    case LLAISYS_DTYPE_Q6_K: return &kQ6_K;
    }
    return nullptr; // not an enumerator
}

size_t row_bytes(const TypeTraits &t, int64_t n) {
    if (n < 0 || n % t.block_elems != 0) return 0;
    return size_t(n / t.block_elems) * size_t(t.block_bytes);
}

size_t quant_packed_bytes(const TypeTraits &t, int32_t n, int32_t k) {
    const size_t panels = size_t((n + kQuantPanel - 1) / kQuantPanel);
    return panels * size_t(k / t.group) * quant_group_bytes(t);
}

void quant_pack(const TypeTraits &t, const uint8_t *rows, int32_t n, int32_t k, uint8_t *out, int32_t n_threads) {
    const int32_t n_panels = (n + kQuantPanel - 1) / kQuantPanel, groups = k / t.group;
    const int32_t groups_per_block = t.block_elems / t.group;
    const size_t gbytes = quant_group_bytes(t), rbytes = row_bytes(t, k);
    // Rows past n stay zero (the buffer comes zeroed): weight 0, scale 0, min 0.
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 16)
    for (int32_t p = 0; p < n_panels; ++p) {
        BlockDecoder dec{t, {}, {}, {}};
        uint8_t *panel = out + size_t(p) * size_t(groups) * gbytes;
        for (int32_t r = 0; r < kQuantPanel && p * kQuantPanel + r < n; ++r) {
            const uint8_t *row = rows + size_t(p * kQuantPanel + r) * rbytes;
            for (int32_t b = 0; b < k / t.block_elems; ++b) {
                dec.decode(row + size_t(b) * size_t(t.block_bytes));
                for (int32_t g = 0; g < groups_per_block; ++g) {
                    uint8_t *group = panel + size_t(b * groups_per_block + g) * gbytes;
                    uint8_t *scales = group + quant_weight_bytes(t.group, t.bits);
                    for (int32_t e = 0; e < t.group; ++e) put_q(t, group, r, e, dec.w[g * t.group + e]);
                    put_scale(t, scales, r, dec.scale[g * t.group / 16]);
                    if (t.has_min) put_scale(t, scales, kQuantPanel + r, dec.min[g * t.group / 16]);
                }
            }
        }
    }
}

void quant_packed_row(const TypeTraits &t, const uint8_t *packed, int32_t k, int32_t row, float *out) {
    const int32_t groups = k / t.group, r = row % kQuantPanel;
    const size_t gbytes = quant_group_bytes(t);
    const uint8_t *panel = packed + size_t(row / kQuantPanel) * size_t(groups) * gbytes;
    for (int32_t g = 0; g < groups; ++g) {
        const uint8_t *group = panel + size_t(g) * gbytes;
        const uint8_t *scales = group + quant_weight_bytes(t.group, t.bits);
        const float scale = get_scale(t, scales, r), min = t.has_min ? get_scale(t, scales, kQuantPanel + r) : 0.0f;
        for (int32_t e = 0; e < t.group; ++e) out[g * t.group + e] = scale * float(get_w(t, group, r, e)) - min;
    }
}

void quant_dequantize(const TypeTraits &t, const uint8_t *blocks, int64_t n, float *out) {
    BlockDecoder dec{t, {}, {}, {}};
    for (int64_t b = 0; b < n / t.block_elems; ++b) {
        dec.decode(blocks + b * t.block_bytes);
        for (int32_t e = 0; e < t.block_elems; ++e) out[b * t.block_elems + e] = dec.value(e);
    }
}

} // namespace llaisys
