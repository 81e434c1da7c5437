/*
 * llaisys.h - the public C API of the llaisys core.
 *
 * The core turns batches of tokens into logits. It never samples: the caller
 * (the Python engine) owns sampling, scheduling and detokenization.
 *
 * Conventions
 *   - Every function is safe to call with bad arguments: it returns an error
 *     code or NULL and never aborts. llaisysGetLastError() then says why.
 *   - Memory returned by the core (logits, names, error strings) is owned by
 *     the core; it stays valid until the next call that changes the model or
 *     until the model is destroyed, whichever comes first.
 *   - Memory passed in (batches, weight data) is owned by the caller and is
 *     not referenced after the call returns (weights are copied).
 *   - A model handle is not thread-safe: one call at a time per model.
 *
 * Semantics follow llama.cpp's llama_batch / llama_decode / llama_memory_seq_*.
 *
 * The block between LLAISYS_CDEF_BEGIN and LLAISYS_CDEF_END is cut out at
 * build time and given to cffi, so it must stay plain C declarations: no
 * preprocessor lines, no macros, no inline code.
 */
#ifndef LLAISYS_H
#define LLAISYS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define LLAISYS_API __declspec(dllexport)
#else
#define LLAISYS_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* LLAISYS_CDEF_BEGIN */

typedef int32_t llaisys_token;  /* token id in [0, n_vocab) */
typedef int32_t llaisys_pos;    /* position of a token in its sequence */
typedef int32_t llaisys_seq_id; /* sequence id in [0, n_seq_max) */

/*
 * Element types of weights and of the KV cache. The block types after BF16 are GGUF's (layouts as
 * in ggml-common.h): data is whole blocks, a row of k elements being k / block-size blocks in
 * order, and only matrix weight slots take them (never the KV cache, norms or biases).
 */
typedef enum llaisys_dtype {
    LLAISYS_DTYPE_F32 = 0,
    LLAISYS_DTYPE_F16 = 1,
    LLAISYS_DTYPE_BF16 = 2,
    LLAISYS_DTYPE_Q8_0 = 3, /* 32 elements in 34 bytes: f16 scale, 32 int8 */
    LLAISYS_DTYPE_Q4_0 = 4, /* 32 in 18: f16 scale, 16 bytes of nibbles (value scale * (q - 8)) */
    LLAISYS_DTYPE_Q5_0 = 5, /* 32 in 22: f16 scale, 32 high bits, 16 bytes of nibbles (scale * (q - 16)) */
    LLAISYS_DTYPE_Q4_K = 6, /* 256 in 144: f16 scale and min, 12 bytes of 6-bit sub-block scales and mins, 128 of nibbles */
    LLAISYS_DTYPE_Q6_K = 7  /* 256 in 210: 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, f16 scale */
} llaisys_dtype;

/* Return codes of llaisysModelDecode (and of the other int32 calls where noted). */
typedef enum llaisys_status {
    LLAISYS_OK = 0,
    LLAISYS_NO_KV_SPACE = 1,    /* no room in the KV cache; state unchanged, retry smaller */
    LLAISYS_ABORTED = 2,        /* the abort callback asked to stop; state unchanged */
    LLAISYS_INVALID = -1,       /* invalid argument or batch; state unchanged */
    LLAISYS_NOT_READY = -2,     /* a weight slot was never written; state unchanged */
    LLAISYS_INTERNAL = -3       /* out of memory or another internal failure */
} llaisys_status;

/*
 * Creation parameters. Start from llaisysModelDefaultParams() and set the
 * architecture fields from the model's config.
 */
typedef struct llaisys_model_params {
    /* architecture (the mock model reads only n_vocab) */
    int32_t n_vocab;       /* rows of the embedding / logits width */
    int32_t n_embd;        /* hidden size */
    int32_t n_layer;       /* transformer blocks */
    int32_t n_head;        /* query heads */
    int32_t n_head_kv;     /* key/value heads (n_head must be a multiple) */
    int32_t head_dim;      /* per-head size; n_head * head_dim is the q width */
    int32_t n_ff;          /* MLP intermediate size */
    float rms_norm_eps;    /* RMSNorm epsilon */
    float rope_theta;      /* RoPE base frequency */
    int32_t tie_embeddings;/* 1: logits use the token embedding (no lm_head slot) */
    int32_t weight_dtype;  /* float llaisys_dtype (f32, f16, bf16) of every weight slot, except that
                              matrix slots may instead be written in a block type */
    /* runtime */
    int32_t n_ctx;         /* KV cache capacity in cells (tokens, all sequences together) */
    int32_t n_seq_max;     /* sequence ids allowed: [0, n_seq_max) */
    int32_t n_batch;       /* most tokens one decode call accepts */
    int32_t n_threads;     /* worker threads; 0 = all cores */
    int32_t kv_dtype;      /* llaisys_dtype of cached keys and values */
} llaisys_model_params;

/*
 * A batch as a struct of arrays, n_tokens long each (llama_batch semantics).
 *   token[i]     token id
 *   pos[i]       its position; NULL = continue each sequence at its cached max + 1
 *   n_seq_id[i]  how many sequences token i belongs to (>= 1)
 *   seq_id[i]    n_seq_id[i] distinct sequence ids; NULL (n_seq_id and seq_id) = all in sequence 0
 *   logits[i]    nonzero = produce a logits row for token i; NULL = only the last token
 * A token in several sequences is stored once and shared (a common prompt);
 * those sequences must have exactly the same history so far (the same cached
 * cells and the same earlier tokens of this batch). Positions lie in
 * [0, INT32_MAX - 1].
 */
typedef struct llaisys_batch {
    int32_t n_tokens;
    llaisys_token *token;
    llaisys_pos *pos;
    int32_t *n_seq_id;
    llaisys_seq_id **seq_id;
    int8_t *logits;
} llaisys_batch;

/* Opaque model handle. */
typedef struct llaisys_model llaisys_model;

/* Called between layers during decode; returning nonzero aborts the decode. */
typedef int32_t (*llaisys_abort_callback)(void *data);

/* The message of the last failed call on this thread ("" if none). Owned by the core. */
LLAISYS_API const char *llaisysGetLastError(void);

/* Number of registered model types and the name of the i-th ("qwen2", "mock"); NULL if out of range. */
LLAISYS_API int32_t llaisysModelTypeCount(void);
LLAISYS_API const char *llaisysModelTypeName(int32_t i);

/* Defaults: bf16 weights, f32 KV cache, n_ctx 4096, n_seq_max 1, n_batch 512, all cores. */
LLAISYS_API llaisys_model_params llaisysModelDefaultParams(void);

/*
 * Create a model of a registered type ("qwen2" or "mock"). Weight slots start
 * unwritten. Returns NULL on an unknown type or bad parameters (see
 * llaisysGetLastError). Destroy with llaisysModelDestroy.
 */
LLAISYS_API llaisys_model *llaisysModelCreate(const char *type, const llaisys_model_params *params);

/*
 * Create a model that uses source's weights, never copying them, with its own KV
 * cache, scratch buffers, logits and abort callback (llama.cpp's llama_context
 * over one llama_model): several contexts of one set of weights, e.g. replicas
 * or per-tenant caches in one process. params sets the new model's runtime
 * fields (n_ctx, n_seq_max, n_batch, n_threads, kv_dtype); its other fields must
 * equal source's. NULL params = source's own. While two or more models share
 * the weights they are read-only: ReplaceWeight fails on each of them. The
 * weights are freed with the last model that uses them, destroyed in any
 * order; models sharing weights may decode at the same time on different
 * threads. Returns NULL on bad arguments (see llaisysGetLastError).
 */
LLAISYS_API llaisys_model *llaisysModelCreateShared(const llaisys_model *source, const llaisys_model_params *params);

/* Free the model, its KV cache, and its weights unless another model still shares them. NULL is a no-op. */
LLAISYS_API void llaisysModelDestroy(llaisys_model *model);

/* The parameters the model was created with (n_threads resolved to the real count). */
LLAISYS_API llaisys_model_params llaisysModelGetParams(const llaisys_model *model);

/* Weight slots: how many, the name of the i-th (NULL if out of range). */
LLAISYS_API int32_t llaisysModelWeightCount(const llaisys_model *model);
LLAISYS_API const char *llaisysModelWeightName(const llaisys_model *model, int32_t i);

/*
 * Shape of the named slot: writes up to 4 dims into shape and returns ndim,
 * or -1 for an unknown name.
 */
LLAISYS_API int32_t llaisysModelWeightShape(const llaisys_model *model, const char *name, int64_t *shape);

/* 1 if the named slot has been written, 0 if not, -1 for an unknown name. */
LLAISYS_API int32_t llaisysModelWeightIsSet(const llaisys_model *model, const char *name);

/*
 * Write the named weight slot from row-major data of the given dtype and
 * shape (copied; the caller keeps ownership of data). The shape is in
 * elements; block-type data holds shape[0] rows of shape[1] / block-size
 * blocks each. Writing a slot again frees the old copy. Returns 0, or -1 when
 * the name is unknown, the dtype is not a llaisys_dtype, a float dtype is not
 * the model's weight_dtype, a block type is given for a slot that is not a
 * matrix, the row length is not a whole number of blocks, the shape does not
 * match the slot, or the weights are shared (llaisysModelCreateShared).
 */
LLAISYS_API int32_t llaisysModelReplaceWeight(llaisys_model *model, const char *name, int32_t dtype,
                                              const int64_t *shape, int32_t ndim, const void *data);

/* Install (or with NULL remove) the abort callback checked between layers. */
LLAISYS_API void llaisysModelSetAbortCallback(llaisys_model *model, llaisys_abort_callback callback, void *data);

/*
 * Run the batch: store its tokens in the KV cache and compute logits for the
 * tokens whose logits flag is set. Returns a llaisys_status:
 *   0 ok;
 *   1 no room in the KV cache (nothing changed; retry with fewer tokens);
 *   2 aborted by the callback (nothing changed);
 *  -1 invalid batch (nothing changed): n_tokens 0 or above n_batch, a token
 *     outside the vocabulary, a seq_id out of range or repeated in one token,
 *     positions of a sequence not starting at its cached max + 1 or not
 *     consecutive inside the batch, a position out of range, a shared token
 *     whose sequences have different histories;
 *  -2 a weight slot was never written (nothing changed).
 */
LLAISYS_API int32_t llaisysModelDecode(llaisys_model *model, llaisys_batch batch);

/* Logits rows of the last successful decode, one per output token in batch order, n_vocab floats each. */
LLAISYS_API float *llaisysModelGetLogits(llaisys_model *model);

/*
 * The logits row of batch token i of the last decode, or for negative i the
 * (-i)-th output row from the end (-1 = last). NULL if token i produced no
 * output or i is out of range.
 */
LLAISYS_API float *llaisysModelGetLogitsIth(llaisys_model *model, int32_t i);

/* Number of logits rows of the last decode. */
LLAISYS_API int32_t llaisysModelNOutputs(const llaisys_model *model);

/*
 * For each token of the last decode (n_tokens entries), its logits row or -1
 * when it had none. NULL before the first successful decode.
 */
LLAISYS_API const int32_t *llaisysModelOutputIds(const llaisys_model *model);

/* Number of tokens of the last successful decode (the length of OutputIds). */
LLAISYS_API int32_t llaisysModelNBatchTokens(const llaisys_model *model);

/*
 * KV cache sequence operations. Ranges are half-open [p0, p1); a negative p0
 * means 0 and a negative p1 means no end. seq < 0 means every sequence where
 * noted. Invalid ids return -1 and leave the cache untouched.
 */

/* Remove the positions [p0, p1) of seq (seq < 0: of every sequence). Returns 1 (removed), -1 invalid. */
LLAISYS_API int32_t llaisysModelKvSeqRm(llaisys_model *model, llaisys_seq_id seq, llaisys_pos p0, llaisys_pos p1);

/* Make dst share src's cells in [p0, p1) (no copy). Returns 0, -1 invalid. */
LLAISYS_API int32_t llaisysModelKvSeqCp(llaisys_model *model, llaisys_seq_id src, llaisys_seq_id dst,
                                        llaisys_pos p0, llaisys_pos p1);

/* Remove every cell not used by seq. Returns 0, -1 invalid. */
LLAISYS_API int32_t llaisysModelKvSeqKeep(llaisys_model *model, llaisys_seq_id seq);

/*
 * Add delta to the positions [p0, p1) of seq, re-rotating the cached keys so
 * attention stays correct; cells pushed below position 0 are removed. A cell
 * shared with other sequences is first copied for seq so the others keep
 * their positions. Returns 0, 1 when there is no free cell for such a copy
 * (nothing changed), -1 invalid (nothing changed), also when a position
 * would pass INT32_MAX - 1.
 */
LLAISYS_API int32_t llaisysModelKvSeqAdd(llaisys_model *model, llaisys_seq_id seq, llaisys_pos p0, llaisys_pos p1,
                                         llaisys_pos delta);

/* Largest / smallest cached position of seq; -1 if it is empty or seq is invalid. */
LLAISYS_API llaisys_pos llaisysModelKvSeqPosMax(const llaisys_model *model, llaisys_seq_id seq);
LLAISYS_API llaisys_pos llaisysModelKvSeqPosMin(const llaisys_model *model, llaisys_seq_id seq);

/* Drop every cell of every sequence. */
LLAISYS_API void llaisysModelKvClear(llaisys_model *model);

/* Cells in use and total cells (n_ctx), for usage metrics. */
LLAISYS_API int32_t llaisysModelKvUsedCells(const llaisys_model *model);
LLAISYS_API int32_t llaisysModelKvCapacity(const llaisys_model *model);

/*
 * Type utilities, also the kernels' test entry points.
 */

/* Bytes of n elements of dtype (whole blocks for block types); -1 for an unknown dtype or an n that is not whole blocks. */
LLAISYS_API int64_t llaisysDtypeRowBytes(int32_t dtype, int64_t n);

/*
 * Convert n elements of dtype data (row-major, whole blocks for block types)
 * into the caller's out (n floats), exactly as decode reads weights. Returns 0,
 * or -1 for an unknown dtype, a negative n, an n that is not whole blocks or a
 * NULL pointer.
 */
LLAISYS_API int32_t llaisysDequantize(int32_t dtype, const void *data, int64_t n, float *out);

/*
 * y[m, n] = x[m, k] w[n, k]^T with the kernels decode uses for a weight slot of
 * this dtype (w is row-major in the caller's layout, copied and packed as
 * ReplaceWeight would; x and y belong to the caller). Block types quantize the
 * activations as decode does. Returns 0, or -1 for an unknown dtype, sizes
 * that are not positive, a k that is not whole blocks or a NULL pointer.
 */
LLAISYS_API int32_t llaisysMatmul(int32_t dtype, const void *w, int32_t n, int32_t k, const float *x, int32_t m,
                                  float *y, int32_t n_threads);

/* LLAISYS_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* LLAISYS_H */
