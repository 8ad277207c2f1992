"""The `openai` package driving every field the server added, as a user writes the calls: on the
tiny bundle where any model will do (n, logprobs and top_logprobs streamed and not, echo scoring of
token-id prompts as lm-evaluation-harness sends it, penalties, logit_bias, stream_options), on
SmolLM2-135M-Instruct for JSON (json_object, json_schema through `chat.completions.parse`, 20
answers to a nested schema that must validate) and on Qwen2.5-Coder-0.5B-Instruct for tools."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from tests.clients.conftest import MAX_BATCH, log_softmax  # noqa: E402
from tests.runtime.test_serve import _words, bundle  # noqa: E402,F401  (bundle: the tiny model)
from tests.runtime.test_serve import server as tiny  # noqa: E402,F401  (the tiny model served)

EXTRA = {"ignore_eos": True}  # the tiny model's greedy tokens may be its EOS



@pytest.fixture(scope="module")
def reference(bundle):  # noqa: F811
    with log_softmax(bundle) as log_probs:
        yield log_probs


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=300)


# --- the tiny bundle: fields any model can answer ---------------------------------------------

def test_n_streamed_gives_the_choices_n_gives_unstreamed(tiny):
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    ask = dict(model="tiny", messages=messages, max_tokens=6, temperature=1.0, seed=7, n=3, extra_body=EXTRA)
    whole = tiny.client.chat.completions.create(**ask)
    streamed = ["", "", ""]
    for chunk in tiny.client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert streamed == [c.message.content for c in whole.choices]
    assert len({c.message.content for c in whole.choices}) > 1  # three seeds, not one answer thrice


def test_chat_logprobs_streamed_equal_unstreamed_and_the_models_log_softmax(tiny, reference):
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    ask = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
               extra_body=EXTRA)
    whole = tiny.client.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [entry for chunk in tiny.client.chat.completions.create(**ask, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    # the second request reuses the first's cached prompt: equal up to float32 rounding
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    prompt = tiny.session.render_chat(messages)
    tokens = [int(e.token[1:]) for e in whole]  # "w17" -> 17
    want = reference(prompt + tokens)
    for j, entry in enumerate(whole):
        row = want[len(prompt) + j - 1]
        assert entry.logprob == pytest.approx(row[tokens[j]], abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [f"w{t}" for t in np.argsort(-row)[:3]]


def test_completion_logprobs_streamed_equal_unstreamed(tiny):
    ask = dict(model="tiny", prompt="w5 w6 w7", max_tokens=6, temperature=0, logprobs=2, extra_body=EXTRA)
    whole = tiny.client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in tiny.client.completions.create(**ask, stream=True)]
    joined = {key: [x for c in chunks for x in getattr(c.logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs")}
    expected = whole.logprobs.model_dump()
    # text_offset is left out: both add up token texts, which this word-level tokenizer's decoder
    # joins with spaces, so the streamed offsets (counted from the chunks' text) differ here
    assert joined["tokens"] == expected["tokens"]
    assert joined["token_logprobs"] == pytest.approx(expected["token_logprobs"], abs=1e-5)
    for got, want in zip(joined["top_logprobs"], expected["top_logprobs"], strict=True):
        assert got == pytest.approx(want, abs=1e-5)  # the same tokens (keys), rounding apart
    assert "".join(c.text for c in chunks) == whole.text
    assert all(len(top) == 2 and max(top.values()) >= lp for top, lp in zip(joined["top_logprobs"],
                                                                          joined["token_logprobs"]))


def test_echo_scores_token_id_prompts_as_lm_eval_reads_them(tiny, reference):
    """lm-eval's log-likelihood request: prompts as token-id lists, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] and calls a continuation greedy when each of its tokens is
    its position's top entry."""
    contexts, continuations = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13]]
    prompts = [c + d for c, d in zip(contexts, continuations)]
    for max_tokens, drop in ((1, -1), (0, None)):  # 0: score only, nothing generated
        scored = tiny.client.completions.create(model="tiny", prompt=prompts, max_tokens=max_tokens, echo=True,
                                                logprobs=1, temperature=0, seed=1234)
        for choice, ids, context in zip(sorted(scored.choices, key=lambda c: c.index), prompts, contexts):
            lp, want = choice.logprobs, reference(ids)
            assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
            logprob = sum(lp.token_logprobs[len(context):drop])
            assert logprob == pytest.approx(sum(want[j - 1, ids[j]] for j in range(len(context), len(ids))),
                                            abs=1e-4)
            greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(context):drop],
                                                                  lp.top_logprobs[len(context):drop]))
            assert greedy == all(int(np.argmax(want[j - 1])) == ids[j] for j in range(len(context), len(ids)))


def test_penalties_and_logit_bias_follow_openais_definition(tiny, reference):
    """Greedy with penalties is the argmax of the logits (their log softmax: the same argmax)
    plus the bias, less presence_penalty once and frequency_penalty per earlier generated copy."""
    prompt, bias, presence, frequency = [5, 6, 7], {40: 3.0, 41: -100.0}, 0.5, 1.5

    def oracle(presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
        out: list[int] = []
        for _ in range(8):
            row = reference(prompt + out)[-1].copy()
            for token, value in bias.items():
                row[token] += value
            counts = np.bincount(np.array(out, dtype=np.int64), minlength=row.shape[0])
            row -= frequency * counts + presence * (counts > 0)
            out.append(int(np.argmax(row)))
        return out

    answer = tiny.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                            presence_penalty=presence, frequency_penalty=frequency,
                                            logit_bias={str(t): v for t, v in bias.items()}, extra_body=EXTRA)
    want = oracle(presence, frequency, bias)
    assert want != oracle(0.0, 0.0, {})  # the fields change the answer here
    assert answer.choices[0].text == _words(want)


def test_stream_options_include_usage_counts_every_streamed_token(tiny):
    chunks = list(tiny.client.completions.create(model="tiny", prompt=["w5 w6", "w7 w8 w9"], max_tokens=4, n=2,
                                                 temperature=0.5, seed=3, stream=True, logprobs=0,
                                                 stream_options={"include_usage": True}, extra_body=EXTRA))
    *tokens, last = chunks
    assert last.choices == [] and all(c.usage is None for c in tokens)
    assert sorted({c.choices[0].index for c in tokens}) == [0, 1, 2, 3]  # two prompts, n=2 each
    assert last.usage.completion_tokens == sum(len(c.choices[0].logprobs.tokens) for c in tokens) == 16
    assert last.usage.prompt_tokens == 5 and last.usage.total_tokens == 21


def test_a_field_the_server_does_not_implement_is_a_400_the_client_raises(tiny):
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        tiny.client.completions.create(model="tiny", prompt="w5", suffix="w6", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        tiny.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                            max_tokens=2, top_logprobs=2)


# --- SmolLM2: JSON ------------------------------------------------------------------------------

STORY = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "genre": {"type": "string", "enum": ["fantasy", "mystery", "science fiction", "romance"]},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "characters": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "role": {"type": "string", "enum": ["hero", "villain", "sidekick"]}},
            "required": ["name", "age", "role"], "additionalProperties": False}},
    },
    "required": ["title", "genre", "rating", "characters"],
    "additionalProperties": False,
}
PERSON = "Reply with a JSON object with the keys name and age of a person."
TOPICS = ["a dragon", "a detective", "a spaceship", "two lovers", "a haunted house"]


@pytest.mark.slow
def test_json_object_answers_parse(smollm2):
    reply = _client(smollm2).chat.completions.create(
        model=smollm2.name, messages=[{"role": "user", "content": PERSON}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


@pytest.mark.slow
def test_parse_with_a_pydantic_model_gives_its_instance(smollm2):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str
        country: str
        population: int = Field(ge=0, le=100_000_000)

    reply = _client(smollm2).chat.completions.parse(
        model=smollm2.name, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=100, temperature=0)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name


@pytest.mark.slow
def test_twenty_answers_to_a_nested_schema_all_validate(smollm2):
    jsonschema = pytest.importorskip("jsonschema")
    client = _client(smollm2)

    def ask(i: int):
        return client.chat.completions.create(
            model=smollm2.name, temperature=0.8, seed=i, max_tokens=300,
            messages=[{"role": "user", "content": f"Invent a story about {TOPICS[i % 5]} and describe it as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "story", "strict": True,
                                                                    "schema": STORY}}).choices[0]

    with ThreadPoolExecutor(MAX_BATCH) as pool:  # a full batch at a time: the engine batches them
        choices = list(pool.map(ask, range(20)))
    stories = [json.loads(c.message.content) for c in choices]
    for story in stories:
        jsonschema.validate(story, STORY)
    assert all(c.finish_reason == "stop" for c in choices)
    assert len({json.dumps(s, sort_keys=True) for s in stories}) > 10  # sampled, not one answer twenty times


# --- Qwen2.5-Coder: tools -----------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
PARIS = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.mark.slow
def test_a_forced_tool_call_parses_into_tool_calls_streamed_or_not(qwen_coder):
    client = _client(qwen_coder)
    ask = dict(model=qwen_coder.name, messages=PARIS, tools=[WEATHER, ADD], max_tokens=100, temperature=0,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"

    deltas = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True)]
    streamed = [t for d in deltas for t in d.delta.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == \
        [(0, "get_weather", json.loads(call.function.arguments))]
    assert deltas[-1].finish_reason == "tool_calls"


@pytest.mark.slow
def test_required_without_parallel_calls_gives_exactly_one_call(qwen_coder):
    reply = _client(qwen_coder).chat.completions.create(
        model=qwen_coder.name, messages=[{"role": "user", "content": "What is 17 plus 25?"}], tools=[WEATHER, ADD],
        tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 17, "b": 25}


@pytest.mark.slow
def test_tool_choice_none_renders_no_tools_and_parses_no_calls(qwen_coder):
    reply = _client(qwen_coder).chat.completions.create(
        model=qwen_coder.name, messages=PARIS, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason in ("stop", "length")
