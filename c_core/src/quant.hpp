// Weight element types: a traits table over every llaisys_dtype, and the GGUF block types'
// decoding and packing (block layouts as in ggml-common.h).
//
// A quantized matrix is stored packed for the int8 kernels: panels of 16 rows; in each panel,
// per group of G columns (G = the type's scale group, 16 or 32), the 16 rows' weights, then their
// 16 scales, then, for types with mins (Q4_K), their 16 mins. Scales are f16 for the types whose
// block scale is one f16 (Q8_0, Q4_0, Q5_0: exact, so the panels are as small as GGUF's blocks),
// f32 otherwise. A kernel step is 4 columns of the 16 rows (a 4-byte lane per row). The weights are
//   8-bit types: int8 q, [G / 4 steps][16 rows][4 columns];
//   4- to 6-bit types: unsigned q as low nibbles [G / 8][16][4] (step s in the low nibbles of word
//   s, step s + G / 8 in the high ones), then for 5 and 6 bits one word per row whose byte t holds
//   at bits [h s, h s + h) the h high bits of column 4 s + t.
// An element's value is scale * (q - offset) - min, which reproduces gguf.quants.dequantize bit
// for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "llaisys.h"

namespace llaisys {

constexpr int32_t kQuantPanel = 16; // rows per panel of a packed quantized matrix

// One GGUF block decoded: block_elems int8 weights q - offset and a scale and min per 16 elements.
using DecodeBlockFn = void (*)(const uint8_t *block, int8_t *w, float *scale, float *min);

struct TypeTraits {
    int32_t dtype;
    const char *name;
    int32_t block_elems;  // elements per block (1 for the float types)
    int32_t block_bytes;  // bytes per block as the caller writes it (GGUF layout for block types)
    bool quantized;       // a GGUF block type: only matrices hold it, packed for the int8 kernels
    int32_t group;        // quantized: columns sharing one scale in the packed form (16 or 32)
    int32_t bits;         // quantized: bits of q (8: signed; 4 to 6: unsigned)
    int32_t offset;       // quantized: subtracted from q (unsigned types)
    bool has_min;         // quantized: elements are scale * (q - offset) - min with a per-group min
    bool half_scale;      // quantized: the packed scales are f16 (else f32)
    DecodeBlockFn decode; // quantized: one block to int8 weights, scales and mins
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

// Bytes of the weights of one packed group of a panel, and of the whole group with its scales and mins.
constexpr size_t quant_weight_bytes(int32_t group, int32_t bits) {
    return bits == 8 ? size_t(group) * kQuantPanel : size_t(group) * kQuantPanel / 8 * size_t(4 + (bits - 4));
}
constexpr size_t quant_group_bytes(int32_t group, int32_t bits, bool has_min, bool half_scale) {
    return quant_weight_bytes(group, bits) + (half_scale ? 2 : 4) * size_t(kQuantPanel) * (has_min ? 2 : 1);
}
inline size_t quant_group_bytes(const TypeTraits &t) {
    return quant_group_bytes(t.group, t.bits, t.has_min, t.half_scale);
}

} // namespace llaisys
