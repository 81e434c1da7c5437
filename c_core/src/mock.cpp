// The mock model: no network, logits are a known function of the sequence's cached tokens.
// For an output token at position p in sequence s, with h = sum over the cells of s at
// positions <= p of token * (position + 1):
//     target = h mod n_vocab,   logits[v] = logit_bias[v] - 0.25 * ((v - target) mod n_vocab)
// so greedy decoding picks `target`, sampling sees a smooth distribution, and any leak
// between sequences or any wrong KV bookkeeping changes the numbers.
#include <vector>

#include "kernels.hpp"
#include "registry.hpp"

namespace llaisys {
namespace {

class MockModel final : public Model {
  public:
    MockModel(const llaisys_model_params &p, std::shared_ptr<WeightStore> shared)
        : Model(p, std::move(shared)), cell_token_(size_t(p.n_ctx), 0) {
        add_slot("logit_bias", {p.n_vocab});
    }

    void kv_copy_cell(int32_t from, int32_t to) override { cell_token_[size_t(to)] = cell_token_[size_t(from)]; }
    void kv_move_cell(int32_t, int32_t, int32_t) override {} // positions live in the cell map

  protected:
    int32_t forward(const DecodeInput &in, float *out) override {
        if (should_abort()) return LLAISYS_ABORTED;
        for (int32_t i = 0; i < in.n_tokens; ++i) cell_token_[size_t(in.cell[size_t(i)])] = in.token[size_t(i)];
        const int64_t n_vocab = params.n_vocab;
        std::vector<float> bias(static_cast<size_t>(n_vocab));
        const WeightSlot &slot = slots[0];
        kernels::to_f32(slot.data.data(), slot.dtype, n_vocab, bias.data());
        for (size_t r = 0; r < in.out_rows.size(); ++r) {
            const int32_t i = in.out_rows[r];
            int64_t h = 0;
            for (int32_t c : in.views[size_t(in.view[size_t(i)])]) {
                if (cells.pos(c) > in.pos[size_t(i)]) break; // the view is ordered by position
                h = (h + int64_t(cell_token_[size_t(c)]) * (cells.pos(c) + 1)) % n_vocab;
            }
            float *row = out + r * size_t(n_vocab);
            for (int64_t v = 0; v < n_vocab; ++v)
                row[v] = bias[size_t(v)] - 0.25f * float(((v - h) % n_vocab + n_vocab) % n_vocab);
        }
        return LLAISYS_OK;
    }

  private:
    std::vector<int32_t> cell_token_;
};

} // namespace

Model *create_mock(const llaisys_model_params &params, std::shared_ptr<WeightStore> shared) {
    if (params.n_vocab <= 0) throw InvalidArgument("mock model needs n_vocab > 0");
    return new MockModel(params, std::move(shared));
}

} // namespace llaisys
