#include "kv_cells.hpp"

#include <algorithm>

namespace llaisys {

KvCells::KvCells(int32_t n_ctx, int32_t n_seq_max)
    : n_ctx_(n_ctx), n_seq_max_(n_seq_max), words_((n_seq_max + 63) / 64), pos_(size_t(n_ctx), -1),
      seqs_(size_t(n_ctx) * size_t((n_seq_max + 63) / 64), 0), by_seq_(size_t(n_seq_max)) {
    for (int32_t c = 0; c < n_ctx; ++c) free_.insert(free_.end(), c);
}

std::vector<int32_t> KvCells::find_free(int32_t n) const {
    std::vector<int32_t> cells;
    if (n > n_ctx_ - used_) return cells;
    cells.reserve(size_t(n));
    for (auto it = free_.begin(); int32_t(cells.size()) < n; ++it) cells.push_back(*it);
    return cells;
}

void KvCells::occupy(int32_t cell, int32_t pos, const int32_t *seqs, int32_t n_seqs) {
    pos_[cell] = pos;
    free_.erase(cell);
    ++used_;
    for (int32_t i = 0; i < n_seqs; ++i) set_seq(cell, seqs[i]);
}

void KvCells::release(int32_t cell) {
    if (pos_[cell] < 0) return;
    for (int32_t w = 0; w < words_; ++w)
        for (uint64_t bits = seqs_[size_t(cell) * words_ + w]; bits; bits &= bits - 1)
            by_seq_[size_t(w * 64 + __builtin_ctzll(bits))].erase({pos_[cell], cell});
    std::fill_n(seqs_.begin() + size_t(cell) * words_, words_, 0);
    pos_[cell] = -1;
    free_.insert(cell);
    --used_;
}

void KvCells::set_seq(int32_t cell, int32_t seq) {
    seqs_[size_t(cell) * words_ + seq / 64] |= uint64_t(1) << (seq % 64);
    by_seq_[size_t(seq)].insert({pos_[cell], cell});
}

void KvCells::unset_seq(int32_t cell, int32_t seq) {
    seqs_[size_t(cell) * words_ + seq / 64] &= ~(uint64_t(1) << (seq % 64));
    by_seq_[size_t(seq)].erase({pos_[cell], cell});
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
    const std::set<PosCell> &s = by_seq_[size_t(seq)];
    return s.empty() ? -1 : s.rbegin()->first;
}

int32_t KvCells::pos_min(int32_t seq) const {
    const std::set<PosCell> &s = by_seq_[size_t(seq)];
    return s.empty() ? -1 : s.begin()->first;
}

std::vector<int32_t> KvCells::cells_by_pos(int32_t seq) const {
    std::vector<int32_t> cells;
    cells.reserve(by_seq_[size_t(seq)].size());
    for (const PosCell &pc : by_seq_[size_t(seq)]) cells.push_back(pc.second);
    return cells;
}

std::vector<KvCells::PosCell> KvCells::range(int32_t seq, int64_t p0, int64_t p1) const {
    const std::set<PosCell> &s = by_seq_[size_t(seq)];
    auto first = s.lower_bound({int32_t(std::max<int64_t>(p0, 0)), INT32_MIN});
    auto last = p1 > kMaxPos ? s.end() : s.lower_bound({int32_t(std::max<int64_t>(p1, 0)), INT32_MIN});
    return p0 >= p1 ? std::vector<PosCell>() : std::vector<PosCell>(first, last);
}

void KvCells::seq_rm(int32_t seq, int64_t p0, int64_t p1) {
    if (seq >= 0) {
        for (const PosCell &pc : range(seq, p0, p1)) unset_seq(pc.second, seq);
        return;
    }
    for (int32_t c = 0; c < n_ctx_; ++c)
        if (pos_[c] >= p0 && pos_[c] < p1) release(c); // free cells have pos -1 < p0
}

void KvCells::seq_cp(int32_t src, int32_t dst, int64_t p0, int64_t p1) {
    if (src == dst) return;
    for (const PosCell &pc : range(src, p0, p1)) set_seq(pc.second, dst);
}

void KvCells::seq_keep(int32_t seq) {
    for (int32_t c = 0; c < n_ctx_; ++c) {
        if (pos_[c] < 0) continue;
        if (!has_seq(c, seq)) {
            release(c);
            continue;
        }
        for (int32_t w = 0; w < words_; ++w)
            for (uint64_t bits = seqs_[size_t(c) * words_ + w]; bits; bits &= bits - 1)
                if (int32_t other = w * 64 + __builtin_ctzll(bits); other != seq) unset_seq(c, other);
    }
}

KvCells::AddResult KvCells::seq_add(int32_t seq, int64_t p0, int64_t p1, int32_t delta, KvTensorOps &ops) {
    if (delta == 0) return AddResult::ok;
    std::vector<PosCell> targets = range(seq, p0, p1);
    int32_t copies = 0;
    for (const PosCell &pc : targets) {
        if (pc.first + int64_t(delta) > kMaxPos) return AddResult::out_of_range;
        if (shared(pc.second) && pc.first + int64_t(delta) >= 0) ++copies;
    }
    std::vector<int32_t> spare = find_free(copies);
    if (int32_t(spare.size()) < copies) return AddResult::no_space;
    size_t next_spare = 0;
    for (auto [old_pos, c] : targets) {
        int64_t moved = int64_t(old_pos) + delta;
        if (shared(c)) {
            // The other sequences keep this cell; seq gets its own moved copy.
            unset_seq(c, seq);
            if (moved < 0) continue;
            int32_t copy = spare[next_spare++];
            ops.kv_copy_cell(c, copy);
            occupy(copy, old_pos, &seq, 1);
            c = copy;
        }
        if (moved < 0) {
            release(c);
            continue;
        }
        by_seq_[size_t(seq)].erase({old_pos, c}); // seq is the cell's only sequence here
        pos_[c] = int32_t(moved);
        by_seq_[size_t(seq)].insert({int32_t(moved), c});
        ops.kv_move_cell(c, old_pos, int32_t(moved));
    }
    return AddResult::ok;
}

void KvCells::clear() {
    std::fill(pos_.begin(), pos_.end(), -1);
    std::fill(seqs_.begin(), seqs_.end(), 0);
    for (std::set<PosCell> &s : by_seq_) s.clear();
    free_.clear();
    for (int32_t c = 0; c < n_ctx_; ++c) free_.insert(free_.end(), c);
    used_ = 0;
}

} // namespace llaisys
