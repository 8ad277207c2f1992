"""LangChain's ChatOpenAI against `llmexport serve`, as its docs show it for an OpenAI-compatible
server (base_url, any api_key, the served model's name): invoke, stream and batch give the
model's greedy replies, n, logprobs and streamed usage on the tiny bundle; structured output on
SmolLM2-135M-Instruct; bind_tools on Qwen2.5-Coder-0.5B-Instruct."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")

from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from llmexport.runtime.sampling import SamplingParams  # noqa: E402
from llmexport.runtime.session import Session  # noqa: E402
from tests.runtime.test_serve import bundle  # noqa: E402,F401  (bundle: the tiny model)
from tests.runtime.test_serve import server as tiny  # noqa: E402,F401  (the tiny model served)

EXTRA = {"ignore_eos": True}  # the tiny model's greedy tokens may be its EOS
QUESTIONS = ["w40 w41 w42", "w50 w51", "w60"]


def chat_model(url: str, model: str, **kwargs) -> langchain_openai.ChatOpenAI:
    return langchain_openai.ChatOpenAI(base_url=url, api_key="unused", model=model, max_retries=0, timeout=300,
                                       **kwargs)



@pytest.fixture(scope="module")
def greedy(bundle):  # noqa: F811
    """The tiny model's greedy reply (6 tokens) to one user message, from a session of its own."""
    with Session(bundle, threads=2) as session:
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        yield lambda text: session.chat([{"role": "user", "content": text}], params).text[0]


def test_invoke_stream_and_batch_give_the_models_greedy_reply(tiny, greedy):
    llm = chat_model(tiny.url + "/v1", "tiny", temperature=0, max_tokens=6, extra_body=EXTRA)
    want = [greedy(q) for q in QUESTIONS]
    reply = llm.invoke(QUESTIONS[0])
    assert reply.content == want[0] and reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata["output_tokens"] == 6
    chunks = list(llm.stream(QUESTIONS[0]))
    assert len(chunks) > 6 and "".join(c.content for c in chunks) == want[0]
    assert [m.content for m in llm.batch(QUESTIONS)] == want


def test_n_gives_one_generation_per_seed(tiny):
    ask = [[HumanMessage(QUESTIONS[0])]]
    many = chat_model(tiny.url + "/v1", "tiny", temperature=1.0, max_tokens=6, n=2, seed=5, extra_body=EXTRA)
    texts = [g.text for g in many.generate(ask).generations[0]]
    singles = [chat_model(tiny.url + "/v1", "tiny", temperature=1.0, max_tokens=6, seed=seed,
                          extra_body=EXTRA).invoke(QUESTIONS[0]).content for seed in (5, 6)]
    assert texts == singles and texts[0] != texts[1]


def test_logprobs_in_invoke_come_back_in_the_response_metadata(tiny):
    llm = chat_model(tiny.url + "/v1", "tiny", temperature=0, max_tokens=6, extra_body=EXTRA)
    reply = llm.invoke(QUESTIONS[0], logprobs=True, top_logprobs=2)
    content = reply.response_metadata["logprobs"]["content"]
    assert [e["token"] for e in content] == reply.content.split()
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy: the most likely token


def test_stream_usage_reports_the_streamed_tokens(tiny):
    llm = chat_model(tiny.url + "/v1", "tiny", temperature=0, max_tokens=6, stream_usage=True, extra_body=EXTRA)
    chunks = list(llm.stream(QUESTIONS[1]))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata["output_tokens"] == 6 and total.usage_metadata["input_tokens"] > 0


# --- SmolLM2: structured output -----------------------------------------------------------------

class City(BaseModel):
    """A city and where it is."""
    name: str
    country: str
    population: int = Field(ge=0, le=100_000_000)  # bounded: a small model may write digits forever


@pytest.mark.slow
def test_with_structured_output_json_schema_gives_the_pydantic_model(smollm2):
    llm = chat_model(smollm2.url, smollm2.name, temperature=0, max_tokens=100)
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe Paris as JSON.")
    assert isinstance(city, City) and city.name
    raw = llm.with_structured_output(City, method="json_schema", include_raw=True).invoke("Describe Rome as JSON.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], City)
    assert City.model_validate_json(raw["raw"].content) == raw["parsed"]


@pytest.mark.slow
def test_with_structured_output_json_mode_gives_a_dict(smollm2):
    llm = chat_model(smollm2.url, smollm2.name, temperature=0, max_tokens=200)
    answer = llm.with_structured_output(method="json_mode").invoke(
        "Reply with a JSON object with the keys name and age of a person.")
    assert isinstance(answer, dict)


# --- Qwen2.5-Coder: tools -----------------------------------------------------------------------

@tool
def get_weather(city: str) -> str:
    """Get the current weather in a given city."""
    return f"18 degrees celsius and sunny in {city}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.slow
def test_bind_tools_with_a_forced_tool_gives_tool_calls_invoked_or_streamed(qwen_coder):
    llm = chat_model(qwen_coder.url, qwen_coder.name, temperature=0, max_tokens=100)
    forced = llm.bind_tools([get_weather, add], tool_choice="get_weather")
    reply = forced.invoke("What is the weather like in Paris?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert reply.response_metadata["finish_reason"] == "tool_calls" and reply.tool_calls[0]["id"].startswith("call_")
    assert get_weather.invoke(reply.tool_calls[0]["args"]) == "18 degrees celsius and sunny in Paris"

    chunks = list(forced.stream("What is the weather like in Oslo?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [("get_weather", {"city": "Oslo"})]


@pytest.mark.slow
def test_bind_tools_with_any_and_no_parallel_calls_gives_one_call(qwen_coder):
    llm = chat_model(qwen_coder.url, qwen_coder.name, temperature=0, max_tokens=100)
    reply = llm.bind_tools([get_weather, add], tool_choice="any", parallel_tool_calls=False).invoke(
        "What is 17 plus 25?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("add", {"a": 17, "b": 25})]
    assert add.invoke(reply.tool_calls[0]["args"]) == 42


@pytest.mark.slow
def test_bind_tools_with_auto_leaves_the_reply_to_the_model(qwen_coder):
    """tool_choice auto constrains nothing: the tools reach the model through its chat template and
    the reply is parsed for <tool_call> markup. Qwen2.5-Coder-0.5B writes its call as a bare JSON
    object instead (the coder models were not trained on the markup: ollama/ollama#12174,
    vllm-project/vllm#32926); a reply that is only such an object naming an offered tool is a
    call too (runtime/tools.py)."""
    llm = chat_model(qwen_coder.url, qwen_coder.name, temperature=0, max_tokens=100)
    reply = llm.bind_tools([get_weather, add]).invoke("What is the weather like in Paris?")
    assert reply.response_metadata["finish_reason"] == "tool_calls" and not reply.content
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
