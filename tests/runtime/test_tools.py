"""Tool calls in the Qwen2.5 / Hermes markup (runtime/tools.py): OpenAI's tools list checked, a
generated text split into content and OpenAI tool_calls, and the schema of one forced call."""

from __future__ import annotations

import json
import re

import pytest

from llmexport import LLMExportError
from llmexport.runtime.tools import call_schema, check_tools, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}


def block(inside: str) -> str:
    return f"<tool_call>\n{inside}\n</tool_call>"


def test_a_call_becomes_an_openai_tool_call_with_arguments_as_a_json_string():
    content, calls = parse_tool_calls(block('{"name": "get_weather", "arguments": {"city": "Paris, ☀"}}'))
    assert content is None
    assert len(calls) == 1 and calls[0]["type"] == "function"
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris, ☀"}'}


def test_parallel_calls_come_in_order_with_distinct_ids():
    weather = block('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    text = block('{"name": "now", "arguments": {}}') + "\n" + weather
    _, calls = parse_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["now", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[0]["id"] != calls[1]["id"]


def test_text_outside_the_markup_is_the_content():
    content, calls = parse_tool_calls("Let me look.\n" + block('{"name": "now", "arguments": {}}') + "\n")
    assert content == "Let me look." and len(calls) == 1


def test_a_reply_without_markup_is_all_content_as_written():
    assert parse_tool_calls("  Paris is sunny.\n") == ("  Paris is sunny.\n", [])
    assert parse_tool_calls(" \n ") == (None, [])


@pytest.mark.parametrize("inside", [
    '{"name": "get_weather", "arguments": {"city": "Par',  # cut off
    "not json at all",
    '["get_weather"]',
    '{"arguments": {"city": "Oslo"}}',  # no name
    '{"name": "get_weather", "arguments": [1, 2]}',
])
def test_a_malformed_block_stays_in_the_content(inside):
    text = "Calling.\n" + block(inside)
    assert parse_tool_calls(text) == (text, [])


def test_a_malformed_block_beside_a_good_one_stays_in_the_content():
    bad = block("{oops}")
    content, calls = parse_tool_calls(bad + "\n" + block('{"name": "now", "arguments": {}}'))
    assert content == bad and [c["function"]["name"] for c in calls] == ["now"]


def test_an_unclosed_block_stays_in_the_content():
    text = '<tool_call>\n{"name": "now", "arguments": {}}'
    assert parse_tool_calls(text) == (text, [])


def test_arguments_written_as_a_json_string_or_left_out_are_accepted():
    _, calls = parse_tool_calls(block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')
                                + block('{"name": "now"}'))
    assert [c["function"]["arguments"] for c in calls] == ['{"city": "Rome"}', "{}"]


def test_the_schema_of_a_named_call_fixes_the_name_and_takes_the_parameters():
    schema = call_schema([WEATHER, NOW], name="get_weather")
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert schema["required"] == ["name", "arguments"] and schema["additionalProperties"] is False


def test_the_schema_of_a_required_call_is_any_of_the_tools():
    schema = call_schema([WEATHER, NOW])
    assert [v["properties"]["name"]["const"] for v in schema["anyOf"]] == ["get_weather", "now"]
    assert schema["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any object


@pytest.mark.parametrize("tools, message", [
    ([], "non-empty list"),
    ("get_weather", "non-empty list"),
    ([{"type": "code_interpreter"}], r"tools\[0\] must be"),
    ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\].function needs a 'name'"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "must be a JSON schema object"),
    ([NOW, NOW], "'now' is given twice"),
])
def test_a_bad_tools_list_is_a_clear_error(tools, message):
    with pytest.raises(LLMExportError, match=message):
        check_tools(tools)


def test_tool_choice_must_name_a_given_function():
    with pytest.raises(LLMExportError, match="'get_time', which is not in tools"):
        call_schema([WEATHER, NOW], name="get_time")


def test_a_reply_that_is_only_a_call_as_json_naming_an_offered_tool_is_a_call():
    """Models not trained on the markup (Qwen2.5-Coder) answer with the call's JSON alone."""
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    for text in (bare, f"```json\n{bare}\n```", f"  {bare}\n"):
        content, calls = parse_tool_calls(text, ["get_weather"])
        assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    two = f"[{bare}, {bare}]"
    assert len(parse_tool_calls(two, ["get_weather"])[1]) == 2
    for text, names in ((bare, ["other"]), (bare, []), (f"Here it is: {bare}", ["get_weather"]),
                        ('{"name": "get_weather"}x', ["get_weather"])):
        assert parse_tool_calls(text, names) == (text, [])  # not offered, no tools, prose around it, not JSON
