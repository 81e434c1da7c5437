// Weight element types: a traits table over every llaisys_dtype, and the GGUF block types'
// decoding and packing (block layouts as in ggml-common.h).
//
// A quantized matrix is stored packed for the int8 kernels: panels of 16 rows; in each panel,
// per group of G columns (G = the type's scale group, 16 or 32), the 16 rows' weights as int8
// (q - offset) ordered [G / 4][16 rows][4 columns], then the 16 rows' f32 scales, then, for types
// with mins (Q4_K), their 16 f32 mins. An element's value is scale * w - min, which reproduces
// gguf.quants.dequantize bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "llaisys.h"

namespace llaisys {

constexpr int32_t kQuantPanel = 16; // rows per panel of a packed quantized matrix

// One GGUF block decoded: block_elems int8 weights and a scale and min per 16 elements.
using DecodeBlockFn = void (*)(const uint8_t *block, int8_t *w, float *scale, float *min);

struct TypeTraits {
    int32_t dtype;
    const char *name;
    int32_t block_elems;  // elements per block (1 for the float types)
    int32_t block_bytes;  // bytes per block as the caller writes it (GGUF layout for block types)
    bool quantized;       // a GGUF block type: only matrices hold it, packed for the int8 kernels
    int32_t group;        // quantized: columns sharing one scale in the packed form (16 or 32)
    bool has_min;         // quantized: elements are scale * w - min with a per-group min
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

// Bytes of one packed group of a panel (16 rows x group columns with their scales and mins).
inline size_t quant_group_bytes(const TypeTraits &t) {
    return size_t(t.group) * kQuantPanel + sizeof(float) * kQuantPanel * (t.has_min ? 2 : 1);
}

} // namespace llaisys
