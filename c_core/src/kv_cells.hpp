// Bookkeeping of the KV cache: which cell holds which position for which sequences.
// The tensors themselves live in the model; this class only decides where tokens go.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace llaisys {

// What a model must do to its cached tensors when the cell map changes under it.
struct KvTensorOps {
    virtual ~KvTensorOps() = default;
    // Copy everything cached in cell `from` into cell `to`.
    virtual void kv_copy_cell(int32_t from, int32_t to) = 0;
    // The token in `cell` moved from position old_pos to new_pos (keys must be re-rotated).
    virtual void kv_move_cell(int32_t cell, int32_t old_pos, int32_t new_pos) = 0;
};

class KvCells {
  public:
    KvCells(int32_t n_ctx, int32_t n_seq_max);

    int32_t capacity() const { return n_ctx_; }
    int32_t used() const { return used_; }
    int32_t n_seq_max() const { return n_seq_max_; }

    bool is_free(int32_t cell) const { return pos_[cell] < 0; }
    int32_t pos(int32_t cell) const { return pos_[cell]; }
    bool has_seq(int32_t cell, int32_t seq) const {
        return (seqs_[size_t(cell) * words_ + seq / 64] >> (seq % 64)) & 1u;
    }

    // The first n free cells in index order, or an empty vector when fewer are free.
    std::vector<int32_t> find_free(int32_t n) const;
    // Occupy a free cell with a token at pos belonging to seqs.
    void occupy(int32_t cell, int32_t pos, const int32_t *seqs, int32_t n_seqs);
    // Free a cell whatever sequences use it.
    void release(int32_t cell);

    int32_t pos_max(int32_t seq) const; // -1 when the sequence is empty
    int32_t pos_min(int32_t seq) const; // -1 when the sequence is empty

    // Cells of seq ordered by position (then index): the order attention reads them in,
    // so results never depend on where tokens happened to be stored.
    std::vector<int32_t> cells_by_pos(int32_t seq) const;
    // Whether two sequences use exactly the same cells (the same history).
    bool same_cells(int32_t a, int32_t b) const { return by_seq_[size_t(a)] == by_seq_[size_t(b)]; }

    // Sequence operations on the half-open position range [p0, p1).
    void seq_rm(int32_t seq, int64_t p0, int64_t p1); // seq < 0: every sequence
    void seq_cp(int32_t src, int32_t dst, int64_t p0, int64_t p1);
    void seq_keep(int32_t seq);
    // Largest position a cell may hold: one less than INT32_MAX so that "max + 1" never overflows.
    static constexpr int64_t kMaxPos = INT32_MAX - 1;
    enum class AddResult { ok, no_space, out_of_range };
    // Nothing changes unless the result is ok: no_space when shared cells need copies and no free
    // cells remain, out_of_range when a position would pass kMaxPos.
    AddResult seq_add(int32_t seq, int64_t p0, int64_t p1, int32_t delta, KvTensorOps &ops);
    void clear();

  private:
    using PosCell = std::pair<int32_t, int32_t>; // (position, cell): a sequence's cells in attention order
    // A sequence's cells with positions in [p0, p1), in position order (a copy: callers change the map).
    std::vector<PosCell> range(int32_t seq, int64_t p0, int64_t p1) const;
    void set_seq(int32_t cell, int32_t seq);
    void unset_seq(int32_t cell, int32_t seq); // frees the cell when no sequence is left
    bool shared(int32_t cell) const;           // used by more than one sequence

    int32_t n_ctx_;
    int32_t n_seq_max_;
    int32_t words_; // 64-bit words per cell in the sequence bitset
    int32_t used_ = 0;
    std::vector<int32_t> pos_;   // -1 = free
    std::vector<uint64_t> seqs_; // n_ctx * words_ bitset
    // Indexes kept in step with pos_ and seqs_, so that position queries, range operations and the
    // search for free cells never scan the whole cache (llama.cpp keeps a position map per sequence too).
    std::vector<std::set<PosCell>> by_seq_; // per sequence
    std::set<int32_t> free_;                // free cells in index order
};

} // namespace llaisys
