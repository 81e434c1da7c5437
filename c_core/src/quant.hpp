// Weight element types: a traits table over every llaisys_dtype, and the GGUF block types'
// decoding and packing (block layouts as in ggml-common.h).
//
// A quantized matrix is stored packed for the int8 kernels, in panels of 16 rows. Every type's
// weights are unsigned q with an offset (the value is scale * (q - offset) - min); Q8_0's signed
// q is kept as q + 128. A panel is a run of super-blocks, each of S groups of G columns (G = the
// columns sharing one scale; S = 1 for Q8_0/Q4_0/Q5_0, whose scale is the block's f16 d, and
// S = 256 / G for the K types, whose group scale is d * sc with an f16 d per super-block and a
// small integer sc per group, as in GGUF, so the panels are exactly as small as GGUF's blocks).
// A super-block holds, for its 16 rows:
//   16 f16 d; with mins 16 f16 dmin; for S > 1, S x 16 int8 sc; with mins S x 16 uint8 m;
//   then its S groups' weights. In a group, a kernel step is 4 columns of the 16 rows (a 4-byte
//   lane per row): 8-bit q as bytes [G / 4 steps][16 rows][4 columns]; 4- to 6-bit q as low
//   nibbles [G / 8][16][4] (step s in the low nibbles of word s, step s + G / 8 in the high ones),
//   then for 5 and 6 bits one word per row whose byte t holds at bits [h s, h s + h) the h high
//   bits of column 4 s + t.
// An element's value is (d * sc) * (q - offset) - dmin * m (sc = 1 and no min for S = 1), which
// reproduces gguf.quants.dequantize bit for bit: each product of an f16 and a small integer is exact.
#pragma once

#include <cstddef>
#include <cstdint>

#include "llaisys.h"

namespace llaisys {

constexpr int32_t kQuantPanel = 16; // rows per panel of a packed quantized matrix

// One GGUF block decoded: q - offset per element, and per 16 elements the integer scale and min
// that d and dmin multiply.
struct DecodedBlock {
    int8_t w[256];
    uint16_t d, dmin; // f16 bits
    int8_t sc[16];
    uint8_t m[16];
    // The exact value of element e, as gguf computes it.
    float value(int32_t e) const;
};
using DecodeBlockFn = void (*)(const uint8_t *block, DecodedBlock &out);

struct TypeTraits {
    int32_t dtype;
    const char *name;
    int32_t block_elems;  // elements per block (1 for the float types)
    int32_t block_bytes;  // bytes per block as the caller writes it (GGUF layout for block types)
    bool quantized;       // a GGUF block type: only matrices hold it, packed for the int8 kernels
    int32_t group;        // quantized: columns sharing one scale in the packed form (16 or 32)
    int32_t bits;         // quantized: bits of unsigned q (4, 5, 6 or 8)
    int32_t offset;       // quantized: subtracted from q
    int32_t super_groups; // quantized: groups per super-block (S above)
    bool has_min;         // quantized: elements have a per-group min dmin * m
    DecodeBlockFn decode; // quantized: one block to q - offset, scales and mins
};

// The traits of dtype, or nullptr when it is not a llaisys_dtype.
const TypeTraits *type_traits(int32_t dtype);

// Bytes of a row of n elements in the caller's layout; 0 when n is not a whole number of blocks.
size_t row_bytes(const TypeTraits &t, int64_t n);

// Bytes of the packed form of an n x k quantized matrix, and the packing of row-major GGUF blocks.
size_t quant_packed_bytes(const TypeTraits &t, int32_t n, int32_t k);
void quant_pack(const TypeTraits &t, const uint8_t *rows, int32_t n, int32_t k, uint8_t *out, int32_t n_threads);

// Row `row` of a packed quantized matrix as f32 (bit-identical to gguf.quants.dequantize).
void quant_packed_row(const TypeTraits &t, const uint8_t *packed, int32_t k, int32_t row, float *out);

// n elements of row-major GGUF blocks as f32 (n a whole number of blocks).
void quant_dequantize(const TypeTraits &t, const uint8_t *blocks, int64_t n, float *out);

// Sizes in a packed panel: one group's weights, a super-block's scale header, a whole super-block.
constexpr size_t quant_weight_bytes(int32_t group, int32_t bits) { return size_t(group) * kQuantPanel * bits / 8; }
constexpr size_t quant_header_bytes(int32_t super_groups, bool has_min) {
    return size_t(kQuantPanel) * (2 + (has_min ? 2 : 0) + (super_groups > 1 ? super_groups : 0) +
                                  (has_min ? super_groups : 0));
}
constexpr size_t quant_super_bytes(int32_t group, int32_t bits, int32_t super_groups, bool has_min) {
    return quant_header_bytes(super_groups, has_min) + size_t(super_groups) * quant_weight_bytes(group, bits);
}
inline size_t quant_super_bytes(const TypeTraits &t) {
    return quant_super_bytes(t.group, t.bits, t.super_groups, t.has_min);
}

} // namespace llaisys
