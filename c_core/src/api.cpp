// The C entry points: argument checks, exceptions turned into return codes, the last-error string.
#include <algorithm>
#include <new>
#include <string>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "registry.hpp"

using namespace llaisys;

namespace llaisys {

static thread_local std::string g_last_error;

void set_last_error(const std::string &message) { g_last_error = message; }
void clear_last_error() { g_last_error.clear(); }

} // namespace llaisys

namespace {

// Run f, mapping caller mistakes to LLAISYS_INVALID and anything else to LLAISYS_INTERNAL.
template <class F> int32_t guarded(F &&f) {
    try {
        clear_last_error();
        return f();
    } catch (const InvalidArgument &e) {
        set_last_error(e.what());
        return LLAISYS_INVALID;
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return LLAISYS_INTERNAL;
    } catch (const std::exception &e) {
        set_last_error(e.what());
        return LLAISYS_INTERNAL;
    }
}

bool check_model(const llaisys_model *model) {
    if (model) return true;
    set_last_error("model is NULL");
    return false;
}

bool check_seq(const llaisys_model *model, llaisys_seq_id seq, bool allow_all) {
    if ((allow_all && seq < 0) || (seq >= 0 && seq < model->params.n_seq_max)) return true;
    set_last_error("seq_id " + std::to_string(seq) + " is outside [0, " + std::to_string(model->params.n_seq_max) + ")");
    return false;
}

// Half-open range with negative ends meaning open; 64-bit so the open end includes INT32_MAX.
struct PosRange {
    int64_t p0, p1;
};
PosRange normalise_range(llaisys_pos p0, llaisys_pos p1) {
    return {p0 < 0 ? 0 : int64_t(p0), p1 < 0 ? INT64_MAX : int64_t(p1)};
}

int32_t default_threads() {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return int32_t(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

void check_params(const llaisys_model_params &p) {
    // Block types are per matrix slot (ReplaceWeight), never the model-wide float type or the cache's.
    if (!dtype_size(p.weight_dtype))
        throw InvalidArgument("weight_dtype " + std::to_string(p.weight_dtype) + " is not a float dtype (f32, f16, bf16)");
    if (!dtype_size(p.kv_dtype))
        throw InvalidArgument("kv_dtype " + std::to_string(p.kv_dtype) + " is not a float dtype (f32, f16, bf16)");
    if (p.n_ctx <= 0) throw InvalidArgument("n_ctx must be > 0, got " + std::to_string(p.n_ctx));
    if (p.n_seq_max <= 0 || p.n_seq_max > 4096)
        throw InvalidArgument("n_seq_max must be in [1, 4096], got " + std::to_string(p.n_seq_max));
    if (p.n_batch <= 0) throw InvalidArgument("n_batch must be > 0, got " + std::to_string(p.n_batch));
    if (p.n_threads < 0) throw InvalidArgument("n_threads must be >= 0, got " + std::to_string(p.n_threads));
}

// A model sharing weights must read them as their owner does: every field but the runtime ones equal.
void check_same_architecture(const llaisys_model_params &a, const llaisys_model_params &b) {
    const auto same = [](const char *field, double x, double y) {
        if (x != y)
            throw InvalidArgument(std::string("a model sharing weights needs the source's ") + field + " (" +
                                  std::to_string(x) + "), got " + std::to_string(y));
    };
    same("n_vocab", a.n_vocab, b.n_vocab);
    same("n_embd", a.n_embd, b.n_embd);
    same("n_layer", a.n_layer, b.n_layer);
    same("n_head", a.n_head, b.n_head);
    same("n_head_kv", a.n_head_kv, b.n_head_kv);
    same("head_dim", a.head_dim, b.head_dim);
    same("n_ff", a.n_ff, b.n_ff);
    same("rms_norm_eps", a.rms_norm_eps, b.rms_norm_eps);
    same("rope_theta", a.rope_theta, b.rope_theta);
    same("tie_embeddings", a.tie_embeddings, b.tie_embeddings);
    same("weight_dtype", a.weight_dtype, b.weight_dtype);
}

// The named slot, or NULL with the last error set.
const WeightSlot *find_slot(const llaisys_model *model, const char *name) {
    if (!check_model(model)) return nullptr;
    if (!name) {
        set_last_error("weight name is NULL");
        return nullptr;
    }
    const WeightSlot *slot = const_cast<llaisys_model *>(model)->find_slot(name);
    if (!slot) set_last_error(std::string("unknown weight '") + name + "'");
    return slot;
}

// The traits of dtype with n a whole number of its blocks, or InvalidArgument.
const TypeTraits &checked_type(int32_t dtype, int64_t n) {
    const TypeTraits *t = type_traits(dtype);
    if (!t) throw InvalidArgument("dtype " + std::to_string(dtype) + " is not a llaisys_dtype");
    if (n < 0 || n % t->block_elems != 0)
        throw InvalidArgument(std::to_string(n) + " elements are not whole " + t->name + " blocks of " +
                              std::to_string(t->block_elems));
    return *t;
}

} // namespace

extern "C" {

const char *llaisysGetLastError(void) { return g_last_error.c_str(); }

int32_t llaisysModelTypeCount(void) {
    int32_t count;
    model_types(count);
    return count;
}

const char *llaisysModelTypeName(int32_t i) {
    int32_t count;
    const ModelType *types = model_types(count);
    return i >= 0 && i < count ? types[i].name : nullptr;
}

llaisys_model_params llaisysModelDefaultParams(void) {
    llaisys_model_params p = {};
    p.rms_norm_eps = 1e-6f;
    p.rope_theta = 10000.0f;
    p.weight_dtype = LLAISYS_DTYPE_BF16;
    p.n_ctx = 4096;
    p.n_seq_max = 1;
    p.n_batch = 512;
    p.n_threads = 0;
    p.kv_dtype = LLAISYS_DTYPE_F32;
    return p;
}

llaisys_model *llaisysModelCreate(const char *type, const llaisys_model_params *params) {
    llaisys_model *model = nullptr;
    guarded([&]() -> int32_t {
        if (!type) throw InvalidArgument("model type is NULL");
        if (!params) throw InvalidArgument("params is NULL");
        llaisys_model_params p = *params;
        check_params(p);
        if (p.n_threads == 0) p.n_threads = default_threads();
        int32_t count;
        const ModelType *types = model_types(count);
        for (int32_t i = 0; i < count; ++i)
            if (std::string(types[i].name) == type) {
                model = types[i].create(p, nullptr);
                model->type = &types[i];
                return LLAISYS_OK;
            }
        std::string known;
        for (int32_t i = 0; i < count; ++i) known += std::string(i ? ", " : "") + types[i].name;
        throw InvalidArgument(std::string("unknown model type '") + type + "' (known: " + known + ")");
    });
    return model;
}

llaisys_model *llaisysModelCreateShared(const llaisys_model *source, const llaisys_model_params *params) {
    llaisys_model *model = nullptr;
    guarded([&]() -> int32_t {
        if (!source) throw InvalidArgument("source model is NULL");
        llaisys_model_params p = params ? *params : source->params;
        check_params(p);
        if (p.n_threads == 0) p.n_threads = default_threads();
        check_same_architecture(source->params, p);
        model = source->type->create(p, source->weights);
        model->type = source->type;
        return LLAISYS_OK;
    });
    return model;
}

void llaisysModelDestroy(llaisys_model *model) { delete model; }

llaisys_model_params llaisysModelGetParams(const llaisys_model *model) {
    return model ? model->params : llaisysModelDefaultParams();
}

int32_t llaisysModelWeightCount(const llaisys_model *model) { return model ? int32_t(model->slots.size()) : 0; }

const char *llaisysModelWeightName(const llaisys_model *model, int32_t i) {
    if (!model || i < 0 || i >= int32_t(model->slots.size())) return nullptr;
    return model->slots[size_t(i)].name.c_str();
}

int32_t llaisysModelWeightShape(const llaisys_model *model, const char *name, int64_t *shape) {
    const WeightSlot *slot = find_slot(model, name);
    if (!slot) return LLAISYS_INVALID;
    for (size_t i = 0; i < slot->shape.size() && shape; ++i) shape[i] = slot->shape[i];
    return int32_t(slot->shape.size());
}

int32_t llaisysModelWeightIsSet(const llaisys_model *model, const char *name) {
    const WeightSlot *slot = find_slot(model, name);
    if (!slot) return LLAISYS_INVALID;
    return slot->is_set() ? 1 : 0;
}

int32_t llaisysModelReplaceWeight(llaisys_model *model, const char *name, int32_t dtype, const int64_t *shape,
                                  int32_t ndim, const void *data) {
    if (!check_model(model)) return LLAISYS_INVALID;
    return guarded([&]() -> int32_t {
        if (!name) throw InvalidArgument("weight name is NULL");
        model->replace_weight(name, dtype, shape, ndim, data);
        return LLAISYS_OK;
    });
}

void llaisysModelSetAbortCallback(llaisys_model *model, llaisys_abort_callback callback, void *data) {
    if (!model) return;
    model->abort_callback = callback;
    model->abort_data = data;
}

int32_t llaisysModelDecode(llaisys_model *model, llaisys_batch batch) {
    if (!check_model(model)) return LLAISYS_INVALID;
    return guarded([&]() -> int32_t { return model->decode(batch); });
}

float *llaisysModelGetLogits(llaisys_model *model) {
    return model && model->has_outputs ? model->logits.data() : nullptr;
}

float *llaisysModelGetLogitsIth(llaisys_model *model, int32_t i) { return model ? model->logits_ith(i) : nullptr; }

int32_t llaisysModelNOutputs(const llaisys_model *model) { return model ? model->n_outputs : 0; }

const int32_t *llaisysModelOutputIds(const llaisys_model *model) {
    return model && model->has_outputs ? model->output_ids.data() : nullptr;
}

int32_t llaisysModelNBatchTokens(const llaisys_model *model) {
    return model && model->has_outputs ? int32_t(model->output_ids.size()) : 0;
}

int32_t llaisysModelKvSeqRm(llaisys_model *model, llaisys_seq_id seq, llaisys_pos p0, llaisys_pos p1) {
    if (!check_model(model) || !check_seq(model, seq, true)) return LLAISYS_INVALID;
    const PosRange r = normalise_range(p0, p1);
    model->cells.seq_rm(seq, r.p0, r.p1);
    return 1;
}

int32_t llaisysModelKvSeqCp(llaisys_model *model, llaisys_seq_id src, llaisys_seq_id dst, llaisys_pos p0,
                            llaisys_pos p1) {
    if (!check_model(model) || !check_seq(model, src, false) || !check_seq(model, dst, false)) return LLAISYS_INVALID;
    const PosRange r = normalise_range(p0, p1);
    model->cells.seq_cp(src, dst, r.p0, r.p1);
    return LLAISYS_OK;
}

int32_t llaisysModelKvSeqKeep(llaisys_model *model, llaisys_seq_id seq) {
    if (!check_model(model) || !check_seq(model, seq, false)) return LLAISYS_INVALID;
    model->cells.seq_keep(seq);
    return LLAISYS_OK;
}

int32_t llaisysModelKvSeqAdd(llaisys_model *model, llaisys_seq_id seq, llaisys_pos p0, llaisys_pos p1,
                             llaisys_pos delta) {
    if (!check_model(model) || !check_seq(model, seq, false)) return LLAISYS_INVALID;
    const PosRange r = normalise_range(p0, p1);
    return guarded([&]() -> int32_t { return model->kv_seq_add(seq, r.p0, r.p1, delta); });
}

llaisys_pos llaisysModelKvSeqPosMax(const llaisys_model *model, llaisys_seq_id seq) {
    if (!check_model(model) || !check_seq(model, seq, false)) return -1;
    return model->cells.pos_max(seq);
}

llaisys_pos llaisysModelKvSeqPosMin(const llaisys_model *model, llaisys_seq_id seq) {
    if (!check_model(model) || !check_seq(model, seq, false)) return -1;
    return model->cells.pos_min(seq);
}

void llaisysModelKvClear(llaisys_model *model) {
    if (model) model->cells.clear();
}

int32_t llaisysModelKvUsedCells(const llaisys_model *model) { return model ? model->cells.used() : 0; }

int32_t llaisysModelKvCapacity(const llaisys_model *model) { return model ? model->cells.capacity() : 0; }

int64_t llaisysDtypeRowBytes(int32_t dtype, int64_t n) {
    int64_t bytes = -1;
    guarded([&]() -> int32_t {
        bytes = int64_t(row_bytes(checked_type(dtype, n), n));
        return LLAISYS_OK;
    });
    return bytes;
}

int32_t llaisysDequantize(int32_t dtype, const void *data, int64_t n, float *out) {
    return guarded([&]() -> int32_t {
        checked_type(dtype, n);
        if (!data || !out) throw InvalidArgument("data or out is NULL");
        kernels::to_f32(data, dtype, n, out);
        return LLAISYS_OK;
    });
}

int32_t llaisysMatmul(int32_t dtype, const void *w, int32_t n, int32_t k, const float *x, int32_t m, float *y,
                      int32_t n_threads) {
    return guarded([&]() -> int32_t {
        checked_type(dtype, k);
        if (n <= 0 || k <= 0 || m <= 0 || n_threads < 0)
            throw InvalidArgument("n, k and m must be > 0 and n_threads >= 0");
        if (!w || !x || !y) throw InvalidArgument("w, x or y is NULL");
        Buffer storage;
        const int32_t threads = n_threads ? n_threads : default_threads();
        const kernels::Matrix matrix = kernels::store_matrix(dtype, w, n, k, storage, threads);
        kernels::matmul(x, m, matrix, nullptr, y, n, threads);
        return LLAISYS_OK;
    });
}

} // extern "C"
