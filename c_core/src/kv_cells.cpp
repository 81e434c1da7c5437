#include "kv_cells.hpp"

#include <algorithm>

namespace llaisys {

KvCells::KvCells(int32_t n_ctx, int32_t n_seq_max)
    : n_ctx_(n_ctx), n_seq_max_(n_seq_max), words_((n_seq_max + 63) / 64), pos_(size_t(n_ctx), -1),
      seqs_(size_t(n_ctx) * size_t((n_seq_max + 63) / 64), 0) {}

std::vector<int32_t> KvCells::find_free(int32_t n) const {
    std::vector<int32_t> cells;
    if (n > n_ctx_ - used_) return cells;
    cells.reserve(size_t(n));
    for (int32_t c = 0; c < n_ctx_ && int32_t(cells.size()) < n; ++c)
        if (pos_[c] < 0) cells.push_back(c);
    return cells;
}

void KvCells::occupy(int32_t cell, int32_t pos, const int32_t *seqs, int32_t n_seqs) {
    pos_[cell] = pos;
    ++used_;
    for (int32_t i = 0; i < n_seqs; ++i) set_seq(cell, seqs[i]);
}

void KvCells::release(int32_t cell) {
    if (pos_[cell] < 0) return;
    pos_[cell] = -1;
    std::fill_n(seqs_.begin() + size_t(cell) * words_, words_, 0);
    --used_;
}

void KvCells::set_seq(int32_t cell, int32_t seq) {
    seqs_[size_t(cell) * words_ + seq / 64] |= uint64_t(1) << (seq % 64);
}

void KvCells::unset_seq(int32_t cell, int32_t seq) {
    seqs_[size_t(cell) * words_ + seq / 64] &= ~(uint64_t(1) << (seq % 64));
    for (int32_t w = 0; w < words_; ++w)
        if (seqs_[size_t(cell) * words_ + w]) return;
    release(cell);
}

bool KvCells::shared(int32_t cell) const {
    int count = 0;
    for (int32_t w = 0; w < words_; ++w) count += __builtin_popcountll(seqs_[size_t(cell) * words_ + w]);
    return count > 1;
}

int32_t KvCells::pos_max(int32_t seq) const {
    int32_t best = -1;
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= 0 && has_seq(c, seq)) best = std::max(best, pos_[c]);
    return best;
}

int32_t KvCells::pos_min(int32_t seq) const {
    int32_t best = -1;
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= 0 && has_seq(c, seq) && (best < 0 || pos_[c] < best)) best = pos_[c];
    return best;
}

std::vector<int32_t> KvCells::cells_by_pos(int32_t seq) const {
    std::vector<int32_t> cells;
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= 0 && has_seq(c, seq)) cells.push_back(c);
    std::stable_sort(cells.begin(), cells.end(), [this](int32_t a, int32_t b) { return pos_[a] < pos_[b]; });
    return cells;
}

void KvCells::seq_rm(int32_t seq, int64_t p0, int64_t p1) {
    for (int32_t c = 0; c < n_ctx_; ++c) {
        if (pos_[c] < p0 || pos_[c] >= p1) continue; // free cells have pos -1 < p0
        if (seq < 0)
            release(c);
        else if (has_seq(c, seq))
            unset_seq(c, seq);
    }
}

void KvCells::seq_cp(int32_t src, int32_t dst, int64_t p0, int64_t p1) {
    if (src == dst) return;
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= p0 && pos_[c] < p1 && has_seq(c, src)) set_seq(c, dst);
}

void KvCells::seq_keep(int32_t seq) {
    for (int32_t c = 0; c < n_ctx_; ++c) {
        if (pos_[c] < 0) continue;
        if (!has_seq(c, seq)) {
            release(c);
            continue;
        }
        std::fill_n(seqs_.begin() + size_t(c) * words_, words_, 0);
        set_seq(c, seq);
    }
}

KvCells::AddResult KvCells::seq_add(int32_t seq, int64_t p0, int64_t p1, int32_t delta, KvTensorOps &ops) {
    if (delta == 0) return AddResult::ok;
    std::vector<int32_t> targets;
    int32_t copies = 0;
    for (int32_t c = 0; c < n_ctx_; ++c) {
        if (pos_[c] < p0 || pos_[c] >= p1 || !has_seq(c, seq)) continue;
        targets.push_back(c);
        if (pos_[c] + int64_t(delta) > kMaxPos) return AddResult::out_of_range;
        if (shared(c) && pos_[c] + int64_t(delta) >= 0) ++copies;
    }
    std::vector<int32_t> spare = find_free(copies);
    if (int32_t(spare.size()) < copies) return AddResult::no_space;
    size_t next_spare = 0;
    for (int32_t c : targets) {
        int64_t moved = int64_t(pos_[c]) + delta;
        if (shared(c)) {
            // The other sequences keep this cell; seq gets its own moved copy.
            unset_seq(c, seq);
            if (moved < 0) continue;
            int32_t copy = spare[next_spare++];
            ops.kv_copy_cell(c, copy);
            occupy(copy, pos_[c], &seq, 1);
            c = copy;
        }
        if (moved < 0) {
            release(c);
            continue;
        }
        int32_t old_pos = pos_[c];
        pos_[c] = int32_t(moved);
        ops.kv_move_cell(c, old_pos, int32_t(moved));
    }
    return AddResult::ok;
}

bool KvCells::same_cells(int32_t a, int32_t b) const {
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= 0 && has_seq(c, a) != has_seq(c, b)) return false;
    return true;
}

void KvCells::clear() {
    std::fill(pos_.begin(), pos_.end(), -1);
    std::fill(seqs_.begin(), seqs_.end(), 0);
    used_ = 0;
}

} // namespace llaisys
