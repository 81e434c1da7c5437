#include "kernels.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
// GCC 12's AVX-512 headers build "undefined" vectors from themselves, which -Wuninitialized flags.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "common.hpp"

namespace llaisys::kernels {
namespace {

// 16-lane vectors through GCC vector extensions: AVX-512 with -march=native, narrower
// instructions in a portable build, and the same arithmetic order everywhere.
typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef _Float16 v16h __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));

constexpr int32_t kLanes = 16;

// Loaders turn 16 stored elements into f32 lanes.
struct F32 {
    using T = float;
    static v16f load(const T *p) {
        v16f v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
};
struct BF16 {
    using T = uint16_t;
    static v16f load(const T *p) {
#if defined(__AVX512F__)
        // One widening move and one shift; the generic form below compiles to twice as many.
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
        return v16f(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
#else
        v16u16 h;
        std::memcpy(&h, p, sizeof h);
        v16u32 bits = __builtin_convertvector(h, v16u32) << 16;
        v16f v;
        std::memcpy(&v, &bits, sizeof v);
        return v;
#endif
    }
};
struct F16 {
    using T = uint16_t;
    static v16f load(const T *p) {
#if defined(__AVX512F__)
        // GCC widens a _Float16 vector lane by lane without AVX512-FP16; vcvtph2ps does all 16.
        return v16f(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))));
#else
        v16h h;
        std::memcpy(&h, p, sizeof h);
        return __builtin_convertvector(h, v16f);
#endif
    }
};

// The contiguous share [begin, end) of n items for the calling OpenMP thread.
inline void thread_share(int32_t n, int32_t &begin, int32_t &end) {
    int32_t tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    begin = int32_t(int64_t(n) * tid / nth);
    end = int32_t(int64_t(n) * (tid + 1) / nth);
}

// Load the last k % 16 elements, zero-padded; zeros add nothing to a dot product.
template <class L> v16f load_tail(const typename L::T *p, int32_t count) {
    typename L::T tmp[kLanes] = {};
    std::memcpy(tmp, p, sizeof(typename L::T) * size_t(count));
    return L::load(tmp);
}

// The fixed reduction of 16 lanes: halving pairwise sums (t[i] += t[i + 8], then + 4, + 2, + 1).
inline float hsum(v16f v) {
#if defined(__AVX512DQ__)
    // The same additions in registers.
    __m512 z = __m512(v);
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#elif defined(__AVX2__)
    __m256 half[2];
    std::memcpy(half, &v, sizeof half);
    const __m256 h8 = _mm256_add_ps(half[0], half[1]);
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#else
    float t[kLanes];
    std::memcpy(t, &v, sizeof t);
    for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) t[i] += t[i + w];
    return t[0];
#endif
}

// Lane j = hsum(v[j]) for 16 vectors, with hsum's additions in hsum's order, so a score is the
// same whichever path computes it; the 16 reductions share their shuffles.
inline v16f hsum16(const v16f *v) {
#if defined(__AVX512F__)
    __m512 u[8], x[4], y[2];
    for (int i = 0; i < 8; ++i) { // lanes i and i + 8 of each vector: two vectors per register
        const __m512 a = __m512(v[2 * i]), b = __m512(v[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int i = 0; i < 4; ++i) // lanes i and i + 4: one vector per 128-bit lane
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i) { // lanes i and i + 2
        const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
        y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
    // z holds vector j's sum at 4 * (j % 4) + j / 4.
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return v16f(_mm512_permutexvar_ps(order, z));
#elif defined(__AVX2__)
    // The same steps on 8-lane halves: 8 vectors' sums per result register.
    __m256 z[2];
    for (int r = 0; r < 2; ++r) {
        __m256 f[8], u[4], x[2];
        for (int j = 0; j < 8; ++j) { // lanes i and i + 8
            __m256 half[2];
            std::memcpy(half, &v[8 * r + j], sizeof half);
            f[j] = _mm256_add_ps(half[0], half[1]);
        }
        for (int i = 0; i < 4; ++i) // lanes i and i + 4: one vector per 128-bit lane
            u[i] = _mm256_add_ps(_mm256_permute2f128_ps(f[2 * i], f[2 * i + 1], 0x20),
                                 _mm256_permute2f128_ps(f[2 * i], f[2 * i + 1], 0x31));
        for (int i = 0; i < 2; ++i) { // lanes i and i + 2
            const __m256d a = _mm256_castps_pd(u[2 * i]), b = _mm256_castps_pd(u[2 * i + 1]);
            x[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
        }
        const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], 0x88), _mm256_shuffle_ps(x[0], x[1], 0xDD));
        // sums holds vector j's sum at 4 * (j % 2) + j / 2.
        z[r] = _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
    v16f out;
    std::memcpy(&out, z, sizeof out);
    return out;
#else
    float t[kLanes];
    for (int j = 0; j < kLanes; ++j) t[j] = hsum(v[j]);
    v16f r;
    std::memcpy(&r, t, sizeof r);
    return r;
#endif
}

// A matmul kernel policy: X and W are the element types the tile reads activations and weights
// in; tile<MR, NR> computes an MR x NR block of y, each element one dot product over k whose lanes
// are reduced by hsum at the end, so every element is summed in the same order whatever the tile.

// f32 activations times weights widened to f32 by loader L, with f32 FMAs: exact products.
template <class L> struct FmaKernel {
    using X = float;
    using W = typename L::T;

    template <int MR, int NR>
    static void tile(const X *x, int32_t ldx, const W *w, int32_t ldw, int32_t k, const float *bias, float *y,
                     int32_t ldy) {
        v16f acc[MR][NR] = {};
        int32_t kk = 0;
        for (; kk + kLanes <= k; kk += kLanes) {
            v16f wv[NR];
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) wv[j] = L::load(w + size_t(j) * ldw + kk);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) {
                v16f xv = F32::load(x + size_t(i) * ldx + kk);
#pragma GCC unroll 8
                for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
            }
        }
        if (kk < k) {
            for (int j = 0; j < NR; ++j) {
                v16f wv = load_tail<L>(w + size_t(j) * ldw + kk, k - kk);
                for (int i = 0; i < MR; ++i) acc[i][j] += load_tail<F32>(x + size_t(i) * ldx + kk, k - kk) * wv;
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) y[size_t(i) * ldy + j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
    }
};

// Tiles of several products numbered together, so that one parallel loop shares them all out: a
// tile is up to panels_per_tile panels of panel_rows output rows of one product.
struct SharedTiles {
    std::vector<int32_t> first; // first[o]: product o's first tile; the last entry counts them all
    int64_t flops = 0;
    SharedTiles(const MatmulOut *outs, int32_t count, int32_t m, int32_t k, int32_t panel_rows, int32_t panels_per_tile)
        : first(size_t(count) + 1, 0) {
        for (int32_t o = 0; o < count; ++o) {
            const int32_t n_panels = (outs[o].w.n + panel_rows - 1) / panel_rows;
            first[size_t(o) + 1] = first[size_t(o)] + (n_panels + panels_per_tile - 1) / panels_per_tile;
            flops += int64_t(m) * outs[o].w.n * k;
        }
    }
    int32_t size() const { return first.back(); }
    int32_t product_of(int32_t tile) const {
        return int32_t(std::upper_bound(first.begin(), first.end(), tile) - first.begin()) - 1;
    }
};

#if defined(__AVX512BF16__)
// bf16 weights with VDPBF16PS (pairs of exact bf16 products added into f32 lanes): twice the f32
// FMA rate. Activations are rounded to bf16 first, as a bf16 model in torch computes; sums stay f32.
// Weights are packed in panels of 16 rows, k-pair by k-pair: one 64-byte load gives one pair of
// k for 16 outputs, so each lane accumulates its own output over k in order and needs no final
// horizontal sum. The order is the same for any m, so batching never changes a row's result.
constexpr int32_t kPanel = 16;

inline int64_t panel_elems(int32_t k) { return int64_t(kPanel) * ((k + 1) / 2 * 2); }

// Where element (row, col) of an n x k matrix lives in the packed form.
inline int64_t packed_index(int32_t row, int32_t col, int32_t k) {
    return (row / kPanel) * panel_elems(k) + int64_t(col / 2) * 2 * kPanel + (row % kPanel) * 2 + col % 2;
}

// Round n f32 values to bf16 (nearest even).
void round_to_bf16(const float *src, int64_t n, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

// MR rows of x (bf16, pairs broadcast) times NR panels, over pairs [p0, p1). acc starts from y
// when `resume` (a previous k block), so the sum runs through all of k in one order.
template <int MR, int NR>
void packed_tile(const uint16_t *x, int32_t ldx, const uint16_t *w, int64_t panel_stride, int32_t p0, int32_t p1,
                 bool resume, float *y, int32_t ldy, int32_t n_valid) {
    __m512 acc[MR][NR];
    const __mmask16 last = __mmask16((1u << std::min(n_valid - (NR - 1) * kPanel, kPanel)) - 1);
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            acc[i][j] = resume ? _mm512_maskz_loadu_ps(j == NR - 1 ? last : __mmask16(0xffff),
                                                       y + size_t(i) * ldy + j * kPanel)
                               : _mm512_setzero_ps();
    for (int32_t p = p0; p < p1; ++p) {
        __m512bh wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * panel_stride + int64_t(p) * 32);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            int32_t pair;
            std::memcpy(&pair, x + size_t(i) * ldx + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            _mm512_mask_storeu_ps(y + size_t(i) * ldy + j * kPanel, j == NR - 1 ? last : __mmask16(0xffff), acc[i][j]);
}

constexpr int kPackedMR = 6;
constexpr int kPackedNR = 4;

using PackedTileFn = void (*)(const uint16_t *, int32_t, const uint16_t *, int64_t, int32_t, int32_t, bool, float *,
                              int32_t, int32_t);

template <int MR, int NR = kPackedNR> PackedTileFn packed_tile_for_nr(int nr) {
    if constexpr (NR > 1) {
        if (nr < NR) return packed_tile_for_nr<MR, NR - 1>(nr);
    }
    return packed_tile<MR, NR>;
}
template <int MR = kPackedMR> PackedTileFn packed_tile_for(int mr, int nr) {
    if constexpr (MR > 1) {
        if (mr < MR) return packed_tile_for<MR - 1>(mr, nr);
    }
    return packed_tile_for_nr<MR>(nr);
}

// Several packed products of the same x in one parallel region: their tiles are shared out
// together, so small matrices (k and v) neither idle a thread nor cost a barrier of their own.
void matmul_packed(const float *x, int32_t m, int32_t k, const MatmulOut *outs, int32_t count, int32_t n_threads) {
    const int32_t k_even = (k + 1) / 2 * 2, pairs = k_even / 2;
    static thread_local std::vector<uint16_t> xb;
    // Only ever grown: resizing down and up again would zero the regrown part at every call.
    if (xb.size() < size_t(m) * size_t(k_even)) xb.resize(size_t(m) * size_t(k_even));
    for (int32_t r = 0; r < m; ++r) {
        round_to_bf16(x + size_t(r) * k, k, xb.data() + size_t(r) * k_even);
        if (k_even != k) xb[size_t(r) * k_even + size_t(k)] = 0; // the pad of an odd k
    }
    const uint16_t *xbf = xb.data(); // the caller's buffer: xb names another one in each worker thread
    const int64_t stride = panel_elems(k);
    const SharedTiles tiles(outs, count, m, k, kPanel, kPackedNR);
    const int32_t n_tiles = tiles.size();
    // Tiles are handed out one at a time, so a core slowed by a neighbour never holds the other
    // up. Within a tile, k blocks keep its weight panels (NR x 16 x 2 x 256 pairs = 64 KB) in L2
    // while every row block of x passes them.
    const int32_t pair_block = 256;
    const int32_t m_block = 96 * 1024 / (2 * 2 * pair_block);
#pragma omp parallel num_threads(n_threads) if (tiles.flops > 32768)
    {
#pragma omp for schedule(dynamic, 1) nowait
        for (int32_t t = 0; t < n_tiles; ++t) {
            const int32_t o = tiles.product_of(t);
            const MatmulOut &out = outs[o];
            const int32_t n = out.w.n, n_panels = (n + kPanel - 1) / kPanel;
            const int32_t panel = (t - tiles.first[size_t(o)]) * kPackedNR;
            const int32_t nr = std::min(kPackedNR, n_panels - panel);
            const int32_t n_valid = std::min(n - panel * kPanel, nr * kPanel);
            const uint16_t *w = static_cast<const uint16_t *>(out.w.data) + panel * stride;
            for (int32_t p0 = 0; p0 < pairs; p0 += pair_block) {
                const int32_t p1 = std::min(pairs, p0 + pair_block);
                for (int32_t m0 = 0; m0 < m; m0 += m_block) {
                    // Rows split evenly over the fewest tiles: a thin last tile would load as many
                    // weights as a full one for fewer rows.
                    const int32_t rows = std::min(m, m0 + m_block) - m0, n_sub = (rows + kPackedMR - 1) / kPackedMR;
                    for (int32_t sub = 0, i0 = m0; sub < n_sub; ++sub) {
                        const int32_t mr = rows / n_sub + (sub < rows % n_sub ? 1 : 0);
                        packed_tile_for(mr, nr)(xbf + size_t(i0) * k_even, k_even, w, stride, p0, p1, p0 > 0,
                                                out.y + size_t(i0) * out.ldy + panel * kPanel, out.ldy, n_valid);
                        i0 += mr;
                    }
                }
            }
        }
#pragma omp barrier
        for (int32_t o = 0; o < count; ++o) {
            if (!outs[o].bias) continue;
#pragma omp for
            for (int32_t r = 0; r < m; ++r)
                for (int32_t j = 0; j < outs[o].w.n; ++j) outs[o].y[size_t(r) * outs[o].ldy + j] += outs[o].bias[j];
        }
    }
}
#endif

// FmaKernel tile: 4 x 6 accumulators, 6 weight vectors and one activation vector fit the 32 registers.
constexpr int kMR = 4;
constexpr int kNR = 6;

template <class K>
using TileFn = void (*)(const typename K::X *, int32_t, const typename K::W *, int32_t, int32_t, const float *,
                        float *, int32_t);

// The tile function for an mr x nr corner (mr <= kMR, nr <= kNR), chosen at run time.
template <class K, int MR, int NR = kNR> TileFn<K> tile_for_nr(int nr) {
    if constexpr (NR > 1) {
        if (nr < NR) return tile_for_nr<K, MR, NR - 1>(nr);
    }
    return K::template tile<MR, NR>;
}
template <class K, int MR = kMR> TileFn<K> tile_for(int mr, int nr) {
    if constexpr (MR > 1) {
        if (mr < MR) return tile_for<K, MR - 1>(mr, nr);
    }
    return tile_for_nr<K, MR>(nr);
}

template <class K>
void matmul_t(const typename K::X *x, int32_t m, int32_t k, const typename K::W *w, int32_t n, const float *bias,
              float *y, int32_t ldy, int32_t n_threads) {
    const int32_t n_tiles = (n + kNR - 1) / kNR;
    // Rows of x per block: keep the block in L2 while every weight tile streams past it.
    const int32_t x_row_bytes = int32_t(sizeof(typename K::X)) * std::max(k, 1);
    const int32_t m_block = std::max(kMR, (256 * 1024 / x_row_bytes) / kMR * kMR);
    const bool parallel = int64_t(m) * n * k > 32768;
#pragma omp parallel num_threads(n_threads) if (parallel)
    {
        int32_t t0, t1;
        thread_share(n_tiles, t0, t1);
        for (int32_t m0 = 0; m0 < m; m0 += m_block) {
            const int32_t m1 = std::min(m, m0 + m_block);
            for (int32_t t = t0; t < t1; ++t) {
                const int32_t n0 = t * kNR;
                const int32_t nr = std::min(kNR, n - n0);
                for (int32_t i0 = m0; i0 < m1; i0 += kMR) {
                    const int32_t mr = std::min(kMR, m1 - i0);
                    tile_for<K>(mr, nr)(x + size_t(i0) * k, k, w + size_t(n0) * k, k, k, bias ? bias + n0 : nullptr,
                                        y + size_t(i0) * ldy + n0, ldy);
                }
            }
        }
    }
}

// e^x for 16 lanes: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 Taylor polynomial (relative
// error about 2e-7, near float rounding); inputs are clamped to the finite range.
inline v16f exp16(v16f x) {
    const v16f hi = v16f{} + 88.3762626647949f, lo = v16f{} - 87.3365447505531f;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    const v16f round_magic = v16f{} + 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
    const v16f n = (x * 1.44269504088896341f + round_magic) - round_magic;
    const v16f r = x - n * 0.693359375f - n * -2.12194440e-4f; // ln 2 in two parts, exact first product
    v16f p = v16f{} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// f applied to n floats 16 at a time; the tail goes through a zero-padded vector.
template <class F> void map16(const float *in, int64_t n, float *out, F f) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        v16f v = f(F32::load(in + i));
        std::memcpy(out + i, &v, sizeof v);
    }
    if (i < n) {
        v16f v = f(load_tail<F32>(in + i, int32_t(n - i)));
        std::memcpy(out + i, &v, sizeof(float) * size_t(n - i));
    }
}

// ---- Block types: int8 weights (quant.hpp's panels) times activations quantized to int8 ----

// Activations quantized per 32 columns as Q8_0 does: d = max|x| / 127, q = round(x / d), f32 d.
struct QuantizedRows {
    std::vector<int8_t> q;    // m x k
    std::vector<float> d;     // m x k / 32
    std::vector<int32_t> sum; // m x k / 16: the sum of q over each 16 columns (for offsets and mins)
};

// The largest of 16 lanes (exact, in any order), and the sum of 16 int32 lanes.
inline float max_lanes(v16f v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps(__m512(v));
#else
    float r = v[0];
    for (int l = 1; l < kLanes; ++l) r = std::max(r, v[l]);
    return r;
#endif
}
inline int32_t sum_lanes(v16i v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_epi32(__m512i(v));
#else
    int32_t r = 0;
    for (int l = 0; l < kLanes; ++l) r += v[l];
    return r;
#endif
}

void quantize_rows(const float *x, int32_t m, int32_t k, QuantizedRows &qx, int32_t n_threads) {
    const size_t blocks = size_t(m) * size_t(k / 32);
    // Only ever grown, as matmul_packed's buffer.
    if (qx.q.size() < size_t(m) * size_t(k)) qx.q.resize(size_t(m) * size_t(k));
    if (qx.d.size() < blocks) qx.d.resize(blocks), qx.sum.resize(2 * blocks);
    int8_t *q = qx.q.data();
    float *d = qx.d.data();
    int32_t *sum = qx.sum.data();
    typedef int8_t v16i8 __attribute__((vector_size(16)));
#pragma omp parallel for num_threads(n_threads) if (int64_t(m) * k > 65536)
    for (int64_t b = 0; b < int64_t(blocks); ++b) {
        const v16f half[2] = {F32::load(x + b * 32), F32::load(x + b * 32 + kLanes)};
        const v16f a = v16f(v16u32(half[0]) & 0x7fffffffu), c = v16f(v16u32(half[1]) & 0x7fffffffu); // |x|
        const float amax = max_lanes(a > c ? a : c);
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        for (int h = 0; h < 2; ++h) {
            // Rounded halves away from zero, as std::round and gguf's np_roundf: truncate, then
            // step away from zero where the (exact) remainder is at least a half.
            const v16f v = half[h] * inv;
            v16i r = __builtin_convertvector(v, v16i);
            const v16f rest = v - __builtin_convertvector(r, v16f);
            r += (rest >= 0.5f ? 1 : 0) - (rest <= -0.5f ? 1 : 0);
            const v16i8 bytes = __builtin_convertvector(r, v16i8);
            std::memcpy(q + b * 32 + h * 16, &bytes, 16);
            sum[2 * b + h] = sum_lanes(r);
        }
        d[b] = scale;
    }
}

// What a group's products need of one activation row: its int8 values for the group, their sum
// and their scale.
struct GroupRow {
    const int8_t *q;
    int32_t sum;
    float d;
};
template <int G> inline GroupRow group_row(const QuantizedRows &qx, int32_t k, int32_t row, int32_t g) {
    const int32_t *sums = qx.sum.data() + size_t(row) * size_t(k / 16) + size_t(g) * G / 16;
    return {qx.q.data() + size_t(row) * size_t(k) + size_t(g) * G, G == 32 ? sums[0] + sums[1] : sums[0],
            qx.d[size_t(row) * size_t(k / 32) + size_t(g) * G / 32]};
}

// A panel's 16 rows in lanes: one 512-bit vector with AVX-512 VNNI, two halves of 8 otherwise.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LLAISYS_VNNI512 1
constexpr int kQLanes = 16;
#else
constexpr int kQLanes = 8;
#endif
typedef int32_t vqi __attribute__((vector_size(4 * kQLanes)));
typedef float vqf __attribute__((vector_size(4 * kQLanes)));
typedef uint32_t vqu __attribute__((vector_size(4 * kQLanes)));
constexpr int kQHalves = kQuantPanel / kQLanes;

inline int32_t load_i32(const void *p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// acc + per lane the dot product of its 4 unsigned weights q with the 4 int8 activations x4.
inline vqi dot4u(vqi acc, vqu q, int32_t x4) {
#if defined(LLAISYS_VNNI512)
    return vqi(_mm512_dpbusd_epi32(__m512i(acc), __m512i(q), _mm512_set1_epi32(x4)));
#else // portable; AVX2 adds pair sums instead (pair_sums, q8_dot4)
    uint8_t w[4 * kQLanes];
    int8_t x[4];
    std::memcpy(w, &q, sizeof w);
    std::memcpy(x, &x4, 4);
    for (int l = 0; l < kQLanes; ++l)
        acc[l] += w[4 * l] * x[0] + w[4 * l + 1] * x[1] + w[4 * l + 2] * x[2] + w[4 * l + 3] * x[3];
    return acc;
#endif
}

#if defined(__AVX2__) && !defined(LLAISYS_VNNI512)
// AVX2 has no byte dot product into int32 lanes: the int16 pair sums vpmaddubsw gives for unsigned
// q are added up for as many steps as int16 holds exactly, then widened once (vpmaddwd), not per step.
constexpr bool kPairSums = true;
typedef int16_t vq16 __attribute__((vector_size(32)));
inline vq16 pair_sums(vqu q, int32_t x4) { return vq16(_mm256_maddubs_epi16(__m256i(q), _mm256_set1_epi32(x4))); }
inline vqi widen_pairs(vq16 sums) { return vqi(_mm256_madd_epi16(__m256i(sums), _mm256_set1_epi16(1))); }
// 8-bit q (q - 128 = w) would overflow a pair sum: |w| times x with w's sign instead, whose pair
// sums fit (|w| <= 128, |x| <= 127), summing w x without the offset.
inline vqi q8_dot4(vqi acc, vqu q, int32_t x4) {
    const __m256i w = _mm256_xor_si256(__m256i(q), _mm256_set1_epi8(char(0x80))), xv = _mm256_set1_epi32(x4);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    return acc + vqi(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#else
constexpr bool kPairSums = false;
typedef int16_t vq16 __attribute__((vector_size(2 * kQLanes)));
inline vq16 pair_sums(vqu, int32_t) { return vq16{}; }
inline vqi widen_pairs(vq16) { return vqi{}; }
inline vqi q8_dot4(vqi acc, vqu, int32_t) { return acc; }
#endif
// Steps of unsigned kBits-bit q whose pair sums (each at most 2 * (2^kBits - 1) * 128) int16 holds.
template <int kBits> constexpr int pair_run(int steps) {
    return std::min(steps, 32767 / (2 * ((1 << kBits) - 1) * 128));
}

// Step s (4 columns) of lanes [h * kQLanes, (h + 1) * kQLanes) of a group's weights (quant.hpp):
// each column's q in its own byte.
template <int G, int kBits> inline vqu unsigned_step(const uint8_t *group, int s, int h) {
    if constexpr (kBits == 8) {
        vqu q;
        std::memcpy(&q, group + (s * kQuantPanel + h * kQLanes) * 4, sizeof q);
        return q;
    } else {
        constexpr int half = G / 8;
        vqu low;
        std::memcpy(&low, group + ((s % half) * kQuantPanel + h * kQLanes) * 4, sizeof low);
        vqu q = (s < half ? low : low >> 4) & 0x0F0F0F0Fu;
        if constexpr (kBits > 4) {
            constexpr uint32_t mask = kBits == 5 ? 0x01010101u : 0x03030303u;
            vqu high;
            std::memcpy(&high, group + G * kQuantPanel / 2 + h * kQLanes * 4, sizeof high);
            q |= ((high >> ((kBits - 4) * s)) & mask) << 4;
        }
        return q;
    }
}

// kQLanes f16 / int8 / uint8 values as f32 lanes.
inline vqf f16_lanes(const uint8_t *p) {
    typedef _Float16 vqh __attribute__((vector_size(2 * kQLanes)));
    vqh h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vqf);
}
template <class T> inline vqf byte_lanes(const uint8_t *p) {
    typedef T vqb __attribute__((vector_size(kQLanes)));
    vqb b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vqi), vqf);
}

// a * b + c rounded once, on every path.
inline vqf fma_lanes(vqf a, vqf b, vqf c) {
#if defined(LLAISYS_VNNI512)
    return vqf(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
#elif defined(__FMA__)
    return vqf(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
    return a * b + c; // one expression everywhere, so every path rounds alike
#endif
}

// One group's exact integer dot products scaled into the f32 sums: the only rounding steps of a
// block-type product, in the same order on every path, so a row's result never depends on the
// kernel, the tile or the batch.
template <bool kMin> inline vqf add_group(vqf acc, vqi dots, vqf scale, vqf min, float dx, int32_t x_sum) {
    acc = fma_lanes(__builtin_convertvector(dots, vqf), scale * dx, acc);
    if constexpr (kMin) acc = fma_lanes(-min, vqf{} + dx * float(x_sum), acc);
    return acc;
}

// The scale and min lanes of group j of a super-block (quant.hpp): d, or d * sc; dmin * m.
template <int S, bool kMin> struct SuperScales {
    vqf d[kQHalves], dmin[kQHalves];
    const uint8_t *header;
    explicit SuperScales(const uint8_t *sb) : header(sb) {
        for (int h = 0; h < kQHalves; ++h) {
            d[h] = f16_lanes(sb + 2 * h * kQLanes);
            if constexpr (kMin) dmin[h] = f16_lanes(sb + 2 * (kQuantPanel + h * kQLanes));
        }
    }
    vqf scale(int j, int h) const {
        if constexpr (S == 1) return d[h];
        else return d[h] * byte_lanes<int8_t>(header + kQuantPanel * (kMin ? 4 : 2) + j * kQuantPanel + h * kQLanes);
    }
    vqf min(int j, int h) const {
        if constexpr (kMin) return dmin[h] * byte_lanes<uint8_t>(header + kQuantPanel * (4 + S) + j * kQuantPanel + h * kQLanes);
        else return vqf{};
    }
};

constexpr size_t kPrefetchAhead = 1024;

// MR rows of x times one panel (16 outputs) over all of k, unpacking each step's q in registers:
// the kernel of small batches, where no unpacked weight would be used twice.
template <int G, int kBits, int S, bool kMin, int MR>
void quant_tile(const QuantizedRows &qx, int32_t k, int32_t row0, const uint8_t *panel, int32_t offset,
                const float *bias, float *y, int32_t ldy, int32_t n_valid) {
    constexpr size_t header = quant_header_bytes(S, kMin), weight_bytes = quant_weight_bytes(G, kBits);
    constexpr size_t super_bytes = quant_super_bytes(G, kBits, S, kMin);
    // AVX2 sums 8-bit q - 128 directly (q8_dot4), the other paths q, less offset times the sum.
    constexpr bool kSigned8 = kBits == 8 && kPairSums, kPaired = kPairSums && kBits < 8;
    constexpr int run = pair_run<kBits < 8 ? kBits : 4>(G / 4);
    static_assert((G / 4) % run == 0, "pair-sum runs must tile the group's steps");
    vqf acc[MR][kQHalves] = {};
    for (int32_t b = 0; b < k / (S * G); ++b) {
        const uint8_t *sb = panel + size_t(b) * super_bytes;
        const SuperScales<S, kMin> scales(sb);
        for (int j = 0; j < S; ++j) {
            const uint8_t *group = sb + header + j * weight_bytes;
            // The hardware streamers stop at page ends: ask for the panel's bytes a little ahead.
            for (size_t line = 0; line < weight_bytes; line += 64) __builtin_prefetch(group + kPrefetchAhead + line);
            GroupRow x[MR];
            vqi dots[MR][kQHalves];
            for (int i = 0; i < MR; ++i) {
                x[i] = group_row<G>(qx, k, row0 + i, b * S + j);
                for (int h = 0; h < kQHalves; ++h) dots[i][h] = vqi{} - (kSigned8 ? 0 : offset * x[i].sum);
            }
            vq16 paired[MR][kQHalves] = {};
#pragma GCC unroll 8
            for (int s = 0; s < G / 4; ++s) {
                vqu q[kQHalves];
                for (int h = 0; h < kQHalves; ++h) q[h] = unsigned_step<G, kBits>(group, s, h);
#pragma GCC unroll 4
                for (int i = 0; i < MR; ++i) {
                    const int32_t x4 = load_i32(x[i].q + 4 * s);
                    for (int h = 0; h < kQHalves; ++h) {
                        if constexpr (kSigned8)
                            dots[i][h] = q8_dot4(dots[i][h], q[h], x4);
                        else if constexpr (kPaired)
                            paired[i][h] += pair_sums(q[h], x4);
                        else
                            dots[i][h] = dot4u(dots[i][h], q[h], x4);
                    }
                }
                if constexpr (kPaired)
                    if ((s + 1) % run == 0)
                        for (int i = 0; i < MR; ++i)
                            for (int h = 0; h < kQHalves; ++h) {
                                dots[i][h] += widen_pairs(paired[i][h]);
                                paired[i][h] = vq16{};
                            }
            }
            for (int h = 0; h < kQHalves; ++h) {
                const vqf scale = scales.scale(j, h), min = scales.min(j, h);
                for (int i = 0; i < MR; ++i) acc[i][h] = add_group<kMin>(acc[i][h], dots[i][h], scale, min, x[i].d, x[i].sum);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int h = 0; h < kQHalves; ++h)
            for (int l = 0; l < kQLanes && h * kQLanes + l < n_valid; ++l)
                y[size_t(i) * ldy + h * kQLanes + l] = acc[i][h][l] + (bias ? bias[h * kQLanes + l] : 0.0f);
}

constexpr int kQuantMR = 4;

using QuantTileFn = void (*)(const QuantizedRows &, int32_t, int32_t, const uint8_t *, int32_t, const float *, float *,
                             int32_t, int32_t);

template <int G, int kBits, int S, bool kMin, int MR = kQuantMR> QuantTileFn quant_tile_for_mr(int mr) {
    if constexpr (MR > 1) {
        if (mr < MR) return quant_tile_for_mr<G, kBits, S, kMin, MR - 1>(mr);
    }
    return quant_tile<G, kBits, S, kMin, MR>;
}

#if defined(LLAISYS_VNNI512)
// Batches of rows: a unit's panels are unpacked once per chunk of k into bytes and f32 scales,
// which every row tile then reads with one VPDPBUSD per row, panel and step.
//
// An unpacked group: G / 4 steps of 16 rows x 4 bytes of q, then 16 f32 scales, then 16 f32 mins.
template <int G, bool kMin> constexpr size_t unpacked_group_bytes() { return G * 16 + 64 * (kMin ? 2 : 1); }

template <int G, int kBits, int S, bool kMin>
void unpack_chunk(const uint8_t *panel, int32_t b0, int32_t b1, uint8_t *out) {
    constexpr size_t header = quant_header_bytes(S, kMin), weight_bytes = quant_weight_bytes(G, kBits);
    for (int32_t b = b0; b < b1; ++b) {
        const uint8_t *sb = panel + size_t(b) * quant_super_bytes(G, kBits, S, kMin);
        const SuperScales<S, kMin> scales(sb);
        for (int j = 0; j < S; ++j) {
            for (int s = 0; s < G / 4; ++s) {
                const vqu q = unsigned_step<G, kBits>(sb + header + j * weight_bytes, s, 0);
                std::memcpy(out + 64 * s, &q, 64);
            }
            const vqf scale = scales.scale(j, 0), min = scales.min(j, 0);
            std::memcpy(out + G * 16, &scale, 64);
            if constexpr (kMin) std::memcpy(out + G * 16 + 64, &min, 64);
            out += unpacked_group_bytes<G, kMin>();
        }
    }
}

// MR rows times NR unpacked panels over groups [g0, g0 + n_groups). Sums resume from y after the
// first chunk (stored f32 sums reload exactly) and get the bias after the last one.
template <int G, bool kMin, int MR, int NR>
void unpacked_tile(const QuantizedRows &qx, int32_t k, int32_t row0, const uint8_t *unpacked, size_t panel_stride,
                   int32_t g0, int32_t n_groups, int32_t offset, bool resume, bool last, const float *bias, float *y,
                   int32_t ldy, int32_t n_valid) {
    const __mmask16 tail = __mmask16((1u << std::min(n_valid - (NR - 1) * kQuantPanel, kQuantPanel)) - 1);
    vqf acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            acc[i][j] = resume ? vqf(_mm512_maskz_loadu_ps(j == NR - 1 ? tail : __mmask16(0xffff),
                                                           y + size_t(i) * ldy + j * kQuantPanel))
                               : vqf{};
    for (int32_t gi = 0; gi < n_groups; ++gi) {
        const uint8_t *group = unpacked + gi * unpacked_group_bytes<G, kMin>();
        GroupRow x[MR];
        __m512i dots[MR][NR];
        for (int i = 0; i < MR; ++i) {
            x[i] = group_row<G>(qx, k, row0 + i, g0 + gi);
            for (int j = 0; j < NR; ++j) dots[i][j] = _mm512_set1_epi32(-offset * x[i].sum);
        }
#pragma GCC unroll 8
        for (int s = 0; s < G / 4; ++s) {
            __m512i w[NR];
            for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(group + j * panel_stride + 64 * s);
            for (int i = 0; i < MR; ++i) {
                const __m512i xv = _mm512_set1_epi32(load_i32(x[i].q + 4 * s));
                for (int j = 0; j < NR; ++j) dots[i][j] = _mm512_dpbusd_epi32(dots[i][j], w[j], xv);
            }
        }
        for (int j = 0; j < NR; ++j) {
            vqf scale, min = {};
            std::memcpy(&scale, group + j * panel_stride + G * 16, 64);
            if constexpr (kMin) std::memcpy(&min, group + j * panel_stride + G * 16 + 64, 64);
            for (int i = 0; i < MR; ++i) acc[i][j] = add_group<kMin>(acc[i][j], vqi(dots[i][j]), scale, min, x[i].d, x[i].sum);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            const __mmask16 mask = j == NR - 1 ? tail : __mmask16(0xffff);
            vqf v = acc[i][j];
            // + 0 without a bias, as quant_tile adds: it turns a -0 sum into +0 on both paths.
            if (last) v = v + (bias ? vqf(_mm512_maskz_loadu_ps(mask, bias + j * kQuantPanel)) : vqf{});
            _mm512_mask_storeu_ps(y + size_t(i) * ldy + j * kQuantPanel, mask, __m512(v));
        }
}

constexpr int kUnpackMR = 4, kUnpackNR = 2;
using UnpackFn = void (*)(const uint8_t *, int32_t, int32_t, uint8_t *);
using UnpackedTileFn = void (*)(const QuantizedRows &, int32_t, int32_t, const uint8_t *, size_t, int32_t, int32_t,
                                int32_t, bool, bool, const float *, float *, int32_t, int32_t);

template <int G, bool kMin, int MR = kUnpackMR, int NR = kUnpackNR> UnpackedTileFn unpacked_tile_for(int mr, int nr) {
    if constexpr (NR > 1) {
        if (nr < NR) return unpacked_tile_for<G, kMin, MR, NR - 1>(mr, nr);
    }
    if constexpr (MR > 1) {
        if (mr < MR) return unpacked_tile_for<G, kMin, MR - 1, NR>(mr, nr);
    }
    return unpacked_tile<G, kMin, MR, NR>;
}
#endif

// A block type's kernels, chosen by the layout's parameters so a kernel always matches the panels it reads.
struct QuantKernels {
    QuantTileFn tile[kQuantMR + 1];
#if defined(LLAISYS_VNNI512)
    UnpackFn unpack;
    UnpackedTileFn unpacked[kUnpackMR + 1][kUnpackNR + 1];
#endif
};

template <int G, int kBits, int S, bool kMin> QuantKernels kernels_of() {
    QuantKernels q{};
    for (int mr = 1; mr <= kQuantMR; ++mr) q.tile[mr] = quant_tile_for_mr<G, kBits, S, kMin>(mr);
#if defined(LLAISYS_VNNI512)
    q.unpack = unpack_chunk<G, kBits, S, kMin>;
    for (int mr = 1; mr <= kUnpackMR; ++mr)
        for (int nr = 1; nr <= kUnpackNR; ++nr) q.unpacked[mr][nr] = unpacked_tile_for<G, kMin>(mr, nr);
#endif
    return q;
}

// The kernels of each block type's packed form; a type with no entry here fails its first matmul.
const QuantKernels &quant_kernels(const TypeTraits &t) {
    const auto is = [&t](int32_t group, int32_t bits, int32_t super_groups, bool has_min) {
        return t.group == group && t.bits == bits && t.super_groups == super_groups && t.has_min == has_min;
    };
    static const QuantKernels q8_0 = kernels_of<32, 8, 1, false>(), q4_0 = kernels_of<32, 4, 1, false>(),
                              q5_0 = kernels_of<32, 5, 1, false>(), q4_k = kernels_of<32, 4, 8, true>(),
                              q6_k = kernels_of<16, 6, 16, false>();
    if (is(32, 8, 1, false)) return q8_0;
    if (is(32, 4, 1, false)) return q4_0;
    if (is(32, 5, 1, false)) return q5_0;
    if (is(32, 4, 8, true)) return q4_k;
    if (is(16, 6, 16, false)) return q6_k;
    throw std::logic_error(std::string("no int8 kernel for ") + t.name);
}

// Rows from which a batch unpacks its weights once per chunk rather than in registers per row tile.
constexpr int32_t kUnpackMinRows = 6;

// Several block-type products of the same x: x is quantized once, and the products' units (a few
// panels each) are shared out together one at a time, as matmul_packed does.
void matmul_quant(const float *x, int32_t m, int32_t k, const MatmulOut *outs, int32_t count, int32_t n_threads) {
    static thread_local QuantizedRows qx;
    quantize_rows(x, m, k, qx, n_threads);
    const QuantizedRows &xq = qx; // the caller's buffer: qx names another one in each worker thread
    // Each product's kernels, resolved here: a worker thread must not throw.
    std::vector<const QuantKernels *> kernels(static_cast<size_t>(count));
    for (int32_t o = 0; o < count; ++o) kernels[size_t(o)] = &quant_kernels(*type_traits(outs[o].w.dtype));
#if defined(LLAISYS_VNNI512)
    if (m >= kUnpackMinRows) {
        const SharedTiles units(outs, count, m, k, kQuantPanel, kUnpackNR);
#pragma omp parallel num_threads(n_threads) if (units.flops > 32768)
        {
            static thread_local std::vector<uint8_t> unpacked;
#pragma omp for schedule(dynamic, 1) nowait
            for (int32_t u = 0; u < units.size(); ++u) {
                const int32_t o = units.product_of(u);
                const MatmulOut &out = outs[o];
                const TypeTraits &t = *type_traits(out.w.dtype);
                const QuantKernels &kern = *kernels[size_t(o)];
                const int32_t n = out.w.n, n_panels = (n + kQuantPanel - 1) / kQuantPanel;
                const int32_t p0 = (u - units.first[size_t(o)]) * kUnpackNR, nr = std::min(kUnpackNR, n_panels - p0);
                const int32_t col = p0 * kQuantPanel, n_valid = std::min(nr * kQuantPanel, n - col);
                const int32_t supers = k / t.block_elems, groups_per_super = t.super_groups;
                const size_t panel_bytes = size_t(supers) * quant_super_bytes(t);
                // Chunks of about 512 columns: the unit's unpacked weights stay in L1, a chunk of x in L2.
                const int32_t chunk = std::max(1, 512 / t.block_elems);
                const size_t group_bytes = t.has_min ? size_t(t.group) * 16 + 128 : size_t(t.group) * 16 + 64;
                const size_t panel_stride = size_t(chunk) * size_t(groups_per_super) * group_bytes;
                if (unpacked.size() < size_t(kUnpackNR) * panel_stride) unpacked.resize(size_t(kUnpackNR) * panel_stride);
                for (int32_t b0 = 0; b0 < supers; b0 += chunk) {
                    const int32_t b1 = std::min(supers, b0 + chunk);
                    for (int32_t j = 0; j < nr; ++j)
                        kern.unpack(static_cast<const uint8_t *>(out.w.data) + size_t(p0 + j) * panel_bytes, b0, b1,
                                    unpacked.data() + size_t(j) * panel_stride);
                    const int32_t n_tiles = (m + kUnpackMR - 1) / kUnpackMR;
                    for (int32_t tile = 0, i0 = 0; tile < n_tiles; ++tile) {
                        const int32_t mr = m / n_tiles + (tile < m % n_tiles ? 1 : 0); // rows split evenly
                        kern.unpacked[mr][nr](xq, k, i0, unpacked.data(), panel_stride, b0 * groups_per_super,
                                              (b1 - b0) * groups_per_super, t.offset, b0 > 0, b1 == supers,
                                              out.bias ? out.bias + col : nullptr, out.y + size_t(i0) * out.ldy + col,
                                              out.ldy, n_valid);
                        i0 += mr;
                    }
                }
            }
        }
        return;
    }
#endif
    constexpr int32_t kUnitPanels = 4;
    const SharedTiles units(outs, count, m, k, kQuantPanel, kUnitPanels);
    const int32_t n_units = units.size();
    // Rows of x per block: about 128 KB of int8 activations stay in L2 while a unit's panels pass.
    const int32_t m_block = std::max(kQuantMR, 128 * 1024 / std::max(k, 1) / kQuantMR * kQuantMR);
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (units.flops > 32768)
    for (int32_t u = 0; u < n_units; ++u) {
        const int32_t o = units.product_of(u);
        const MatmulOut &out = outs[o];
        const TypeTraits &t = *type_traits(out.w.dtype);
        const int32_t n = out.w.n, n_panels = (n + kQuantPanel - 1) / kQuantPanel;
        const int32_t p0 = (u - units.first[size_t(o)]) * kUnitPanels, p1 = std::min(n_panels, p0 + kUnitPanels);
        const size_t panel_bytes = size_t(k / t.block_elems) * quant_super_bytes(t);
        for (int32_t m0 = 0; m0 < m; m0 += m_block) {
            const int32_t m1 = std::min(m, m0 + m_block);
            for (int32_t p = p0; p < p1; ++p) {
                const uint8_t *panel = static_cast<const uint8_t *>(out.w.data) + size_t(p) * panel_bytes;
                const int32_t col = p * kQuantPanel, n_valid = std::min(kQuantPanel, n - col);
                for (int32_t i0 = m0; i0 < m1; i0 += kQuantMR) {
                    const int32_t mr = std::min(kQuantMR, m1 - i0);
                    kernels[size_t(o)]->tile[mr](xq, k, i0, panel, t.offset, out.bias ? out.bias + col : nullptr,
                                                 out.y + size_t(i0) * out.ldy + col, out.ldy, n_valid);
                }
            }
        }
    }
}

} // namespace

void matmul(const float *x, int32_t m, const Matrix &w, const float *bias, float *y, int32_t ldy, int32_t n_threads) {
    const MatmulOut out = {w, bias, y, ldy};
    matmul_many(x, m, &out, 1, n_threads);
}

void matmul_many(const float *x, int32_t m, const MatmulOut *outs, int32_t count, int32_t n_threads) {
    if (count == 0) return;
    bool all_packed = true, all_quantized = true;
    for (int32_t o = 0; o < count; ++o) {
        all_packed = all_packed && outs[o].w.packed && outs[o].w.k == outs[0].w.k;
        all_quantized = all_quantized && type_traits(outs[o].w.dtype)->quantized && outs[o].w.k == outs[0].w.k;
    }
    if (all_quantized) {
        matmul_quant(x, m, outs[0].w.k, outs, count, n_threads);
        return;
    }
#if defined(__AVX512BF16__)
    if (all_packed) {
        matmul_packed(x, m, outs[0].w.k, outs, count, n_threads);
        return;
    }
#endif
    for (int32_t o = 0; o < count; ++o) {
        const MatmulOut &out = outs[o];
        const int32_t n = out.w.n, k = out.w.k;
        switch (static_cast<llaisys_dtype>(out.w.dtype)) {
        case LLAISYS_DTYPE_F32:
            matmul_t<FmaKernel<F32>>(x, m, k, static_cast<const float *>(out.w.data), n, out.bias, out.y, out.ldy,
                                     n_threads);
            break;
        case LLAISYS_DTYPE_F16:
            matmul_t<FmaKernel<F16>>(x, m, k, static_cast<const uint16_t *>(out.w.data), n, out.bias, out.y, out.ldy,
                                     n_threads);
            break;
        case LLAISYS_DTYPE_BF16:
#if defined(__AVX512BF16__)
            if (out.w.packed) {
                matmul_packed(x, m, k, &out, 1, n_threads);
                break;
            }
#endif
            matmul_t<FmaKernel<BF16>>(x, m, k, static_cast<const uint16_t *>(out.w.data), n, out.bias, out.y,
                                      out.ldy, n_threads);
            break;
        case LLAISYS_DTYPE_Q8_0:
        case LLAISYS_DTYPE_Q4_0:
        case LLAISYS_DTYPE_Q5_0:
        case LLAISYS_DTYPE_Q4_K:
        case LLAISYS_DTYPE_Q6_K: matmul_quant(x, m, k, &out, 1, n_threads); break;
        }
    }
}

bool packs_bf16() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
}

size_t packed_bytes(int32_t n, int32_t k) {
#if defined(__AVX512BF16__)
    return size_t((n + kPanel - 1) / kPanel) * size_t(panel_elems(k)) * 2;
#else
    (void)n, (void)k;
    return 0;
#endif
}

void pack_bf16(const uint16_t *w, int32_t n, int32_t k, uint16_t *out) {
#if defined(__AVX512BF16__)
    for (int32_t r = 0; r < n; ++r)
        for (int32_t c = 0; c < k; ++c) out[packed_index(r, c, k)] = w[size_t(r) * k + c];
#else
    (void)w, (void)n, (void)k, (void)out;
#endif
}

Matrix store_matrix(int32_t dtype, const void *rows, int32_t n, int32_t k, Buffer &storage, int32_t n_threads) {
    const TypeTraits &t = *type_traits(dtype);
    if (t.quantized) {
        storage = Buffer(quant_packed_bytes(t, n, k));
        quant_pack(t, static_cast<const uint8_t *>(rows), n, k, storage.data(), n_threads);
        return {storage.data(), dtype, n, k, true};
    }
    const bool pack = dtype == LLAISYS_DTYPE_BF16 && packs_bf16();
    storage = Buffer(pack ? packed_bytes(n, k) : size_t(n) * row_bytes(t, k));
    if (pack)
        pack_bf16(static_cast<const uint16_t *>(rows), n, k, storage.as<uint16_t>());
    else
        std::memcpy(storage.data(), rows, storage.size());
    return {storage.data(), dtype, n, k, pack};
}

void matrix_row(const Matrix &w, int32_t row, float *out) {
    const TypeTraits &t = *type_traits(w.dtype);
    if (t.quantized) {
        quant_packed_row(t, static_cast<const uint8_t *>(w.data), w.k, row, out);
        return;
    }
    if (!w.packed) {
        to_f32(static_cast<const uint8_t *>(w.data) + size_t(row) * row_bytes(t, w.k), w.dtype, w.k, out);
        return;
    }
#if defined(__AVX512BF16__)
    const uint16_t *packed = static_cast<const uint16_t *>(w.data);
    for (int32_t c = 0; c < w.k; ++c) out[c] = bf16_to_f32(packed[packed_index(row, c, w.k)]);
#endif
}

void to_f32(const void *src, int32_t dtype, int64_t n, float *dst) {
    const uint16_t *h = static_cast<const uint16_t *>(src);
    switch (static_cast<llaisys_dtype>(dtype)) {
    case LLAISYS_DTYPE_F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case LLAISYS_DTYPE_F16:
        for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(h[i]);
        break;
    case LLAISYS_DTYPE_BF16:
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
        break;
    case LLAISYS_DTYPE_Q8_0:
    case LLAISYS_DTYPE_Q4_0:
    case LLAISYS_DTYPE_Q5_0:
    case LLAISYS_DTYPE_Q4_K:
    case LLAISYS_DTYPE_Q6_K: quant_dequantize(*type_traits(dtype), static_cast<const uint8_t *>(src), n, dst); break;
    }
}

void from_f32(const float *src, int64_t n, int32_t dtype, void *dst) {
    uint16_t *h = static_cast<uint16_t *>(dst);
    switch (static_cast<llaisys_dtype>(dtype)) {
    case LLAISYS_DTYPE_F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case LLAISYS_DTYPE_F16:
        for (int64_t i = 0; i < n; ++i) h[i] = f32_to_f16(src[i]);
        break;
    case LLAISYS_DTYPE_BF16:
        for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(src[i]);
        break;
    case LLAISYS_DTYPE_Q8_0:
    case LLAISYS_DTYPE_Q4_0:
    case LLAISYS_DTYPE_Q5_0:
    case LLAISYS_DTYPE_Q4_K:
    case LLAISYS_DTYPE_Q6_K: throw InvalidArgument(std::string("no conversion to ") + dtype_name(dtype));
    }
}

static float dot_f32(const float *a, const float *b, int32_t n) {
    v16f acc = {};
    int32_t i = 0;
    for (; i + kLanes <= n; i += kLanes) acc += F32::load(a + i) * F32::load(b + i);
    if (i < n) acc += load_tail<F32>(a + i, n - i) * load_tail<F32>(b + i, n - i);
    return hsum(acc);
}

void rms_norm(const float *x, int32_t m, int32_t d, const void *weight, int32_t dtype, float eps, float *out,
              int32_t n_threads) {
    std::vector<float> w(static_cast<size_t>(d));
    to_f32(weight, dtype, d, w.data());
#pragma omp parallel for num_threads(n_threads) if (int64_t(m) * d > 65536)
    for (int32_t r = 0; r < m; ++r) {
        const float *xr = x + size_t(r) * d;
        float *o = out + size_t(r) * d;
        const float inv = 1.0f / std::sqrt(dot_f32(xr, xr, d) / float(d) + eps);
        for (int32_t i = 0; i < d; ++i) o[i] = w[size_t(i)] * (xr[i] * inv);
    }
}

void rope_angles(int32_t pos, const float *inv_freq, int32_t half, float *cos_out, float *sin_out) {
    for (int32_t i = 0; i < half; ++i) {
        const float angle = float(pos) * inv_freq[i]; // f32 product, as transformers computes it
        cos_out[i] = std::cos(angle);
        sin_out[i] = std::sin(angle);
    }
}

void rope(float *v, int32_t head_dim, const float *cos, const float *sin) {
    const int32_t half = head_dim / 2;
    for (int32_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
    }
}

void rope_move(float *v, int32_t head_dim, int32_t old_pos, int32_t new_pos, const float *inv_freq) {
    const int32_t half = head_dim / 2;
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    // Undo the old rotation (the same angles, sine negated), then apply the new one.
    rope_angles(old_pos, inv_freq, half, c.data(), s.data());
    for (float &x : s) x = -x;
    rope(v, head_dim, c.data(), s.data());
    rope_angles(new_pos, inv_freq, half, c.data(), s.data());
    rope(v, head_dim, c.data(), s.data());
}

void silu_mul(const float *gate, const float *up, int64_t n, float *out, int32_t n_threads) {
    const int64_t chunk = 4096; // a multiple of 16, so chunks split no vector
#pragma omp parallel for num_threads(n_threads) if (n > 65536)
    for (int64_t c = 0; c < n; c += chunk) {
        const int64_t len = std::min(chunk, n - c);
        map16(gate + c, len, out + c, [](v16f g) { return g / (1.0f + exp16(-g)); });
        for (int64_t i = c; i < c + len; ++i) out[i] *= up[i];
    }
}

// Softmax of heads [h0, h0 + HB)'s scores, then their probability-weighted sums of the values.
template <class L, int NV, int HB>
static void weighted_values(const int32_t *cells, int32_t n_cells, const typename L::T *v, int64_t cell_stride,
                            float *scores, int32_t h0, float *out) {
    constexpr int32_t head_dim = NV * kLanes;
    float *probs[HB];
    float inv_total[HB];
    for (int b = 0; b < HB; ++b) {
        float *sh = probs[b] = scores + size_t(h0 + b) * n_cells;
        const float max_score = *std::max_element(sh, sh + n_cells);
        map16(sh, n_cells, sh, [max_score](v16f x) { return exp16(x - max_score); });
        float total = 0.0f;
        for (int32_t j = 0; j < n_cells; ++j) total += sh[j];
        inv_total[b] = 1.0f / total;
    }
    v16f acc[HB][NV] = {};
    for (int32_t j = 0; j < n_cells; ++j) {
        const typename L::T *vc = v + cells[j] * cell_stride;
        v16f value[NV];
        for (int d = 0; d < NV; ++d) value[d] = L::load(vc + d * kLanes);
        for (int b = 0; b < HB; ++b)
            for (int d = 0; d < NV; ++d) acc[b][d] += value[d] * probs[b][j];
    }
    for (int b = 0; b < HB; ++b)
        for (int d = 0; d < NV; ++d) {
            const v16f o = acc[b][d] * inv_total[b];
            std::memcpy(out + size_t(h0 + b) * head_dim + d * kLanes, &o, sizeof o);
        }
}

// Attention for head_dim = 16 * NV: each cached key and value is loaded once for all n_q heads
// that share it, and each head's output stays in registers across the cells.
template <class L, int NV>
static void attention_t(const float *q, int32_t n_q, const int32_t *cells, int32_t n_cells, const typename L::T *k,
                        const typename L::T *v, int64_t cell_stride, float scale, float *scores, float *out) {
    constexpr int32_t head_dim = NV * kLanes;
    // Scores of 16 keys at a time, reduced together by hsum16; 16-bit keys are widened once per block.
    float widened[std::is_same_v<L, F32> ? 1 : kLanes * head_dim];
    int32_t j = 0;
    for (; j + kLanes <= n_cells; j += kLanes) {
        const float *keys[kLanes];
        for (int i = 0; i < kLanes; ++i) {
            const typename L::T *kc = k + cells[j + i] * cell_stride;
            if constexpr (std::is_same_v<L, F32>) {
                keys[i] = kc;
            } else {
                for (int d = 0; d < NV; ++d) {
                    const v16f x = L::load(kc + d * kLanes);
                    std::memcpy(widened + i * head_dim + d * kLanes, &x, sizeof x);
                }
                keys[i] = widened + i * head_dim;
            }
        }
        for (int32_t h = 0; h < n_q; ++h) {
            const float *qh = q + size_t(h) * head_dim;
            v16f query[NV];
            for (int d = 0; d < NV; ++d) query[d] = F32::load(qh + d * kLanes);
            v16f acc[kLanes];
            for (int i = 0; i < kLanes; ++i) {
                v16f a = {};
                for (int d = 0; d < NV; ++d) a += query[d] * F32::load(keys[i] + d * kLanes);
                acc[i] = a;
            }
            const v16f s = hsum16(acc) * scale;
            std::memcpy(scores + size_t(h) * n_cells + j, &s, sizeof s);
        }
    }
    for (; j < n_cells; ++j) {
        const typename L::T *kc = k + cells[j] * cell_stride;
        v16f key[NV];
        for (int d = 0; d < NV; ++d) key[d] = L::load(kc + d * kLanes);
        for (int32_t h = 0; h < n_q; ++h) {
            const float *qh = q + size_t(h) * head_dim;
            v16f acc = {};
            for (int d = 0; d < NV; ++d) acc += F32::load(qh + d * kLanes) * key[d];
            scores[size_t(h) * n_cells + j] = hsum(acc) * scale;
        }
    }
    // Heads in blocks: each value is loaded once per block, and the block's independent sums keep
    // the FMA units busy instead of waiting on one chain of additions.
    // A block's sums take HB * NV vectors: half the registers (32 of 16 lanes with AVX-512, 8 otherwise).
#if defined(__AVX512F__)
    constexpr int HB = NV >= 16 ? 1 : (16 / NV < 4 ? 16 / NV : 4);
#else
    constexpr int HB = NV >= 4 ? 1 : 4 / NV;
#endif
    int32_t h = 0;
    for (; h + HB <= n_q; h += HB) weighted_values<L, NV, HB>(cells, n_cells, v, cell_stride, scores, h, out);
    for (; h < n_q; ++h) weighted_values<L, NV, 1>(cells, n_cells, v, cell_stride, scores, h, out);
}

template <class L>
static void attention_dispatch(const float *q, int32_t n_q, int32_t head_dim, const int32_t *cells, int32_t n_cells,
                               const typename L::T *k, const typename L::T *v, int64_t cell_stride, float scale,
                               float *scores, float *out) {
    switch (head_dim / kLanes) {
    case 4: attention_t<L, 4>(q, n_q, cells, n_cells, k, v, cell_stride, scale, scores, out); break;
    case 8: attention_t<L, 8>(q, n_q, cells, n_cells, k, v, cell_stride, scale, scores, out); break;
    case 2: attention_t<L, 2>(q, n_q, cells, n_cells, k, v, cell_stride, scale, scores, out); break;
    case 1: attention_t<L, 1>(q, n_q, cells, n_cells, k, v, cell_stride, scale, scores, out); break;
    default: attention_t<L, 16>(q, n_q, cells, n_cells, k, v, cell_stride, scale, scores, out); break;
    }
}

void attention(const float *q, int32_t n_q, int32_t head_dim, const int32_t *cells, int32_t n_cells, const void *k,
               const void *v, int32_t kv_dtype, int64_t cell_stride, float scale, float *scores, float *out) {
    switch (static_cast<llaisys_dtype>(kv_dtype)) {
    case LLAISYS_DTYPE_F32:
        attention_dispatch<F32>(q, n_q, head_dim, cells, n_cells, static_cast<const float *>(k),
                         static_cast<const float *>(v), cell_stride, scale, scores, out);
        break;
    case LLAISYS_DTYPE_F16:
        attention_dispatch<F16>(q, n_q, head_dim, cells, n_cells, static_cast<const uint16_t *>(k),
                         static_cast<const uint16_t *>(v), cell_stride, scale, scores, out);
        break;
    case LLAISYS_DTYPE_BF16:
        attention_dispatch<BF16>(q, n_q, head_dim, cells, n_cells, static_cast<const uint16_t *>(k),
                          static_cast<const uint16_t *>(v), cell_stride, scale, scores, out);
        break;
    case LLAISYS_DTYPE_Q8_0:
    case LLAISYS_DTYPE_Q4_0:
    case LLAISYS_DTYPE_Q5_0:
    case LLAISYS_DTYPE_Q4_K:
    case LLAISYS_DTYPE_Q6_K: throw InvalidArgument(std::string("no KV cache in ") + dtype_name(kv_dtype));
    }
}

} // namespace llaisys::kernels
