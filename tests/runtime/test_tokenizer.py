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
