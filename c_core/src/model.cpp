#include "model.hpp"

#include <algorithm>
#include <map>

namespace llaisys {

static std::string shape_str(const int64_t *shape, size_t ndim) {
    std::string s = "[";
    for (size_t i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

} // namespace llaisys

using namespace llaisys;

llaisys_model::llaisys_model(const llaisys_model_params &p, std::shared_ptr<WeightStore> shared)
    : params(p), weights(shared ? std::move(shared) : std::make_shared<WeightStore>()), slots(weights->slots),
      cells(p.n_ctx, p.n_seq_max), adopted_(weights_shared()) {}

void llaisys_model::add_slot(const std::string &name, std::vector<int64_t> shape) {
    if (adopted_) {
        // Same type and architecture as the source, so the same slots in the same order.
        const WeightSlot *slot = find_slot(name);
        if (!slot || slot->shape != shape) throw std::logic_error("shared weights lack slot '" + name + "'");
        return;
    }
    weights->index[name] = slots.size();
    WeightSlot slot;
    slot.name = name;
    slot.shape = std::move(shape);
    slot.dtype = params.weight_dtype;
    slots.push_back(std::move(slot));
}

WeightSlot *llaisys_model::find_slot(const std::string &name) {
    auto it = weights->index.find(name);
    return it == weights->index.end() ? nullptr : &slots[it->second];
}

void llaisys_model::replace_weight(const std::string &name, int32_t dtype, const int64_t *shape, int32_t ndim,
                                   const void *data) {
    WeightSlot *slot = find_slot(name);
    if (!slot) throw InvalidArgument("unknown weight '" + name + "'");
    if (weights_shared())
        throw InvalidArgument("weight '" + name + "' is shared with another model (llaisysModelCreateShared), so read-only");
    const TypeTraits *traits = type_traits(dtype);
    if (!traits) throw InvalidArgument("weight '" + name + "' has dtype " + std::to_string(dtype) + ", not a llaisys_dtype");
    const bool matrix = slot->shape.size() == 2;
    if (traits->quantized ? !matrix : dtype != params.weight_dtype)
        throw InvalidArgument("weight '" + name + "' has dtype " + dtype_name(dtype) + ", the slot takes " +
                              dtype_name(params.weight_dtype) + (matrix ? " or a block type" : ""));
    if (!shape || ndim != int32_t(slot->shape.size()) || !std::equal(slot->shape.begin(), slot->shape.end(), shape))
        throw InvalidArgument("weight '" + name + "' has shape " + shape_str(shape, shape ? size_t(std::max(ndim, 0)) : 0) +
                              ", the slot expects " + shape_str(slot->shape.data(), slot->shape.size()));
    if (traits->quantized && shape[1] % traits->block_elems != 0)
        throw InvalidArgument("weight '" + name + "': rows of " + std::to_string(shape[1]) + " elements are not whole " +
                              traits->name + " blocks of " + std::to_string(traits->block_elems));
    if (!data) throw InvalidArgument("weight '" + name + "' has no data");
    // Allocated before the old copy is dropped, so a failure keeps it.
    Buffer fresh;
    bool packed = false;
    if (matrix)
        packed = kernels::store_matrix(dtype, data, int32_t(shape[0]), int32_t(shape[1]), fresh, params.n_threads).packed;
    else {
        fresh = Buffer(size_t(slot->numel()) * dtype_size(dtype));
        std::memcpy(fresh.data(), data, fresh.size());
    }
    slot->data = std::move(fresh);
    slot->dtype = dtype;
    slot->packed = packed;
}

int32_t llaisys_model::validate(const llaisys_batch &b, DecodeInput &in) {
    const int32_t n = b.n_tokens;
    if (n <= 0 || n > params.n_batch)
        throw InvalidArgument("batch has " + std::to_string(n) + " tokens; allowed 1.." + std::to_string(params.n_batch));
    if (!b.token) throw InvalidArgument("batch.token is NULL");
    if ((b.n_seq_id == nullptr) != (b.seq_id == nullptr))
        throw InvalidArgument("batch.n_seq_id and batch.seq_id must both be set or both be NULL");
    static const int32_t seq0 = 0;
    auto seqs_of = [&](int32_t i, int32_t &count) -> const int32_t * {
        if (!b.seq_id) {
            count = 1;
            return &seq0;
        }
        count = b.n_seq_id[i];
        return b.seq_id[i];
    };
    in.n_tokens = n;
    in.token.assign(b.token, b.token + n);
    in.pos.resize(size_t(n));
    // Next expected position of every sequence touched by the batch, and the batch tokens it got.
    std::map<int32_t, int64_t> next_pos;
    std::map<int32_t, std::vector<int32_t>> batch_tokens;
    for (int32_t i = 0; i < n; ++i) {
        if (b.token[i] < 0 || b.token[i] >= params.n_vocab)
            throw InvalidArgument("token " + std::to_string(b.token[i]) + " at batch index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(params.n_vocab) + ")");
        int32_t count;
        const int32_t *seqs = seqs_of(i, count);
        if (count < 1 || !seqs) throw InvalidArgument("batch index " + std::to_string(i) + " belongs to no sequence");
        for (int32_t k = 0; k < count; ++k) {
            int32_t s = seqs[k];
            if (s < 0 || s >= params.n_seq_max)
                throw InvalidArgument("seq_id " + std::to_string(s) + " at batch index " + std::to_string(i) +
                                      " is outside [0, " + std::to_string(params.n_seq_max) + ")");
            for (int32_t j = 0; j < k; ++j)
                if (seqs[j] == s)
                    throw InvalidArgument("seq_id " + std::to_string(s) + " repeated at batch index " + std::to_string(i));
            if (!next_pos.count(s)) next_pos[s] = cells.pos_max(s) + 1;
        }
        const int64_t p = b.pos ? b.pos[i] : next_pos[seqs[0]];
        if (p < 0 || p > KvCells::kMaxPos)
            throw InvalidArgument("position " + std::to_string(p) + " at batch index " + std::to_string(i) +
                                  " is outside [0, " + std::to_string(KvCells::kMaxPos) + "]");
        for (int32_t k = 0; k < count; ++k) {
            int64_t &expected = next_pos[seqs[k]];
            if (p != expected)
                throw InvalidArgument("position " + std::to_string(p) + " of seq " + std::to_string(seqs[k]) +
                                      " at batch index " + std::to_string(i) + " must be " +
                                      std::to_string(expected) + " (cached max + 1, then consecutive)");
            expected = p + 1;
            // A shared token is stored once and attends through its first sequence, so every
            // sequence it joins must have exactly the same history, cached and in this batch.
            if (k > 0 && (batch_tokens[seqs[k]] != batch_tokens[seqs[0]] || !cells.same_cells(seqs[0], seqs[k])))
                throw InvalidArgument("token at batch index " + std::to_string(i) + " is shared by seqs " +
                                      std::to_string(seqs[0]) + " and " + std::to_string(seqs[k]) +
                                      ", whose histories differ");
        }
        for (int32_t k = 0; k < count; ++k) batch_tokens[seqs[k]].push_back(i);
        in.pos[size_t(i)] = int32_t(p);
    }
    for (WeightSlot &slot : slots)
        if (!slot.is_set()) {
            set_last_error("weight '" + slot.name + "' was never written");
            return LLAISYS_NOT_READY;
        }
    in.out_rows.clear();
    for (int32_t i = 0; i < n; ++i)
        if (b.logits ? b.logits[i] != 0 : i == n - 1) in.out_rows.push_back(i);
    return LLAISYS_OK;
}

int32_t llaisys_model::decode(const llaisys_batch &b) {
    DecodeInput in;
    int32_t status = validate(b, in);
    if (status != LLAISYS_OK) return status;
    in.cell = cells.find_free(in.n_tokens);
    if (in.cell.empty()) {
        set_last_error("no room in the KV cache for " + std::to_string(in.n_tokens) + " tokens (" +
                       std::to_string(cells.capacity() - cells.used()) + " cells free)");
        return LLAISYS_NO_KV_SPACE;
    }
    static const int32_t seq0 = 0;
    for (int32_t i = 0; i < in.n_tokens; ++i) {
        const int32_t *seqs = b.seq_id ? b.seq_id[i] : &seq0;
        cells.occupy(in.cell[size_t(i)], in.pos[size_t(i)], seqs, b.seq_id ? b.n_seq_id[i] : 1);
    }
    // Attention views: one per distinct first sequence, built after the batch is placed.
    std::map<int32_t, int32_t> view_of_seq;
    in.view.resize(size_t(in.n_tokens));
    for (int32_t i = 0; i < in.n_tokens; ++i) {
        int32_t s = b.seq_id ? b.seq_id[i][0] : 0;
        auto it = view_of_seq.find(s);
        if (it == view_of_seq.end()) {
            it = view_of_seq.emplace(s, int32_t(in.views.size())).first;
            in.views.push_back(cells.cells_by_pos(s));
        }
        in.view[size_t(i)] = it->second;
    }
    // Written into a second buffer, so a failed decode keeps the previous logits; both are reused
    // across calls rather than allocated and zeroed again at every step.
    std::vector<float> &out = next_logits_;
    out.resize(in.out_rows.size() * size_t(params.n_vocab));
    try {
        status = forward(in, out.data());
    } catch (...) {
        for (int32_t c : in.cell) cells.release(c);
        throw;
    }
    if (status != LLAISYS_OK) {
        for (int32_t c : in.cell) cells.release(c);
        set_last_error("decode aborted by the abort callback");
        return status;
    }
    std::swap(logits, out);
    n_outputs = int32_t(in.out_rows.size());
    output_ids.assign(size_t(in.n_tokens), -1);
    for (size_t r = 0; r < in.out_rows.size(); ++r) output_ids[size_t(in.out_rows[r])] = int32_t(r);
    has_outputs = true;
    return LLAISYS_OK;
}

float *llaisys_model::logits_ith(int32_t i) {
    if (!has_outputs) return nullptr;
    int32_t row;
    if (i < 0) {
        row = n_outputs + i;
        if (row < 0) return nullptr;
    } else {
        if (i >= int32_t(output_ids.size())) return nullptr;
        row = output_ids[size_t(i)];
        if (row < 0) return nullptr;
    }
    return logits.data() + size_t(row) * size_t(params.n_vocab);
}

int32_t llaisys_model::kv_seq_add(int32_t seq, int64_t p0, int64_t p1, int32_t delta) {
    switch (cells.seq_add(seq, p0, p1, delta, *this)) {
    case KvCells::AddResult::no_space:
        set_last_error("no free KV cell to copy shared cells of seq " + std::to_string(seq) + " before shifting");
        return LLAISYS_NO_KV_SPACE;
    case KvCells::AddResult::out_of_range:
        throw InvalidArgument("shifting seq " + std::to_string(seq) + " by " + std::to_string(delta) +
                              " moves a position past " + std::to_string(KvCells::kMaxPos));
    default: return LLAISYS_OK;
    }
}
