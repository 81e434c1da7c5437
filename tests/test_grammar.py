"""Constrained decoding on the mock model: every output parses and validates, the mask composes
with the sampler's bans and logit_bias, and a grammar's state follows rollbacks and preemption."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher

from llaisys import SamplingParams
from llaisys.engine.grammar import GrammarState, GrammarTokenizers
from llaisys.engine.sampler import SamplingRow, sample
from llaisys.models.mock import MockAdapter, write_mock_model

from mock_oracle import mock_engine, run_checked

VOCAB = 300
EOS = VOCAB - 1
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                 "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "ok": {"type": "boolean"}}, "required": ["point", "ok"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock"), vocab_size=VOCAB)


def grammar(schema) -> str:
    return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum array", "nested"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_completion_parses_and_validates(mock_dir, schema, temperature):
    engine = mock_engine(mock_dir)
    params = SamplingParams(n=3, max_tokens=120, temperature=temperature, seed=3, grammar=grammar(schema))
    requests = [engine.add_request(p, params) for p in ("hello", "a longer prompt here")]
    run_checked(engine)
    for r in requests:
        for c in r.completions:
            assert c.finish_reason == "stop", c.detokenizer.text
            jsonschema.validate(json.loads(c.detokenizer.text), schema)


def test_a_preempted_request_resumes_its_grammar(mock_dir):
    schema = {**SCHEMAS[1], "minItems": 4}  # about 30 tokens each: four requests do not fit in 90 cells
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=5, grammar=grammar(schema))
    prompts = ("abcdef", "ghijkl", "mnopqr", "stuvwx")
    alone = mock_engine(mock_dir)
    expected = [alone.add_request(p, params) for p in prompts]
    run_checked(alone)
    engine = mock_engine(mock_dir, n_ctx=90, max_num_batched_tokens=16)
    requests = [engine.add_request(p, params) for p in prompts]
    run_checked(engine)
    assert engine.stats().num_preemptions > 0
    for r, e in zip(requests, expected):
        assert r.completions[0].finish_reason == "stop"
        assert r.completions[0].output_ids == e.completions[0].output_ids  # seeded: the same text, preempted or not
        jsonschema.validate(json.loads(r.completions[0].detokenizer.text), schema)


def test_the_state_follows_rollbacks_of_the_output(mock_dir):
    adapter = MockAdapter.from_pretrained(mock_dir)
    tokenizers = GrammarTokenizers(adapter.grammar_tokenizer)
    state = GrammarState(grammar(SCHEMAS[0]), tokenizers, VOCAB)
    ends = {EOS}
    out, masks = [], []
    for _ in range(12):
        state.sync(out, ends)
        masks.append(state.allowed(ends))
        out.append(int(np.flatnonzero(masks[-1])[-1]))
    state.sync(out[:4], ends)  # four tokens kept, the rest taken away
    assert np.array_equal(state.allowed(ends), masks[4])
    state.sync(out + [EOS], ends)  # an end token is never fed to the grammar...
    state.sync(out[:6], ends)  # ...nor rolled back
    assert np.array_equal(state.allowed(ends), masks[6])
    state.sync(out, ends)
    fresh = GrammarState(grammar(SCHEMAS[0]), tokenizers, VOCAB)
    fresh.sync(out, ends)
    assert np.array_equal(state.allowed(ends), fresh.allowed(ends))


def test_the_mask_composes_with_bans_and_logit_bias():
    x = np.zeros((1, 50), dtype=np.float32)
    allowed = np.zeros(50, dtype=bool)
    allowed[[3, 7, 9]] = True
    params = SamplingParams(temperature=0.0, logit_bias={40: 100.0, 9: 5.0})
    assert sample(x, [SamplingRow(params, None, [], [], allowed=allowed)]).token_ids.tolist() == [9]
    assert sample(x, [SamplingRow(params, None, [], [], banned_ids={9}, allowed=allowed)]).token_ids.tolist() == [3]
    assert sample(x, [SamplingRow(params, None, [], [])]).token_ids.tolist() == [40]
    drawn = {int(sample(x, [SamplingRow(SamplingParams(temperature=1.0), np.random.default_rng(i), [], [],
                                        banned_ids={7}, allowed=allowed)]).token_ids[0]) for i in range(200)}
    assert drawn == {3, 9}


@pytest.mark.parametrize("kwargs, name", [(dict(logit_bias={-1: 1.0}), "logit_bias"),
                                          (dict(logit_bias={3: 101.0}), "logit_bias"),
                                          (dict(grammar=5), "grammar"),
                                          (dict(grammar="{}", min_tokens=2), "min_tokens"),
                                          (dict(grammar="{}", ignore_eos=True), "ignore_eos")])
def test_bad_params_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        SamplingParams(**kwargs)
