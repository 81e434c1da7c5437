"""Greedy generation on the mock model: the mock's formula decides every token; cells are freed after."""
import pytest

from llaisys.greedy import greedy_token_ids, stream_text
from llaisys.models import RuntimeOptions, load_model
from llaisys.models.mock import write_mock_model

from mock_oracle import mock_greedy


@pytest.fixture
def mock(tmp_path):
    return load_model(write_mock_model(tmp_path / "mock", vocab_size=300), RuntimeOptions(n_ctx=64, n_batch=4))


def test_greedy_follows_the_mock_and_frees_cells(mock):
    prompt = mock.encode("hello, mock")  # 11 tokens: fed in chunks of n_batch = 4
    ids = list(greedy_token_ids(mock, prompt, 20))
    assert ids == mock_greedy(prompt, 20)
    assert mock.model.kv_used == 0


def test_greedy_rejects_what_cannot_fit(mock):
    with pytest.raises(ValueError, match="exceeds the context"):
        list(greedy_token_ids(mock, [1] * 60, 10))
    with pytest.raises(ValueError, match="empty"):
        list(greedy_token_ids(mock, [], 10))


def test_stream_text_never_splits_a_character():
    text = "héllo wörld 🙂 ok"
    ids = list(text.encode("utf-8"))  # one token per byte: multi-byte characters span tokens

    def decode(seq):
        return bytes(seq).decode("utf-8", "replace")

    pieces = list(stream_text(decode, iter(ids)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
