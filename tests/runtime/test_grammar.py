"""Token masks for response_format and forced tool calls (runtime/grammar.py), on a tiny byte-level
BPE tokenizer. Walks take the argmax of random logits under the mask, leaning more towards tokens
that close strings, arrays and objects as they go so that every walk ends; the oracles are
json.loads and a small JSON-schema check written here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmexport import LLMExportError
from llmexport.runtime.grammar import Grammars
from llmexport.runtime.tokenizer import Tokenizer
from llmexport.runtime.tools import parse_tool_calls
from tests.real_model.conftest import checkpoint  # noqa: F401 (the fixture: Qwen2.5-Coder converted from its GGUF)

EOS_TEXT = "<|endoftext|>"
CORPUS = ['{"name": "Ada", "kind": "a", "count": 12, "price": 3.5, "tags": ["x", "yz"], "ok": true, "note": null}',
          '[{"id": 1, "owner": {"id": 7, "ok": false}}, {"arguments": {"city": "Paris"}}]',
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>']
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["a", "b", "c"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owners": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"], "additionalProperties": False}},
        "note": {"type": ["string", "null"]},
    },
    "required": ["name", "kind", "count", "price", "tags", "owners", "note"],
    "additionalProperties": False,
}
FORMATS = {
    "json_schema": {"type": "json_schema", "json_schema": {"name": "thing", "schema": NESTED, "strict": True}},
    "json_object": {"type": "json_object"},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOS_TEXT]))
    # as in Qwen2.5's tokenizer: the tool-call markers are added tokens that are not special
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return tokenizer._tok.get_vocab_size()


@pytest.fixture(scope="module")
def eos(tokenizer):
    return tokenizer._tok.token_to_id(EOS_TEXT)


@pytest.fixture(scope="module")
def grammars(tokenizer_path, vocab, eos):
    return Grammars(tokenizer_path, vocab, eos_token_ids=[eos])


def walk(matcher, tokenizer, eos, seed, vocab=None, check=None, max_steps=800):
    """Greedy from random logits under the mask until EOS; the decoded text without EOS.
    check(step_tokens, logits) runs on every masked row before the pick."""
    vocab = vocab or matcher._g.vocab_size
    rng = np.random.default_rng(seed)
    closers = np.array([i for i in range(vocab) if any(c in tokenizer.decode([i]) for c in '"}]')] + [eos])
    tokens = []
    for step in range(max_steps):
        logits = rng.standard_normal(vocab).astype(np.float32)
        logits[closers] += 0.05 * step
        matcher.mask_logits(logits)
        if check:
            check(tokens, logits)
        token = int(np.argmax(logits))
        matcher.accept(token)
        if token == eos:
            return tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"walk {seed} did not end in {max_steps} steps: {tokenizer.decode(tokens)!r}")


def conforms(value, schema) -> bool:
    """The JSON-schema keywords these tests use, checked by hand."""
    if "anyOf" in schema:
        return any(conforms(value, s) for s in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
        ok = any((k == "integer" and isinstance(value, int) and not isinstance(value, bool))
                 or (k == "number" and isinstance(value, (int, float)) and not isinstance(value, bool))
                 or (k in python and isinstance(value, python[k])) for k in kinds)
        if not ok:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return False
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        return False
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return False
        return all(conforms(v, schema.get("items", {})) for v in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in properties for k in value):
            return False
        return all(conforms(v, properties.get(k, {})) for k, v in value.items())
    return True


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", FORMATS)
def test_walks_from_random_logits_give_json_valid_against_the_schema(grammars, tokenizer, eos, name, seed):
    text = walk(grammars.matcher(FORMATS[name]), tokenizer, eos, seed)
    value = json.loads(text)
    assert isinstance(value, dict)
    if name == "json_schema":
        assert conforms(value, NESTED), text


@pytest.mark.parametrize("name", FORMATS)
def test_eos_is_allowed_exactly_when_the_json_is_complete(grammars, tokenizer, eos, name):
    matcher = grammars.matcher(FORMATS[name])

    def check(tokens, logits):
        try:
            json.loads(tokenizer.decode(tokens))
            complete = True
        except ValueError:
            complete = False
        assert np.isfinite(logits[eos]) == complete == matcher.eos_allowed

    for seed in range(3):
        walk(matcher, tokenizer, eos, seed, check=check)
        assert matcher.is_finished
        matcher = grammars.matcher(FORMATS[name])


@pytest.mark.parametrize("name", FORMATS)
def test_every_token_the_mask_allows_is_accepted(grammars, tokenizer, eos, name):
    """(Not the converse: where the next bytes are forced, llguidance's mask keeps only the
    canonical token, e.g. 'name' after '{"', while accept() also takes a prefix such as 'n'.)"""
    matcher = grammars.matcher(FORMATS[name])

    def check(tokens, logits):
        for token in np.flatnonzero(np.isfinite(logits)):
            matcher.fork().accept(token)

    walk(matcher, tokenizer, eos, seed=0, check=check)


def test_a_token_that_breaks_the_json_is_refused(grammars, tokenizer):
    matcher = grammars.matcher(FORMATS["json_object"])
    token = tokenizer.encode("n", add_special_tokens=False)[0]
    assert not matcher.allowed()[token]
    with pytest.raises(LLMExportError, match=f"token {token} is not allowed here by the grammar"):
        matcher.accept(token)


def test_padded_vocabulary_rows_are_always_masked(tokenizer_path, tokenizer, vocab, eos):
    padded = Grammars(tokenizer_path, vocab + 13, eos_token_ids=[eos])
    matcher = padded.matcher(FORMATS["json_schema"])
    walk(matcher, tokenizer, eos, seed=1, vocab=vocab + 13,
         check=lambda tokens, logits: np.testing.assert_array_equal(logits[vocab:], -np.inf))
    with pytest.raises(LLMExportError, match=f"token {vocab + 5} is not allowed"):
        padded.matcher(FORMATS["json_object"]).accept(vocab + 5)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}, "JSON schema cannot be used"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such"},
                                             "strict": True}}, "Unknown format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}}, "needs"),
    ({"type": "xml"}, "type 'xml' is not supported"),
    ("json_object", "type None is not supported"),
])
def test_a_bad_response_format_is_a_one_line_error(grammars, response_format, message):
    with pytest.raises(LLMExportError, match=message) as raised:
        grammars.matcher(response_format)
    assert "\n" not in str(raised.value)


def test_a_keyword_llguidance_lacks_is_ignored_unless_strict(grammars, tokenizer, eos):
    schema = {"type": "object", "properties": {"id": {"type": "string", "format": "no-such"}}, "required": ["id"]}
    matcher = grammars.matcher({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert isinstance(json.loads(walk(matcher, tokenizer, eos, seed=0))["id"], str)


def test_text_format_needs_no_matcher(grammars):
    assert grammars.matcher({"type": "text"}) is None


def test_each_matcher_from_a_cached_grammar_starts_at_the_beginning(grammars, tokenizer, eos):
    first = grammars.matcher(FORMATS["json_object"])
    walk(first, tokenizer, eos, seed=2)
    second = grammars.matcher(FORMATS["json_object"])
    assert not second.eos_allowed and not second.is_finished
    assert json.loads(walk(second, tokenizer, eos, seed=3)) is not None


def test_a_fork_goes_on_independently(grammars, tokenizer, eos):
    matcher = grammars.matcher(FORMATS["json_schema"])
    for token in tokenizer.encode('{"name": "Ad', add_special_tokens=False):
        matcher.accept(token)
    fork = matcher.fork()
    a, b = walk(matcher, tokenizer, eos, seed=4), walk(fork, tokenizer, eos, seed=5)
    assert a != b
    assert conforms(json.loads('{"name": "Ad' + a), NESTED) and conforms(json.loads('{"name": "Ad' + b), NESTED)


def test_mask_rows_masks_each_row_as_its_matcher_does(grammars, tokenizer, vocab):
    matchers = [grammars.matcher(FORMATS["json_schema"]), None, grammars.matcher(FORMATS["json_object"])]
    for token in tokenizer.encode('{"name": "x"', add_special_tokens=False):
        matchers[0].accept(token)
    logits = np.random.default_rng(0).standard_normal((3, vocab)).astype(np.float32)
    expected = logits.copy()
    matchers[0].mask_logits(expected[0])
    matchers[2].mask_logits(expected[2])
    grammars.mask_rows(matchers, logits)
    np.testing.assert_array_equal(logits, expected)
    assert np.isfinite(logits[1]).all()


def test_mask_rows_needs_a_matcher_per_row(grammars, vocab):
    matcher = grammars.matcher(FORMATS["json_object"])
    with pytest.raises(LLMExportError, match="one matcher for two rows"):
        grammars.mask_rows([matcher, matcher], np.zeros((2, vocab), dtype=np.float32))


def test_logits_shorter_than_the_tokenizer_are_masked_over_their_length(tokenizer_path, tokenizer, vocab, eos):
    """Added tokens past the model's rows (the two tool-call markers here) can never be sampled."""
    short = Grammars(tokenizer_path, vocab - 2, eos_token_ids=[eos])
    assert json.loads(walk(short.matcher(FORMATS["json_object"]), tokenizer, eos, seed=0)) is not None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", [None, "add"])
def test_a_forced_tool_call_is_markup_that_parse_tool_calls_reads(grammars, tokenizer, eos, name, seed):
    text = walk(grammars.tool_call_matcher(TOOLS, name=name), tokenizer, eos, seed)
    content, calls = parse_tool_calls(text)
    assert content is None and calls, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call["function"]["name"] == (name or call["function"]["name"])
        assert conforms(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_the_markers_are_the_tokenizers_added_tokens(grammars, tokenizer):
    """The model writes <tool_call> as its one token; spelling it in pieces is refused."""
    matcher = grammars.tool_call_matcher(TOOLS, name="add", parallel=False)
    marker = tokenizer._tok.token_to_id("<tool_call>")
    assert np.flatnonzero(matcher.allowed()).tolist() == [marker]
    matcher.accept(marker)


def test_without_parallel_calls_one_block_ends_the_output(grammars, tokenizer, eos):
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    matcher = grammars.tool_call_matcher(TOOLS, parallel=False)
    for token in tokenizer.encode(text, add_special_tokens=False):
        matcher.accept(token)
    assert np.flatnonzero(matcher.allowed()).tolist() == [eos]


def test_tool_choice_naming_an_unknown_function_is_an_error(grammars):
    with pytest.raises(LLMExportError, match="'nope', which is not in tools"):
        grammars.tool_call_matcher(TOOLS, name="nope")


@pytest.fixture(scope="class")
def qwen(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = Tokenizer(checkpoint / "tokenizer.json")
    eos = tokenizer._tok.token_to_id("<|im_end|>")
    return Grammars(tokenizer, config["vocab_size"], eos_token_ids=[eos]), tokenizer, eos


@pytest.mark.slow
class TestQwenTokenizer:
    """Qwen2.5-Coder's tokenizer at its 151,936-row vocabulary, <|im_end|> as EOS and <tool_call>
    as one added token (id 151657)."""

    flag = "qwen-coder"  # for the checkpoint fixture

    def test_a_written_document_is_accepted_and_eos_comes_only_at_its_end(self, qwen):
        grammars, tokenizer, eos = qwen
        text = json.dumps({"name": "Ada", "kind": "b", "count": 3, "price": 9.5, "tags": ["x"],
                           "owners": [{"id": 1, "ok": True}], "note": None}, indent=2)
        matcher = grammars.matcher(FORMATS["json_schema"])
        for token in tokenizer.encode(text, add_special_tokens=False):
            assert not matcher.eos_allowed
            matcher.accept(token)
        assert np.flatnonzero(matcher.allowed()).tolist() == [eos]

    def test_a_forced_call_starts_with_qwens_tool_call_token_and_parses(self, qwen):
        grammars, tokenizer, eos = qwen
        matcher = grammars.tool_call_matcher(TOOLS, name="get_weather", parallel=False)
        assert np.flatnonzero(matcher.allowed()).tolist() == [tokenizer._tok.token_to_id("<tool_call>")]
        assert parse_tool_calls(walk(matcher, tokenizer, eos, seed=0))[1][0]["function"]["name"] == "get_weather"
