// The traits table and the GGUF block types: decoding, packing for the int8 kernels, dequantizing.
// Built with -ffp-contract=off (meson.build): scale * w - min must round twice, as numpy does.
#include "quant.hpp"

#include <algorithm>
#include <cstring>

#include "common.hpp"

namespace llaisys {
namespace {

constexpr int32_t kQK = 256; // elements of a K-quant super-block

uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// The simple types' common part: one f16 d scales every element, no min.
void set_plain_scale(const uint8_t *d, DecodedBlock &out) {
    out.d = load_u16(d);
    out.dmin = 0;
    std::memset(out.sc, 1, sizeof out.sc);
    std::memset(out.m, 0, sizeof out.m);
}

// Q8_0: f16 d, 32 int8; value d * q.
void decode_q8_0(const uint8_t *b, DecodedBlock &out) {
    std::memcpy(out.w, b + 2, 32);
    set_plain_scale(b, out);
}

// Q4_0: f16 d, 16 bytes; element j is the low nibble of byte j, element j + 16 its high nibble; d * (q - 8).
void decode_q4_0(const uint8_t *b, DecodedBlock &out) {
    const uint8_t *qs = b + 2;
    for (int32_t j = 0; j < 16; ++j) {
        out.w[j] = int8_t((qs[j] & 0x0F) - 8);
        out.w[j + 16] = int8_t((qs[j] >> 4) - 8);
    }
    set_plain_scale(b, out);
}

// Q5_0: f16 d, 32 high bits, then Q4_0's nibbles; d * (q - 16).
void decode_q5_0(const uint8_t *b, DecodedBlock &out) {
    const uint32_t qh = load_u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int32_t j = 0; j < 16; ++j) {
        out.w[j] = int8_t(((qs[j] & 0x0F) | ((qh >> j) & 1) << 4) - 16);
        out.w[j + 16] = int8_t(((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16);
    }
    set_plain_scale(b, out);
}

// Q4_K: f16 d and dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
// nibbles (each 32 bytes: low nibbles one sub-block, high nibbles the next); (d * sc) * q - dmin * m.
void decode_q4_k(const uint8_t *b, DecodedBlock &out) {
    out.d = load_u16(b);
    out.dmin = load_u16(b + 2);
    const uint8_t *s = b + 4, *qs = b + 16;
    for (int32_t j = 0; j < 8; ++j) {
        const int32_t sc = j < 4 ? s[j] & 0x3F : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        const int32_t m = j < 4 ? s[j + 4] & 0x3F : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        out.sc[2 * j] = out.sc[2 * j + 1] = int8_t(sc);
        out.m[2 * j] = out.m[2 * j + 1] = uint8_t(m);
    }
    for (int32_t c = 0; c < 4; ++c)
        for (int32_t l = 0; l < 32; ++l) {
            out.w[64 * c + l] = int8_t(qs[32 * c + l] & 0x0F);
            out.w[64 * c + 32 + l] = int8_t(qs[32 * c + l] >> 4);
        }
}

// Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16), f16 d;
// (d * scale) * (q - 32). Element 128 n + 32 q + l takes nibble q / 2 of ql[64 n + 32 (q % 2) + l]
// and bits 2q, 2q + 1 of qh[32 n + l].
void decode_q6_k(const uint8_t *b, DecodedBlock &out) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int32_t n = 0; n < 2; ++n)
        for (int32_t q = 0; q < 4; ++q)
            for (int32_t l = 0; l < 32; ++l) {
                const int32_t lo = (ql[64 * n + 32 * (q % 2) + l] >> (4 * (q / 2))) & 0x0F;
                const int32_t hi = (qh[32 * n + l] >> (2 * q)) & 0x03;
                out.w[128 * n + 32 * q + l] = int8_t((lo | hi << 4) - 32);
            }
    std::memcpy(out.sc, b + 192, 16);
    out.d = load_u16(b + 208);
    out.dmin = 0;
    std::memset(out.m, 0, sizeof out.m);
}

constexpr TypeTraits kF32 = {LLAISYS_DTYPE_F32, "f32", 1, 4, false, 0, 0, 0, 0, false, nullptr};
constexpr TypeTraits kF16 = {LLAISYS_DTYPE_F16, "f16", 1, 2, false, 0, 0, 0, 0, false, nullptr};
constexpr TypeTraits kBF16 = {LLAISYS_DTYPE_BF16, "bf16", 1, 2, false, 0, 0, 0, 0, false, nullptr};
constexpr TypeTraits kQ8_0 = {LLAISYS_DTYPE_Q8_0, "q8_0", 32, 34, true, 32, 8, 128, 1, false, decode_q8_0};
constexpr TypeTraits kQ4_0 = {LLAISYS_DTYPE_Q4_0, "q4_0", 32, 18, true, 32, 4, 8, 1, false, decode_q4_0};
constexpr TypeTraits kQ5_0 = {LLAISYS_DTYPE_Q5_0, "q5_0", 32, 22, true, 32, 5, 16, 1, false, decode_q5_0};
constexpr TypeTraits kQ4_K = {LLAISYS_DTYPE_Q4_K, "q4_k", kQK, 144, true, 32, 4, 0, 8, true, decode_q4_k};
constexpr TypeTraits kQ6_K = {LLAISYS_DTYPE_Q6_K, "q6_k", kQK, 210, true, 16, 6, 32, 16, false, decode_q6_k};

// Where a row's fields and q live in a packed super-block (quant.hpp's layout).
struct SuperBlock {
    const TypeTraits &t;
    size_t d(int32_t r) const { return size_t(2 * r); }
    size_t dmin(int32_t r) const { return size_t(2 * (kQuantPanel + r)); }
    size_t sc(int32_t r, int32_t g) const { return size_t(kQuantPanel * (t.has_min ? 4 : 2) + g * kQuantPanel + r); }
    size_t m(int32_t r, int32_t g) const {
        return size_t(kQuantPanel * (4 + t.super_groups) + g * kQuantPanel + r); // only types with mins
    }
    // The byte holding column e of row r in group g (8 bits: q; else its low nibble), with the
    // nibble's shift, and the byte and shift of its high bits (5 and 6 bits).
    struct Pos {
        size_t low;
        int32_t low_shift;
        size_t high;
        int32_t high_shift;
    };
    Pos q(int32_t r, int32_t g, int32_t e) const {
        const size_t group = quant_header_bytes(t.super_groups, t.has_min) + size_t(g) * quant_weight_bytes(t.group, t.bits);
        const int32_t step = e / 4, col = e % 4;
        if (t.bits == 8) return {group + size_t((step * kQuantPanel + r) * 4 + col), 0, 0, 0};
        const int32_t half = t.group / 8;
        return {group + size_t(((step % half) * kQuantPanel + r) * 4 + col), step < half ? 0 : 4,
                group + size_t(t.group) * kQuantPanel / 2 + size_t(r * 4 + col), (t.bits - 4) * step};
    }
};

void put_u16(uint8_t *p, uint16_t v) { std::memcpy(p, &v, 2); }

// One group's weights in the packed layout (quant.hpp) from its 16 rows of unsigned q, q[r][e].
void pack_group(const TypeTraits &t, const uint8_t (*q)[32], uint8_t *out) {
    const int32_t steps = t.group / 4, half = t.group / 8;
    if (t.bits == 8) {
        for (int32_t s = 0; s < steps; ++s)
            for (int32_t r = 0; r < kQuantPanel; ++r) std::memcpy(out + (s * kQuantPanel + r) * 4, &q[r][4 * s], 4);
        return;
    }
    for (int32_t s = 0; s < half; ++s)
        for (int32_t r = 0; r < kQuantPanel; ++r)
            for (int32_t c = 0; c < 4; ++c)
                out[(s * kQuantPanel + r) * 4 + c] = uint8_t((q[r][4 * s + c] & 0x0F) | (q[r][4 * (s + half) + c] & 0x0F) << 4);
    if (t.bits == 4) return;
    uint8_t *high = out + t.group * kQuantPanel / 2;
    for (int32_t r = 0; r < kQuantPanel; ++r)
        for (int32_t c = 0; c < 4; ++c) {
            uint32_t bits = 0;
            for (int32_t s = 0; s < steps; ++s) bits |= uint32_t(q[r][4 * s + c] >> 4) << ((t.bits - 4) * s);
            high[r * 4 + c] = uint8_t(bits);
        }
}

} // namespace

float DecodedBlock::value(int32_t e) const {
    return (f16_to_f32(d) * float(sc[e / 16])) * float(w[e]) - f16_to_f32(dmin) * float(m[e / 16]);
}

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
    return panels * size_t(k / t.block_elems) * quant_super_bytes(t);
}

// A super-block spans one GGUF block: the panel's rows of it decode, then pack group by group.
void quant_pack(const TypeTraits &t, const uint8_t *rows, int32_t n, int32_t k, uint8_t *out, int32_t n_threads) {
    const int32_t n_panels = (n + kQuantPanel - 1) / kQuantPanel, supers = k / t.block_elems;
    const size_t sbytes = quant_super_bytes(t), rbytes = row_bytes(t, k);
    const size_t header = quant_header_bytes(t.super_groups, t.has_min), wbytes = quant_weight_bytes(t.group, t.bits);
    const SuperBlock at{t};
    // Rows past n stay zero (the buffer comes zeroed): q 0, scale 0, min 0.
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 16)
    for (int32_t p = 0; p < n_panels; ++p) {
        const int32_t valid = std::min(kQuantPanel, n - p * kQuantPanel);
        DecodedBlock dec[kQuantPanel];
        uint8_t q[kQuantPanel][32] = {};
        for (int32_t b = 0; b < supers; ++b) {
            uint8_t *sb = out + (size_t(p) * size_t(supers) + size_t(b)) * sbytes;
            for (int32_t r = 0; r < valid; ++r) {
                t.decode(rows + size_t(p * kQuantPanel + r) * rbytes + size_t(b) * size_t(t.block_bytes), dec[r]);
                put_u16(sb + at.d(r), dec[r].d);
                if (t.has_min) put_u16(sb + at.dmin(r), dec[r].dmin);
            }
            for (int32_t g = 0; g < t.super_groups; ++g) {
                for (int32_t r = 0; r < valid; ++r) {
                    if (t.super_groups > 1) sb[at.sc(r, g)] = uint8_t(dec[r].sc[g * t.group / 16]);
                    if (t.has_min) sb[at.m(r, g)] = dec[r].m[g * t.group / 16];
                    for (int32_t e = 0; e < t.group; ++e) q[r][e] = uint8_t(dec[r].w[g * t.group + e] + t.offset);
                }
                pack_group(t, q, sb + header + size_t(g) * wbytes);
            }
        }
    }
}

void quant_packed_row(const TypeTraits &t, const uint8_t *packed, int32_t k, int32_t row, float *out) {
    const int32_t supers = k / t.block_elems, r = row % kQuantPanel;
    const size_t sbytes = quant_super_bytes(t);
    const SuperBlock at{t};
    DecodedBlock dec;
    for (int32_t b = 0; b < supers; ++b) {
        const uint8_t *sb = packed + (size_t(row / kQuantPanel) * size_t(supers) + size_t(b)) * sbytes;
        dec.d = load_u16(sb + at.d(r));
        dec.dmin = t.has_min ? load_u16(sb + at.dmin(r)) : 0;
        for (int32_t g = 0; g < t.super_groups; ++g)
            for (int32_t e = 0; e < t.group; e += 16) {
                dec.sc[(g * t.group + e) / 16] = t.super_groups > 1 ? int8_t(sb[at.sc(r, g)]) : 1;
                dec.m[(g * t.group + e) / 16] = t.has_min ? sb[at.m(r, g)] : 0;
            }
        for (int32_t e = 0; e < t.block_elems; ++e) {
            const SuperBlock::Pos pos = at.q(r, e / t.group, e % t.group);
            int32_t q = (sb[pos.low] >> pos.low_shift) & (t.bits == 8 ? 0xFF : 0x0F);
            if (t.bits == 5 || t.bits == 6) q |= ((sb[pos.high] >> pos.high_shift) & ((1 << (t.bits - 4)) - 1)) << 4;
            dec.w[e] = int8_t(q - t.offset);
        }
        for (int32_t e = 0; e < t.block_elems; ++e) out[b * t.block_elems + e] = dec.value(e);
    }
}

void quant_dequantize(const TypeTraits &t, const uint8_t *blocks, int64_t n, float *out) {
    DecodedBlock dec;
    for (int64_t b = 0; b < n / t.block_elems; ++b) {
        t.decode(blocks + b * t.block_bytes, dec);
        for (int32_t e = 0; e < t.block_elems; ++e) out[b * t.block_elems + e] = dec.value(e);
    }
}

} // namespace llaisys
