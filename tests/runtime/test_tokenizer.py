"""Streaming detokenisation with a byte-level BPE, where one character can span tokens."""

from __future__ import annotations

import pytest

from llmexport.runtime.tokenizer import TextStream, Tokenizer

TEXT = "héllo wörld, 日本語のテキスト and emoji 🙂🚀 done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer(path)


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # unseen characters fall back to several byte tokens each
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were held back mid-character


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    stream = TextStream(tokenizer, stop=("テキスト",))
    streamed = ""
    for i in tokenizer.encode(TEXT):
        streamed += stream.push(i)
        if stream.stopped:
            break
    assert stream.stopped and streamed == "héllo wörld, 日本語の" == stream.text


def test_streamed_text_equals_a_decode_of_the_whole_sequence(tokenizer):
    """Random id sequences (byte tokens that split characters, merges, spaces): the deltas add up
    to decoding everything at once."""
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, 300, size=int(rng.integers(1, 60))).tolist()
        stream = TextStream(tokenizer)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tokenizer.decode(ids).rstrip("\ufffd") == stream.text


def test_streaming_decodes_a_short_window_per_token(tokenizer):
    """O(1) per token: each push decodes a few ids, not the whole sequence (was O(n^2) overall)."""
    ids = tokenizer.encode(TEXT * 200)
    widest = []
    decode = tokenizer.decode

    def recording(window):
        widest.append(len(window))
        return decode(window)

    tokenizer.decode = recording
    try:
        stream = TextStream(tokenizer, stop=("never there",))
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    finally:
        del tokenizer.decode
    assert streamed == TEXT * 200
    assert len(ids) > 2000 and max(widest) <= 8
