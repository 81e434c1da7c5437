"""RadixCache: a radix tree of token runs whose KV cells stay in the core for later requests.

A node is a run of tokens at positions [start, end) of every sequence whose path passes through
it. Its cells belong to a core sequence of its own (a cache sequence, numbered apart from the
running slots), so they outlive the request that computed them; children of one node share its
cells, so a system prompt is held once however many conversations follow it. A request starting
with a cached path gets those cells with seq_cp (no copy, no recompute). A node that a running
request uses is locked, counted along the path to the root as in SGLang's RadixAttention; eviction
frees unlocked leaves, least recently used first. Every change to the core's cell map is appended
to `ops` as a KV operation for the worker to apply, in order.

A finished chat's leaf grows in place when its next turn is added, so a conversation stays one
node; a node is split only where two token runs diverge.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np

from .kv_ops import KvOp, SeqCp, SeqRm


class Node:
    __slots__ = ("parent", "children", "tokens", "start", "seq_id", "lock", "last_used")

    def __init__(self, parent: Optional["Node"], tokens: np.ndarray, start: int, seq_id: Optional[int]):
        self.parent = parent
        self.children: dict[int, Node] = {}  # by first token
        self.tokens = tokens
        self.start = start
        self.seq_id = seq_id
        self.lock = 0  # running requests that use this node's cells (or a descendant's)
        self.last_used = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path(self) -> list["Node"]:
        """This node and its ancestors below the root, deepest first."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes


class RadixCache:
    def __init__(self, seq_ids: range, ops: list[KvOp]):
        self.root = Node(None, np.empty(0, np.int64), 0, None)
        self.ops = ops
        self.free_seq_ids = list(reversed(seq_ids))  # popped from the end: lowest first
        self.nodes: dict[int, Node] = {}  # by cache sequence
        self.cells = 0  # cells the tree holds
        self.evictable = 0  # of those, in unlocked nodes
        self._clock = itertools.count(1)

    # looking up
    def match(self, tokens: np.ndarray) -> tuple[Node, int]:
        """The deepest node on the longest cached prefix of tokens, and that prefix's length (the
        node may be matched only in part: length < node.end)."""
        node, n = self.root, 0
        while n < len(tokens):
            child = node.children.get(int(tokens[n]))
            if child is None:
                break
            k = min(len(child.tokens), len(tokens) - n)
            differ = np.flatnonzero(child.tokens[:k] != tokens[n:n + k])
            m = int(differ[0]) if len(differ) else k
            node, n = child, n + m
            if m < len(child.tokens):
                break
        return node, n

    def copy_into(self, node: Node, seq: int) -> None:
        """Give sequence seq the cells of node's path: positions [0, node.end)."""
        for n in reversed(node.path()):
            self.ops.append(SeqCp(n.seq_id, seq, n.start, n.end))
        self.touch(node)

    # locks
    def lock(self, node: Node) -> None:
        for n in node.path():
            n.lock += 1
            if n.lock == 1:
                self.evictable -= len(n.tokens)

    def unlock(self, node: Node) -> None:
        for n in node.path():
            n.lock -= 1
            if n.lock == 0:
                self.evictable += len(n.tokens)

    def touch(self, node: Node) -> None:
        tick = next(self._clock)
        for n in node.path():
            n.last_used = tick

    # changing the tree
    def cut(self, node: Node, at: int) -> tuple[Node, int]:
        """A node on node's path that ends exactly at position `at` (node itself, or a new parent
        split off it), and `at`; when no cache sequence is left for a split, the nearest ancestor
        ending before `at`, and where it ends."""
        while node.start >= at and node.parent is not None:  # `at` lies above node
            node = node.parent
        if at >= node.end or node is self.root:
            return node, min(at, node.end)
        seq = self._new_seq(node)
        if seq is None:
            return node.parent, node.start
        k = at - node.start
        parent = Node(node.parent, node.tokens[:k], node.start, seq)
        parent.lock, parent.last_used = node.lock, node.last_used  # every lock on node runs through it
        self.ops += [SeqCp(node.seq_id, seq, node.start, at), SeqRm(node.seq_id, node.start, at)]
        node.parent.children[int(node.tokens[0])] = parent
        parent.children[int(node.tokens[k])] = node
        node.parent, node.tokens, node.start = parent, node.tokens[k:], at
        self.nodes[seq] = parent
        return parent, at

    def insert(self, tokens: np.ndarray, seq: int, known: int, final: bool) -> Optional[Node]:
        """Cache the cells of sequence seq for tokens (positions [0, len(tokens))), whose first `known`
        cells are the tree's own already. Returns the node that now ends the cached tokens, or None
        when nothing was added. final: seq is freed right after, so where the tree already holds
        other cells for the same tokens past `known`, seq's copies are simply not taken; a running
        sequence (not final) keeps using its own, so then nothing is taken (it would be held twice).
        """
        node, m = self.match(tokens)
        if m == len(tokens) or (m != known and not final):
            self.touch(node)
            return None
        self.lock(node)  # nothing on the path may be evicted to make room for the insertion
        try:
            attach, end = self.cut(node, m)
            if end != m:
                return None
            run = np.asarray(tokens[m:], dtype=np.int64)
            if attach is not self.root and not attach.children:  # a leaf grows in place
                self.ops.append(SeqCp(seq, attach.seq_id, m, len(tokens)))
                attach.tokens = np.concatenate([attach.tokens, run])
                self.cells += len(run)  # evictable follows when the temporary lock goes
                added = attach
            else:
                new_seq = self._new_seq(attach)
                if new_seq is None:
                    return None
                added = Node(attach, run, m, new_seq)
                attach.children[int(run[0])] = added
                self.nodes[new_seq] = added
                self.ops.append(SeqCp(seq, new_seq, m, len(tokens)))
                self.cells += len(run)
                self.evictable += len(run)
        finally:
            self.unlock(node)
        self.touch(added)
        return added

    def evict_one(self) -> int:
        """Free the least recently used unlocked leaf; returns the cells freed (0: nothing to free)."""
        victim = min((n for n in self.nodes.values() if not n.children and n.lock == 0),
                     key=lambda n: n.last_used, default=None)
        if victim is None:
            return 0
        del victim.parent.children[int(victim.tokens[0])]
        del self.nodes[victim.seq_id]
        self.ops.append(SeqRm(victim.seq_id, 0, -1))
        self.free_seq_ids.append(victim.seq_id)
        self.cells -= len(victim.tokens)
        self.evictable -= len(victim.tokens)
        return len(victim.tokens)

    def _new_seq(self, keep: Node) -> Optional[int]:
        """A free cache sequence, evicting a leaf for one if needed (never keep or its path)."""
        self.lock(keep)
        try:
            while not self.free_seq_ids and self.evict_one():
                pass
        finally:
            self.unlock(keep)
        return self.free_seq_ids.pop() if self.free_seq_ids else None
