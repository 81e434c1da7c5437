"""The mock model's logits in Python: the oracle the core tests compare against (c_core/src/mock.cpp)."""
from __future__ import annotations

import numpy as np


def mock_row(bias: np.ndarray, history, pos: int) -> np.ndarray:
    """Logits for an output at `pos` of a sequence whose cells hold history = [(token, position)]."""
    n = len(bias)
    h = 0
    for tok, p in history:
        if p <= pos:
            h = (h + tok * (p + 1)) % n
    return bias.astype(np.float32) - np.float32(0.25) * ((np.arange(n) - h) % n).astype(np.float32)


def mock_greedy(prompt, steps: int, vocab: int = 300, keep_eos: bool = False, ignore_eos: bool = False) -> list[int]:
    """The mock's greedy continuation: next = sum of token * (position + 1) mod vocab, until EOS
    (vocab - 1; kept in the output with keep_eos, passed over with ignore_eos)."""
    seq, out = list(prompt), []
    for _ in range(steps):
        token = sum(t * (p + 1) for p, t in enumerate(seq)) % vocab
        if token == vocab - 1 and not ignore_eos:
            return out + [token] if keep_eos else out
        out.append(token)
        seq.append(token)
    return out


def mock_engine(mock_dir, **args):
    """An LLMEngine on a mock model directory, small limits unless given."""
    from llaisys.engine import EngineArgs, LLMEngine

    args = EngineArgs(model=str(mock_dir), **{"max_num_seqs": 8, "max_num_batched_tokens": 16, "n_ctx": 512, **args})
    return LLMEngine.from_engine_args(args)


def check_kv(engine) -> None:
    """The KV manager's picture equals the core's: used cells, and each prefix-cache node's sequence
    holding exactly its positions; the cache's cell, evictable and lock counts add up."""
    kv, model = engine.kv, engine.worker.model
    assert kv.used == model.kv_used, "the KV manager and the core disagree on used cells"
    assert sum(len(r.live) for r in engine.scheduler.running) <= engine.args.max_num_seqs
    check_draft_kv(engine)
    cache = kv.cache
    if cache is None:
        return
    nodes = list(cache.nodes.values())
    for node in nodes:
        assert (model.kv_seq_pos_min(node.seq_id), model.kv_seq_pos_max(node.seq_id)) == (node.start, node.end - 1)
        assert node.parent.end == node.start and node.parent.children[int(node.tokens[0])] is node
    assert cache.cells == sum(len(n.tokens) for n in nodes)
    assert cache.evictable == sum(len(n.tokens) for n in nodes if n.lock == 0)
    locks = {id(n): 0 for n in nodes}
    for share in kv.shares.values():
        for n in share.node.path() if share.node is not None else ():
            locks[id(n)] += 1
    assert all(n.lock == locks[id(n)] for n in nodes), "a node's lock count is not the number of requests using it"
    assert len(cache.free_seq_ids) + len(nodes) == engine.args.prefix_cache_seqs


def check_draft_kv(engine) -> None:
    """A draft model holds, for each running completion's slot, a prefix of its tokens, and nothing else.
    Sequences may share the cells of a common prefix: the cells in use lie between the distinct
    prefixes held (every cell shared where it can be) and the tokens held (none shared)."""
    drafter = getattr(engine, "drafter", None)
    if drafter is None:
        return
    running = {c.seq_id: c for r in engine.scheduler.running for c in r.live if c.seq_id is not None}
    prefixes = {tuple(h[:p + 1]) for h in drafter.held.values() for p in range(len(h))}
    assert len(prefixes) <= drafter.model.kv_used <= sum(len(h) for h in drafter.held.values()), \
        "the draft's cells are not its record"
    for seq in range(drafter.num_seqs):
        held = drafter.held.get(seq, [])
        if held:
            assert seq in running, f"the draft holds cells of slot {seq}, which runs nothing"
            assert held == running[seq].tokens(0, len(held)), "the draft's cells are not a prefix of its completion"
            assert drafter.model.kv_seq_pos_min(seq) == 0
        assert drafter.model.kv_seq_pos_max(seq) == len(held) - 1, f"slot {seq}'s draft cells are not its record"


def run_checked(engine, max_steps: int = 10_000) -> int:
    """Step to completion, checking the KV accounting against the core at every step."""
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        check_kv(engine)
        assert steps < max_steps, "the engine does not make progress"
    assert held_cells(engine) == 0 == engine.scheduler.kv_used
    assert getattr(engine, "drafter", None) is None or engine.drafter.kv_used == 0, "the draft model leaks cells"
    return steps


def held_cells(engine) -> int:
    """Cells the core holds for requests: all it holds minus the cached cells nothing running uses."""
    return engine.worker.kv_used - engine.kv.evictable


def run_random_workload(engine, rng, new_prompt, arrivals: int, max_tokens: int, steps: int = 500) -> None:
    """Random arrivals (prompts from new_prompt(step, requests so far)) during the first `arrivals`
    steps, n of 1 or 2, greedy, random aborts: the KV accounting is checked against the core after
    every step, nothing leaks, and every completion that ran to its end follows the oracle."""
    from llaisys import SamplingParams
    from llaisys.engine import RequestState

    requests, aborted = [], set()
    for step in range(steps):
        if step < arrivals and rng.random() < 0.3:
            params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randint(1, max_tokens), temperature=0.0)
            requests.append(engine.add_request(new_prompt(step, requests), params))
        if requests and rng.random() < 0.03:
            victim = rng.choice(requests)
            if engine.abort_request(victim.request_id) is not None:
                aborted.add(victim.request_id)
        if not engine.has_unfinished_requests() and step >= arrivals:
            break
        engine.step()
        check_kv(engine)
    run_checked(engine)
    for r in requests:
        if r.request_id in aborted or r.state is RequestState.FAILED:
            continue
        room = min(r.params.max_tokens, engine.max_model_len - len(r.prompt_ids))
        expected = mock_greedy(r.prompt_ids, room, engine.vocab_size, keep_eos=True)
        assert all(c.output_ids == expected for c in r.completions), r.request_id
