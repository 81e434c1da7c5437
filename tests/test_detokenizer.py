"""IncrementalDetokenizer: streamed pieces add up to the full decode, never split a UTF-8 character,
never show any part of a stop string, and decode only a short window of tokens per step."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys.engine.detokenizer import IncrementalDetokenizer

EOS = 300  # a mock id above the bytes: decodes to nothing, like a skipped special token


def byte_decode(ids):
    """The mock adapter's decode: ids 0..255 are UTF-8 bytes, larger ids are dropped."""
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def string_decoder(tokens):
    """A decode where id i is the string tokens[i], so a test chooses where the text is split."""
    return lambda ids: "".join(tokens[i] for i in ids)


def stream(det, ids, check_stop=True):
    return [det.add_token(i, check_stop) for i in ids]


def stream_tokens(tokens, stop):
    """Feed the string tokens one by one; return the detokenizer and the pieces."""
    det = IncrementalDetokenizer(string_decoder(tokens), stop=stop)
    return det, stream(det, range(len(tokens)))


def recording(decode):
    """decode, plus the list of the lengths of the id sequences it was called with."""
    lengths = []

    def wrapped(ids):
        lengths.append(len(ids))
        return decode(ids)
    return wrapped, lengths


# Text with many multi-byte characters (2, 3 and 4 bytes in UTF-8).
texts = st.text(st.one_of(st.sampled_from("aZ \n\té中齉😀🦀𝔘"), st.characters(codec="utf-8")), max_size=30)
# Byte ids: valid UTF-8 text, arbitrary (mostly invalid) bytes, and ids that decode to nothing.
byte_ids = st.lists(st.one_of(texts.map(lambda s: list(s.encode())),
                              st.binary(max_size=6).map(list),
                              st.just([EOS])),
                    max_size=8).map(lambda chunks: [i for c in chunks for i in c])


# --- UTF-8 safety and exactness on the mock's byte decoder ---

@given(byte_ids)
def test_bytes_stream_adds_up_to_full_decode(ids):
    det = IncrementalDetokenizer(byte_decode)
    pieces = stream(det, ids)
    assert "".join(pieces) + det.flush() == byte_decode(ids) == det.text


@given(st.lists(st.one_of(texts.map(lambda s: list(s.encode())), st.just([EOS])), max_size=6))
def test_valid_text_never_streams_a_replacement_character(chunks):
    ids = [i for c in chunks for i in c]  # one token per byte: multi-byte characters span tokens
    det = IncrementalDetokenizer(byte_decode)
    pieces = stream(det, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert det.flush() == ""  # complete text is released without waiting for the end
    assert det.text == byte_decode(ids)


def test_split_character_is_held_until_complete():
    det = IncrementalDetokenizer(byte_decode)
    assert stream(det, list("a😀".encode())) == ["a", "", "", "", "😀"]


def test_invalid_bytes_are_released():
    det = IncrementalDetokenizer(byte_decode)
    stream(det, [0xFF] * 50 + [ord("a")])
    assert det.text == "\ufffd" * 50 + "a"  # before any flush
    det = IncrementalDetokenizer(byte_decode)
    assert stream(det, [0xE4, 0xB8, ord("b")]) == ["", "", "\ufffdb"]  # an unfinished 3-byte character
    det = IncrementalDetokenizer(byte_decode)
    assert stream(det, [ord("c"), 0xE4, 0xB8]) == ["c", "", ""]
    assert det.flush() == "\ufffd" and det.text == "c\ufffd"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(byte_ids.map(lambda ids: [i for i in ids if i != EOS]), min_size=20, max_size=40))
def test_window_stays_short(chunks):
    ids = [i for c in chunks for i in c]
    decode, lengths = recording(byte_decode)
    det = IncrementalDetokenizer(decode)
    stream(det, ids)
    det.flush()
    # The window spans the previous character and the current one, 4 bytes at most each, even
    # through runs of invalid bytes.
    assert max(lengths, default=0) <= 8


def test_prompt_context():
    prompt = list(b"user: hi\nassistant:")
    det = IncrementalDetokenizer(byte_decode, prompt_ids=prompt)
    assert stream(det, list(" ok😀".encode())) == [" ", "o", "k", "", "", "", "😀"]
    # A prompt ending inside a character is not used: its bytes would merge with the output's.
    det = IncrementalDetokenizer(byte_decode, prompt_ids=prompt + [0xF0, 0x9F])
    assert "".join(stream(det, [0x98, 0x80, ord("!")])) + det.flush() == "\ufffd\ufffd!"


# --- Stop strings ---

def test_stop_at_token_boundary():
    det, pieces = stream_tokens(["Hello", " STOP", " more"], stop=[" STOP"])
    assert pieces[:2] == ["Hello", ""]
    assert det.text == "Hello" and det.stop_string == " STOP"


def test_stop_inside_one_token():
    det, pieces = stream_tokens(["Hel", "lo STOP me"], stop=["STOP"])
    assert pieces == ["Hel", "lo "]
    assert det.text == "Hello " and det.stop_string == "STOP"


def test_stop_spanning_three_tokens():
    det, pieces = stream_tokens(["Hi <", "|e", "nd", "|> tail"], stop=["<|end|>"])
    assert pieces == ["Hi ", "", "", ""]  # no part of the stop string is ever emitted
    assert det.text == "Hi " and det.stop_string == "<|end|>"


def test_stop_is_the_whole_output():
    det, pieces = stream_tokens(["ST", "OP"], stop=["STOP"])
    assert pieces == ["", ""] and det.text == "" and det.stop_string == "STOP"
    assert det.flush() == ""


@pytest.mark.parametrize("stop", [["ab", "abc"], ["abc", "ab"]])
def test_stop_that_is_a_prefix_of_another(stop):
    det, pieces = stream_tokens(["x", "a", "bc"], stop=stop)
    assert pieces == ["x", "", ""]
    assert det.stop_string == "ab"  # complete one token before "abc"
    det, _ = stream_tokens(["xabcd"], stop=stop)
    assert det.text == "x" and det.stop_string == "ab"  # same start: the shorter one completes first


def test_earliest_stop_wins():
    det, _ = stream_tokens(["say hello world"], stop=["world", "hello world"])
    assert det.text == "say " and det.stop_string == "hello world"


def test_partial_match_that_is_not_a_stop_is_released():
    det, pieces = stream_tokens(["go ST", "ART", " now"], stop=["STOP"])
    assert pieces == ["go ", "START", " now"] and det.stop_string is None
    det, pieces = stream_tokens(["go ST"], stop=["STOP", "ST!"])
    assert pieces == ["go "] and det.flush() == "ST" and det.text == "go ST"


def test_check_stop_false_emits_everything_and_is_never_searched():
    tokens = ["a STOP ", "b ST", "OP c", "STOP"]
    det = IncrementalDetokenizer(string_decoder(tokens), stop=["STOP"])
    assert [det.add_token(0, check_stop=False), det.add_token(1, check_stop=False)] == ["a STOP ", "b ST"]
    assert det.stop_string is None
    # "b ST" + "OP" straddles the switch: not a stop. The next whole one is.
    assert stream(det, [2, 3]) == ["OP c", ""]
    assert det.text == "a STOP b STOP c" and det.stop_string == "STOP"


def expected_texts(tokens, stops):
    """The text after each token per the spec, and the stop string: before a stop, all but the
    longest tail that is a proper prefix of a stop string; at the first token after which stop
    strings appear, the text up to the one starting earliest (then the shortest)."""
    out = []
    for k in range(1, len(tokens) + 1):
        text = "".join(tokens[:k])
        hits = [(text.find(s), len(s), s) for s in stops if s in text]
        if hits:
            start, _, stop = min(hits)
            return out + [text[:start]], stop
        held = max((n for n in range(1, len(text) + 1) for s in stops
                    if len(s) > n and s.startswith(text[-n:])), default=0)
        out.append(text[:len(text) - held])
    return out, None


@given(tokens=st.lists(st.text("abc", max_size=4), max_size=12),
       stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       unchecked=st.integers(0, 12))
def test_stop_strings_follow_the_spec(tokens, stops, unchecked):
    """The first `unchecked` tokens come with check_stop=False: they are emitted at once and the
    search starts after them."""
    unchecked = min(unchecked, len(tokens))
    det = IncrementalDetokenizer(string_decoder(tokens), stop=stops)
    before = "".join(stream(det, range(unchecked), check_stop=False))
    assert before == "".join(tokens[:unchecked])
    want, want_stop = expected_texts(tokens[unchecked:], stops)
    for i, expected in zip(range(unchecked, len(tokens)), want):
        det.add_token(i)
        assert det.text == before + expected
    assert det.stop_string == want_stop
    rest = det.flush()
    assert det.text == (before + want[-1] if want_stop else "".join(tokens))
    assert rest == "" or want_stop is None


def test_stop_with_multibyte_characters_fed_byte_by_byte():
    text = "café au lait é中! 😀 end"
    det = IncrementalDetokenizer(byte_decode, stop=["é中!", "😀 e"])
    pieces = stream(det, list(text.encode()))
    assert not any("\ufffd" in p for p in pieces)
    assert det.text == "café au lait " and det.stop_string == "é中!"


# --- The real Qwen2 tokenizer (byte-level BPE) ---

QWEN_TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "```python\nprint('héllo, wörld')\n```\n\nDone.",
    "中文分词测试：今天天气很好，我们去公园散步吧。齉龘",
    "Emoji 😀🦀👩‍👩‍👧 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ x² ≤ ∞",
    "mixed   whitespace\t\ttabs\r\n\n\n  trailing   ",
    "Sure!<|im_end|>\n<|im_start|>user\nagain<|im_end|><|endoftext|>",
    "    indented\n\n\n\n        deeper\n\n",
    "مرحبا بالعالم — Привет, мир — こんにちは世界",
    "",
]


@pytest.fixture(scope="module")
def qwen(default_model):
    from llaisys.models.qwen2 import load_tokenizer

    tok = load_tokenizer(default_model)
    return tok, lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", QWEN_TEXTS)
def test_qwen_texts_stream_exactly(qwen, text):
    tok, decode = qwen
    ids = encode(tok, text)
    det = IncrementalDetokenizer(decode)
    pieces = stream(det, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + det.flush() == decode(ids)


@settings(deadline=None)
@given(data=st.data())
def test_qwen_random_ids_stream_exactly(qwen, data):
    """Ids of random text (emoji and rare characters split across tokens) mixed with random ids,
    which include byte fragments that form invalid UTF-8, and special tokens."""
    tok, decode = qwen
    chunks = data.draw(st.lists(st.one_of(texts.map(lambda s: encode(tok, s)),
                                          st.lists(st.integers(0, len(tok) - 1), max_size=4)), max_size=6))
    ids = [i for c in chunks for i in c]
    prompt = encode(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for prompt_ids in ((), prompt):
        det = IncrementalDetokenizer(decode, prompt_ids=prompt_ids)
        pieces = stream(det, ids)
        full = decode(ids)
        assert "".join(pieces) + det.flush() == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["\n\n", "```", "return", "世界", "😀"])
def test_qwen_stop_strings(qwen, stop):
    tok, decode = qwen
    text = "".join(t for t in QWEN_TEXTS if "<|" not in t)
    cut = text.find(stop)
    det = IncrementalDetokenizer(decode, stop=["never there", stop])
    for i in encode(tok, text):
        det.add_token(i)
        assert text[:cut].startswith(det.text)  # no part of the stop string is emitted
        if det.stop_string:
            break
    assert det.text == text[:cut] and det.stop_string == stop


def test_qwen_window_stays_short(qwen):
    tok, decode = qwen
    ids = encode(tok, "".join(QWEN_TEXTS) * 10)
    decode, lengths = recording(decode)
    det = IncrementalDetokenizer(decode)
    stream(det, ids)
    assert len(ids) > 1000 and max(lengths) <= 8
