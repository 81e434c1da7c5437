// The generic model: weight slots, the KV cell map, batch validation and outputs.
// A model type (qwen2, mock) derives from it and implements forward() and the KV tensor ops.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.hpp"
#include "kernels.hpp"
#include "kv_cells.hpp"

namespace llaisys {

struct ModelType; // registry.hpp

// One named weight. Matrices keep the dtype they were written in; forward() reads them through kernels.
struct WeightSlot {
    std::string name;
    std::vector<int64_t> shape;
    int32_t dtype = LLAISYS_DTYPE_BF16;
    Buffer data;         // empty until written
    bool packed = false; // data holds kernels' packed form (bf16 matrices where the CPU supports it)
    bool is_set() const { return data.size() > 0; }
    // A 2-D slot as the kernels read it.
    kernels::Matrix matrix() const {
        return {data.data(), dtype, int32_t(shape[0]), int32_t(shape[1]), packed};
    }
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        return n;
    }
};

// A validated batch as forward() sees it: every token placed in a cell.
struct DecodeInput {
    int32_t n_tokens = 0;
    std::vector<int32_t> token;
    std::vector<int32_t> pos;
    std::vector<int32_t> cell;     // KV cell of each token
    std::vector<int32_t> view;     // index into views of each token (its first sequence)
    std::vector<std::vector<int32_t>> views; // per distinct first sequence: its cells ordered by position
    std::vector<int32_t> out_rows; // batch indices that produce logits, in batch order
};

// A model's weight slots (llama.cpp's llama_model), owned jointly by every model created to share
// them (llaisysModelCreateShared): read-only while shared, freed with the last of those models.
struct WeightStore {
    std::vector<WeightSlot> slots;
    std::unordered_map<std::string, size_t> index;
};

} // namespace llaisys

// The per-model state beside the weights (llama.cpp's llama_context): KV cells, scratch, logits.
struct llaisys_model : llaisys::KvTensorOps {
    // shared: another model's weights to use (NULL: fresh, unwritten slots).
    llaisys_model(const llaisys_model_params &params, std::shared_ptr<llaisys::WeightStore> shared);
    ~llaisys_model() override = default;

    llaisys_model_params params;
    const llaisys::ModelType *type = nullptr; // its registry row (name, factory), set when created
    const std::shared_ptr<llaisys::WeightStore> weights;
    std::vector<llaisys::WeightSlot> &slots; // weights->slots
    llaisys::KvCells cells;

    bool weights_shared() const { return weights.use_count() > 1; }

    llaisys::WeightSlot *find_slot(const std::string &name);
    void replace_weight(const std::string &name, int32_t dtype, const int64_t *shape, int32_t ndim, const void *data);

    // Validate, place and run one batch; returns a llaisys_status.
    int32_t decode(const llaisys_batch &batch);

    float *logits_ith(int32_t i);

    llaisys_abort_callback abort_callback = nullptr;
    void *abort_data = nullptr;
    bool should_abort() const { return abort_callback && abort_callback(abort_data); }

    std::vector<float> logits;       // n_outputs x n_vocab
    std::vector<int32_t> output_ids; // per token of the last batch: its row or -1
    int32_t n_outputs = 0;
    bool has_outputs = false;

    int32_t kv_seq_add(int32_t seq, int64_t p0, int64_t p1, int32_t delta);

  protected:
    void add_slot(const std::string &name, std::vector<int64_t> shape);
    // Compute logits for in.out_rows into out (n_out_rows x n_vocab). Tokens are already in their cells.
    // Returns LLAISYS_OK or LLAISYS_ABORTED.
    virtual int32_t forward(const llaisys::DecodeInput &in, float *out) = 0;

  private:
    int32_t validate(const llaisys_batch &batch, llaisys::DecodeInput &in);
    std::vector<float> next_logits_; // the buffer the next decode writes its logits into
    bool adopted_;                   // the slots came from another model: add_slot only checks them
};

namespace llaisys {
using Model = llaisys_model;
}
