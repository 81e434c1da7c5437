// Qwen2: a decoder-only transformer with RMSNorm, GQA attention with q/k/v biases and
// NeoX-style RoPE, and a SwiGLU MLP. Weight slot names follow GGUF's (token_embd, blk.N.attn_q, ...).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "registry.hpp"

namespace llaisys {
namespace {

struct LayerWeights {
    WeightSlot *attn_norm, *q, *q_bias, *k, *k_bias, *v, *v_bias, *attn_output;
    WeightSlot *ffn_norm, *gate, *up, *down;
};

// Scratch of one forward pass, grown to the largest batch seen.
struct RunState {
    std::vector<float> x, h, q, k, v, attn, tmp, gate, up, bias;
    std::vector<float> rope_cos, rope_sin; // per token: its rotation, head_dim / 2 each
    std::vector<int32_t> n_visible; // cells each token attends to (a prefix of its view)
};

class Qwen2Model final : public Model {
  public:
    Qwen2Model(const llaisys_model_params &p, std::shared_ptr<WeightStore> shared) : Model(p, std::move(shared)) {
        const int64_t d = p.n_embd, qd = int64_t(p.n_head) * p.head_dim, kvd = int64_t(p.n_head_kv) * p.head_dim;
        add_slot("token_embd", {p.n_vocab, d});
        for (int32_t l = 0; l < p.n_layer; ++l) {
            const std::string b = "blk." + std::to_string(l) + ".";
            add_slot(b + "attn_norm", {d});
            add_slot(b + "attn_q", {qd, d});
            add_slot(b + "attn_q_bias", {qd});
            add_slot(b + "attn_k", {kvd, d});
            add_slot(b + "attn_k_bias", {kvd});
            add_slot(b + "attn_v", {kvd, d});
            add_slot(b + "attn_v_bias", {kvd});
            add_slot(b + "attn_output", {d, qd});
            add_slot(b + "ffn_norm", {d});
            add_slot(b + "ffn_gate", {p.n_ff, d});
            add_slot(b + "ffn_up", {p.n_ff, d});
            add_slot(b + "ffn_down", {d, p.n_ff});
        }
        add_slot("output_norm", {d});
        if (!p.tie_embeddings) add_slot("output", {p.n_vocab, d});
        // Slots are stable now: resolve the per-layer pointers once.
        for (int32_t l = 0; l < p.n_layer; ++l) {
            const std::string b = "blk." + std::to_string(l) + ".";
            layers_.push_back({find_slot(b + "attn_norm"), find_slot(b + "attn_q"), find_slot(b + "attn_q_bias"),
                               find_slot(b + "attn_k"), find_slot(b + "attn_k_bias"), find_slot(b + "attn_v"),
                               find_slot(b + "attn_v_bias"), find_slot(b + "attn_output"), find_slot(b + "ffn_norm"),
                               find_slot(b + "ffn_gate"), find_slot(b + "ffn_up"), find_slot(b + "ffn_down")});
        }
        token_embd_ = find_slot("token_embd");
        output_norm_ = find_slot("output_norm");
        output_ = p.tie_embeddings ? token_embd_ : find_slot("output");
        // inv_freq as transformers computes it, in f32: 1 / theta^(2i / head_dim).
        for (int32_t i = 0; i < p.head_dim / 2; ++i)
            inv_freq_.push_back(1.0f / std::pow(p.rope_theta, float(2 * i) / float(p.head_dim)));
        const size_t kv_bytes = size_t(p.n_ctx) * size_t(kvd) * dtype_size(p.kv_dtype);
        for (int32_t l = 0; l < p.n_layer; ++l) {
            k_cache_.emplace_back(kv_bytes);
            v_cache_.emplace_back(kv_bytes);
        }
    }

    void kv_copy_cell(int32_t from, int32_t to) override {
        const size_t row = kv_row_bytes();
        for (int32_t l = 0; l < params.n_layer; ++l) {
            std::memcpy(k_cache_[size_t(l)].data() + size_t(to) * row, k_cache_[size_t(l)].data() + size_t(from) * row, row);
            std::memcpy(v_cache_[size_t(l)].data() + size_t(to) * row, v_cache_[size_t(l)].data() + size_t(from) * row, row);
        }
    }

    void kv_move_cell(int32_t cell, int32_t old_pos, int32_t new_pos) override {
        const int32_t kvd = params.n_head_kv * params.head_dim;
        std::vector<float> key(static_cast<size_t>(kvd));
        for (int32_t l = 0; l < params.n_layer; ++l) {
            uint8_t *row = k_cache_[size_t(l)].data() + size_t(cell) * kv_row_bytes();
            kernels::to_f32(row, params.kv_dtype, kvd, key.data());
            for (int32_t h = 0; h < params.n_head_kv; ++h)
                kernels::rope_move(key.data() + size_t(h) * params.head_dim, params.head_dim, old_pos, new_pos,
                                   inv_freq_.data());
            kernels::from_f32(key.data(), kvd, params.kv_dtype, row);
        }
    }

  protected:
    int32_t forward(const DecodeInput &in, float *out) override;

  private:
    size_t kv_row_bytes() const {
        return size_t(params.n_head_kv) * size_t(params.head_dim) * dtype_size(params.kv_dtype);
    }
    void attention_layer(int32_t layer, const DecodeInput &in);

    std::vector<LayerWeights> layers_;
    WeightSlot *token_embd_, *output_norm_, *output_;
    std::vector<float> inv_freq_;
    std::vector<Buffer> k_cache_, v_cache_;
    RunState s_;
};

void Qwen2Model::attention_layer(int32_t layer, const DecodeInput &in) {
    const llaisys_model_params &p = params;
    const int32_t T = in.n_tokens, hd = p.head_dim, qd = p.n_head * hd, kvd = p.n_head_kv * hd;
    const int32_t group = p.n_head / p.n_head_kv;
    // Rotate q and k and store k and v in the tokens' cells, then attend.
    const size_t row = kv_row_bytes();
    uint8_t *kc = k_cache_[size_t(layer)].data();
    uint8_t *vc = v_cache_[size_t(layer)].data();
    const float scale = 1.0f / std::sqrt(float(hd));
    const size_t elem = dtype_size(p.kv_dtype);
    const int32_t n_work = T * p.n_head_kv;
    // One parallel region for both phases: at decode sizes a region costs as much as the work.
#pragma omp parallel num_threads(p.n_threads) if (n_work > 1)
    {
#pragma omp for
        for (int32_t i = 0; i < T; ++i) {
            const float *cos = &s_.rope_cos[size_t(i) * hd / 2], *sin = &s_.rope_sin[size_t(i) * hd / 2];
            for (int32_t h = 0; h < p.n_head; ++h) kernels::rope(&s_.q[size_t(i) * qd + size_t(h) * hd], hd, cos, sin);
            for (int32_t h = 0; h < p.n_head_kv; ++h)
                kernels::rope(&s_.k[size_t(i) * kvd + size_t(h) * hd], hd, cos, sin);
            const size_t cell = size_t(in.cell[size_t(i)]);
            kernels::from_f32(&s_.k[size_t(i) * kvd], kvd, p.kv_dtype, kc + cell * row);
            kernels::from_f32(&s_.v[size_t(i) * kvd], kvd, p.kv_dtype, vc + cell * row);
        }
        // (the implied barrier: every token's keys are stored before any token attends)
        // Per-thread scratch kept across calls: zeroing n_ctx x group floats per layer is not free.
        static thread_local std::vector<float> scores;
        scores.resize(size_t(p.n_ctx) * size_t(group));
#pragma omp for schedule(dynamic, 1)
        for (int32_t w = 0; w < n_work; ++w) {
            const int32_t i = w / p.n_head_kv, g = w % p.n_head_kv;
            const std::vector<int32_t> &view = in.views[size_t(in.view[size_t(i)])];
            kernels::attention(&s_.q[size_t(i) * qd + size_t(g) * group * hd], group, hd, view.data(),
                               s_.n_visible[size_t(i)], kc + size_t(g) * hd * elem, vc + size_t(g) * hd * elem,
                               p.kv_dtype, kvd, scale, scores.data(),
                               &s_.attn[size_t(i) * qd + size_t(g) * group * hd]);
        }
    }
}

int32_t Qwen2Model::forward(const DecodeInput &in, float *out) {
    const llaisys_model_params &p = params;
    const int32_t T = in.n_tokens, d = p.n_embd, hd = p.head_dim, qd = p.n_head * hd, kvd = p.n_head_kv * hd;
    const int32_t nt = p.n_threads;
    const int32_t wdt = p.weight_dtype;
    s_.x.resize(size_t(T) * d);
    s_.h.resize(size_t(T) * d);
    s_.tmp.resize(size_t(T) * d);
    s_.q.resize(size_t(T) * qd);
    s_.attn.resize(size_t(T) * qd);
    s_.k.resize(size_t(T) * kvd);
    s_.v.resize(size_t(T) * kvd);
    s_.gate.resize(size_t(T) * p.n_ff);
    s_.up.resize(size_t(T) * p.n_ff);
    s_.bias.resize(size_t(qd + 2 * kvd));
    s_.n_visible.resize(size_t(T));
    s_.rope_cos.resize(size_t(T) * hd / 2);
    s_.rope_sin.resize(size_t(T) * hd / 2);
    for (int32_t i = 0; i < T; ++i) {
        const std::vector<int32_t> &view = in.views[size_t(in.view[size_t(i)])];
        const int32_t pos = in.pos[size_t(i)];
        s_.n_visible[size_t(i)] = int32_t(std::upper_bound(view.begin(), view.end(), pos,
                                                           [this](int32_t p0, int32_t c) { return p0 < cells.pos(c); }) -
                                          view.begin());
        kernels::matrix_row(token_embd_->matrix(), in.token[size_t(i)], &s_.x[size_t(i) * d]);
        kernels::rope_angles(pos, inv_freq_.data(), hd / 2, &s_.rope_cos[size_t(i) * hd / 2],
                             &s_.rope_sin[size_t(i) * hd / 2]);
    }
    float *bq = s_.bias.data(), *bk = bq + qd, *bv = bk + kvd;
    int32_t rows = T; // rows still computed: all tokens, then only the output rows after the last attention
    for (int32_t l = 0; l < p.n_layer; ++l) {
        if (should_abort()) return LLAISYS_ABORTED;
        const LayerWeights &w = layers_[size_t(l)];
        kernels::to_f32(w.q_bias->data.data(), wdt, qd, bq);
        kernels::to_f32(w.k_bias->data.data(), wdt, kvd, bk);
        kernels::to_f32(w.v_bias->data.data(), wdt, kvd, bv);
        kernels::rms_norm(s_.x.data(), T, d, w.attn_norm->data.data(), wdt, p.rms_norm_eps, s_.h.data(), nt);
        const kernels::MatmulOut qkv[] = {{w.q->matrix(), bq, s_.q.data(), qd},
                                           {w.k->matrix(), bk, s_.k.data(), kvd},
                                           {w.v->matrix(), bv, s_.v.data(), kvd}};
        kernels::matmul_many(s_.h.data(), T, qkv, 3, nt);
        attention_layer(l, in);
        if (l == p.n_layer - 1) {
            // Past the last attention only the output rows matter: keep those (out_rows ascend,
            // so copying forward in place is safe) and skip the rest of the layer for the others.
            rows = int32_t(in.out_rows.size());
            for (int32_t r = 0; r < rows; ++r) {
                const size_t src = size_t(in.out_rows[size_t(r)]);
                std::memmove(&s_.x[size_t(r) * d], &s_.x[src * d], sizeof(float) * size_t(d));
                std::memmove(&s_.attn[size_t(r) * qd], &s_.attn[src * qd], sizeof(float) * size_t(qd));
            }
        }
        const size_t n_x = size_t(rows) * d;
        kernels::matmul(s_.attn.data(), rows, w.attn_output->matrix(), nullptr, s_.tmp.data(), d, nt);
        for (size_t j = 0; j < n_x; ++j) s_.x[j] += s_.tmp[j];
        kernels::rms_norm(s_.x.data(), rows, d, w.ffn_norm->data.data(), wdt, p.rms_norm_eps, s_.h.data(), nt);
        const kernels::MatmulOut gate_up[] = {{w.gate->matrix(), nullptr, s_.gate.data(), p.n_ff},
                                               {w.up->matrix(), nullptr, s_.up.data(), p.n_ff}};
        kernels::matmul_many(s_.h.data(), rows, gate_up, 2, nt);
        kernels::silu_mul(s_.gate.data(), s_.up.data(), int64_t(rows) * p.n_ff, s_.gate.data(), nt);
        kernels::matmul(s_.gate.data(), rows, w.down->matrix(), nullptr, s_.tmp.data(), d, nt);
        for (size_t j = 0; j < n_x; ++j) s_.x[j] += s_.tmp[j];
    }
    if (rows == 0) return LLAISYS_OK;
    kernels::rms_norm(s_.x.data(), rows, d, output_norm_->data.data(), wdt, p.rms_norm_eps, s_.h.data(), nt);
    kernels::matmul(s_.h.data(), rows, output_->matrix(), nullptr, out, p.n_vocab, nt);
    return LLAISYS_OK;
}

} // namespace

Model *create_qwen2(const llaisys_model_params &p, std::shared_ptr<WeightStore> shared) {
    auto need_positive = [](int32_t value, const char *field) {
        if (value <= 0) throw InvalidArgument(std::string("qwen2 needs ") + field + " > 0, got " + std::to_string(value));
    };
    need_positive(p.n_vocab, "n_vocab");
    need_positive(p.n_embd, "n_embd");
    need_positive(p.n_layer, "n_layer");
    need_positive(p.n_head, "n_head");
    need_positive(p.n_head_kv, "n_head_kv");
    need_positive(p.head_dim, "head_dim");
    need_positive(p.n_ff, "n_ff");
    if (p.n_head % p.n_head_kv != 0)
        throw InvalidArgument("qwen2 needs n_head (" + std::to_string(p.n_head) + ") to be a multiple of n_head_kv (" +
                              std::to_string(p.n_head_kv) + ")");
    // The attention kernel keeps a head in registers: 1, 2, 4, 8 or 16 vectors of 16 lanes.
    if (p.head_dim % 16 != 0 || (p.head_dim / 16 & (p.head_dim / 16 - 1)) != 0 || p.head_dim > 256)
        throw InvalidArgument("qwen2 needs head_dim 16, 32, 64, 128 or 256, got " + std::to_string(p.head_dim));
    if (!(p.rope_theta > 0.0f)) throw InvalidArgument("qwen2 needs rope_theta > 0");
    if (!(p.rms_norm_eps > 0.0f)) throw InvalidArgument("qwen2 needs rms_norm_eps > 0");
    return new Qwen2Model(p, std::move(shared));
}

} // namespace llaisys
