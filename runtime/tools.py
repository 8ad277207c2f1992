"""Tool calls in the Hermes / Qwen2.5 markup, for OpenAI's `tools` and `tool_choice`.

Qwen2.5's chat template lists the tools in the system prompt and asks for one block per call:

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

`parse_tool_calls` turns a generated text into OpenAI's (content, tool_calls); `call_schema` is
the JSON schema of the object inside one block, which grammar.py wraps in the markup to force a
call (tool_choice "required", or one named function).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence

from llmexport import LLMExportError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
Tool = Mapping[str, object]  # {"type": "function", "function": {"name", "description", "parameters"}}


def check_tools(tools: Sequence[Tool]) -> list[str]:
    """The function names of OpenAI's `tools` list, after checking its shape."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence) or not tools:
        raise LLMExportError('tools must be a non-empty list like [{"type": "function", "function": {"name": "f"}}]')
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise LLMExportError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise LLMExportError(f"tools[{i}].function needs a 'name' string")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise LLMExportError(f"tools[{i}].function.parameters must be a JSON schema object")
        if name in names:
            raise LLMExportError(f"tools[{i}]: the function name {name!r} is given twice")
        names.append(name)
    return names


def call_schema(tools: Sequence[Tool], name: str | None = None) -> dict:
    """The JSON schema of the object inside one <tool_call> block: a call to the function `name`
    (tool_choice {"type": "function", "function": {"name": ...}}), or to any of `tools`
    (tool_choice "required") when name is None."""
    names = check_tools(tools)
    if name is not None and name not in names:
        raise LLMExportError(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})")
    variants = []
    for tool in tools:
        function = tool["function"]
        if name is None or function["name"] == name:
            parameters = dict(function.get("parameters") or {"type": "object"})
            variants.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                               "arguments": parameters},
                             "required": ["name", "arguments"], "additionalProperties": False})
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def parse_tool_calls(text: str, names: Sequence[str] = ()) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated text: each well-formed <tool_call> block becomes
    {"id": "call_<hex>", "type": "function", "function": {"name", "arguments": "<JSON string>"}};
    the text outside them is the content (None when only whitespace is left). A block whose
    inside is not {"name": str, "arguments": object} stays in the content, as written.

    Without markup, a reply that is nothing but such a JSON object (or a list of them), bare or
    in a ```json fence, naming one of the offered tools (`names`), is a call too: models that
    were not trained on the markup answer so (Qwen2.5-Coder does; vLLM and ollama report the
    same). Any other text around it keeps it content."""
    calls, outside, end = [], [], 0
    for block in _BLOCK.finditer(text):
        call = _call(block.group(1))
        if call is None:
            continue
        outside.append(text[end:block.start()])
        end = block.end()
        calls.append(call)
    if not calls:
        bare = _bare_calls(text, names)
        if bare:
            return None, bare
        return (text if text.strip() else None), []
    outside.append(text[end:])
    content = "".join(outside).strip()
    return (content or None), calls


def _bare_calls(text: str, names: Sequence[str]) -> list[dict]:
    """The calls of a reply that is only {"name", "arguments"} JSON naming offered tools."""
    body = text.strip()
    fence = _FENCE.fullmatch(body)
    if fence:
        body = fence.group(1).strip()
    if not names or not body.startswith(("{", "[")):
        return []
    try:
        value = json.loads(body)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_call(json.dumps(item)) if isinstance(item, dict) and item.get("name") in names else None
             for item in items]
    return calls if calls and all(calls) else []


def _call(inside: str) -> dict | None:
    try:
        value = json.loads(inside)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
