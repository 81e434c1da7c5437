// CPU kernels of the forward pass. Activations are f32; weights are read in their stored dtype.
// Every output element is reduced in one fixed order whatever the batch size or the thread count,
// so a sequence gets the same logits alone or batched with others.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.hpp"

namespace llaisys::kernels {

// A weight matrix n x k as the kernels read it: row-major in `dtype`, or packed (bf16 on CPUs
// with bf16 dot products; block types always, in quant.hpp's panels).
struct Matrix {
    const void *data;
    int32_t dtype;
    int32_t n, k;
    bool packed;
};

// Whether this build multiplies bf16 matrices in packed form (CPUs with AVX512-BF16).
bool packs_bf16();
// Bytes of the packed form of an n x k bf16 matrix, and the packing itself.
size_t packed_bytes(int32_t n, int32_t k);
void pack_bf16(const uint16_t *w, int32_t n, int32_t k, uint16_t *out);
// Copy the row-major n x k matrix `rows` of `dtype` into `storage` in the form the kernels read
// (packing it where they want it packed); returns the matrix over `storage`.
Matrix store_matrix(int32_t dtype, const void *rows, int32_t n, int32_t k, Buffer &storage, int32_t n_threads);
// Row r of the matrix as f32 (embedding lookup).
void matrix_row(const Matrix &w, int32_t row, float *out);

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); y has row stride ldy.
void matmul(const float *x, int32_t m, const Matrix &w, const float *bias, float *y, int32_t ldy, int32_t n_threads);

// One product of a shared x: y = x w^T (+ bias).
struct MatmulOut {
    Matrix w;
    const float *bias;
    float *y;
    int32_t ldy;
};
// Several products of the same x (same k), computed together.
void matmul_many(const float *x, int32_t m, const MatmulOut *outs, int32_t count, int32_t n_threads);

// out[m, :] = x[m, :] / rms(x[m, :]) * weight (weight in `dtype`).
void rms_norm(const float *x, int32_t m, int32_t d, const void *weight, int32_t dtype, float eps, float *out,
              int32_t n_threads);

// Convert n elements of `dtype` (row-major, whole blocks for block types) to f32.
void to_f32(const void *src, int32_t dtype, int64_t n, float *dst);
// Convert n f32 to a float `dtype` (block types have no quantizer: InvalidArgument).
void from_f32(const float *src, int64_t n, int32_t dtype, void *dst);

// cos and sin of pos * inv_freq[i] for i < half: the rotation of one position, shared by its heads.
void rope_angles(int32_t pos, const float *inv_freq, int32_t half, float *cos_out, float *sin_out);
// Rotate one head vector in place by those angles (NeoX layout: pairs (i, i + d/2)).
void rope(float *v, int32_t head_dim, const float *cos, const float *sin);
// Undo the rotation for old_pos and apply the one for new_pos.
void rope_move(float *v, int32_t head_dim, int32_t old_pos, int32_t new_pos, const float *inv_freq);

// out[i] = silu(gate[i]) * up[i], the SwiGLU activation.
void silu_mul(const float *gate, const float *up, int64_t n, float *out, int32_t n_threads);

// Attention of n_q query heads that share one KV head, over the given cells in order:
// out[h] = sum_c softmax_c(scale * q[h] . k_c) v_c. k and v point at this KV head inside cell 0;
// cell_stride is the element distance between cells. scores is scratch of n_q * n_cells floats.
void attention(const float *q, int32_t n_q, int32_t head_dim, const int32_t *cells, int32_t n_cells,
               const void *k, const void *v, int32_t kv_dtype, int64_t cell_stride, float scale, float *scores,
               float *out);

} // namespace llaisys::kernels
