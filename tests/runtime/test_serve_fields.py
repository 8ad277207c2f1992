"""The OpenAI fields beyond one greedy answer, driven by the real `openai` client: n, logprobs and
top_logprobs (chat and completions, streamed too), echo with prompt log-probabilities, lists of
token-id prompts (lm-evaluation-harness's request), penalties, logit_bias, cached prompt tokens,
unknown routes."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from llmexport.runtime.sampling import SamplingParams  # noqa: E402
from llmexport.runtime.session import Session  # noqa: E402
from tests.runtime.test_serve import _words, bundle, server  # noqa: E402,F401  (fixtures: the tiny model served)

EXTRA = {"ignore_eos": True}


@pytest.fixture(scope="module")
def reference(bundle):  # noqa: F811
    """log softmax of the model's logits at every position of a sequence, from its own session."""
    session = Session(bundle, threads=2)

    def log_probs(ids: list[int]) -> np.ndarray:
        n = len(ids)
        logits = session.backend.step("prefill", np.array([ids]), np.arange(n)[None], np.array([n]), range(1),
                                      logits_at=np.arange(n)[None])[0].astype(np.float64)
        return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)

    yield log_probs
    session.close()


def test_n_choices_equal_requests_seeded_one_apart_and_the_prompt_is_computed_once(server):
    client, engine = server.client, server.session.engine
    prompt = list(range(5, 25))
    before = dict(engine.stats)
    many = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=3,
                                     extra_body=EXTRA)
    computed = (engine.stats["prompt_tokens"] - before["prompt_tokens"]) - (
        engine.stats["reused_prompt_tokens"] - before["reused_prompt_tokens"])
    singles = [client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=11 + j,
                                         extra_body=EXTRA).choices[0].text for j in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == singles
    assert computed <= len(prompt) + 2  # once, plus at most the last token of each copy
    assert many.usage.prompt_tokens == len(prompt) and many.usage.completion_tokens == 18


def test_chat_logprobs_are_the_log_softmax_of_the_models_logits(server, reference):
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=3, extra_body=EXTRA)
    content = reply.choices[0].logprobs.content
    prompt = server.session.render_chat(messages)
    generated = [int(c.token[1:]) for c in content]  # "w17" -> 17
    want = reference(prompt + generated)
    for j, entry in enumerate(content):
        row = want[len(prompt) + j - 1]
        assert entry.logprob == pytest.approx(row[generated[j]], abs=1e-4)
        top = np.argsort(-row, kind="stable")[:3]
        assert [t.token for t in entry.top_logprobs] == [f"w{t}" for t in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[top].tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    streamed = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                     logprobs=True, top_logprobs=3, stream=True, extra_body=EXTRA)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]  # (the prompt now comes from the cache:
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-4)  # float noise)


def test_echo_returns_the_prompts_log_probabilities_for_lm_eval(server, reference):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # a list of token-id lists: lm-evaluation-harness's request
    scored = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0)
    assert [c.index for c in scored.choices] == [0, 1]
    for prompt, choice in zip(prompts, scored.choices):
        want = reference(prompt)
        lp = choice.logprobs
        assert choice.text == _words(prompt) and lp.tokens == [f"w{t}" for t in prompt]
        assert lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([want[i, prompt[i + 1]] for i in range(len(prompt) - 1)],
                                                      abs=1e-4)
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert scored.usage.completion_tokens == 0
    generated = server.client.completions.create(model="tiny", prompt=prompts[0], max_tokens=3, echo=True,
                                                 logprobs=2, temperature=0, extra_body=EXTRA)
    lp = generated.choices[0].logprobs
    assert len(lp.tokens) == len(prompts[0]) + 3 and generated.choices[0].text.startswith(_words(prompts[0]))
    tokens = prompts[0] + [int(t[1:]) for t in lp.tokens[len(prompts[0]):]]
    want = reference(tokens)
    assert lp.token_logprobs[1:] == pytest.approx([want[i, tokens[i + 1]] for i in range(len(tokens) - 1)], abs=1e-4)


def test_logit_bias_and_penalties_steer_greedy_choices(server):
    client = server.client
    biased = client.completions.create(model="tiny", prompt=[5, 6], max_tokens=4, temperature=0,
                                       logit_bias={"77": 100}, extra_body=EXTRA)
    assert biased.choices[0].text == "w77 w77 w77 w77"
    penalised = client.completions.create(model="tiny", prompt=[5, 6], max_tokens=4, temperature=0,
                                          logit_bias={"77": 5}, frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body=EXTRA)
    with Session(server.session.bundle.path) as session:
        want = session.generate([[5, 6]], SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias=((77, 5.0),),
                                                         frequency_penalty=2.0, presence_penalty=2.0))
    assert penalised.choices[0].text == _words(want.token_ids[0])


def test_a_repeated_conversation_reports_its_cached_prompt_tokens(server):
    messages = [{"role": "system", "content": " ".join(f"w{i}" for i in range(30, 50))},
                {"role": "user", "content": "w5 w6"}]
    first = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                                  extra_body=EXTRA)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "w7"}]
    second = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                                   extra_body=EXTRA)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    text = httpx.get(server.url + "/metrics").text
    assert 'llmexport_prompt_tokens_total{source="reused"}' in text


def test_unknown_routes_get_openais_error_shape(server):
    answer = httpx.post(server.url + "/v1/embeddings", json={"input": "w5"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unknown_url" and "/v1/embeddings" in answer.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405
