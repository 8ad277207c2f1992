"""Chat templates: render a conversation into prompt text exactly as transformers'
`apply_chat_template(messages, add_generation_prompt=True)` does, without transformers.

The environment is the one transformers builds (Jinja2's ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loop controls; `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML; the named special tokens as variables). The rendered text is then
tokenized without adding special tokens: the template writes BOS itself when the model wants
one. Templates are the checkpoint's code, so they run sandboxed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from llmexport import LLMExportError

from .bundle import read_json
from .tools import check_tools

# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Message = Mapping[str, object]


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LLMExportError("chat templates need jinja2; pip install jinja2") from None
    return jinja2, ImmutableSandboxedEnvironment


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def resolve_template(tokenizer_config: Mapping | None, template_file: str | None) -> str | None:
    """The default chat template, with transformers' precedence: chat_template.jinja, then the
    `chat_template` entry of tokenizer_config.json (a string, or a list of named templates)."""
    if template_file is not None:
        return template_file
    value = (tokenizer_config or {}).get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    return None


def special_tokens(tokenizer_config: Mapping | None, special_tokens_map: Mapping | None) -> dict[str, str]:
    """The named special tokens as strings (special_tokens_map.json is the legacy source,
    tokenizer_config.json wins where both name one)."""
    out: dict[str, str] = {}
    for source in (special_tokens_map or {}, tokenizer_config or {}):
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(source.get(name))
            if text is not None:
                out[name] = text
    return out


class ChatTemplate:
    def __init__(self, template: str, tokens: Mapping[str, str] | None = None):
        jinja2, environment = _jinja()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
            variables = jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.exceptions.TemplateError as e:
            raise LLMExportError(f"the bundle's chat template does not compile: {e}; fix chat_template.jinja") from None
        self._jinja2 = jinja2
        self.tokens = dict(tokens or {})
        self.takes_tools = "tools" in variables  # Qwen2.5's lists them in the system prompt

    @classmethod
    def from_files(cls, template_file: Path | None, tokenizer_config: Path | None,
                   special_tokens_map: Path | None) -> "ChatTemplate | None":
        """The checkpoint's (or bundle's) template, or None when it has none."""
        config = read_json(tokenizer_config)
        text = template_file.read_text(encoding="utf-8") if template_file else None
        template = resolve_template(config, text)
        return cls(template, special_tokens(config, read_json(special_tokens_map))) if template else None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
               tools: Sequence[Mapping] | None = None) -> str:
        """The prompt text. tools: OpenAI's list ({"type": "function", "function": {...}}), passed
        to the template as transformers passes it; messages may hold role "tool" replies and
        assistant messages with OpenAI tool_calls (their arguments JSON strings)."""
        check_messages(messages)
        if tools:
            check_tools(tools)
            if not self.takes_tools:
                raise LLMExportError("this model's chat template does not take tools; "
                                     "describe the functions in a system message instead")
        plain = [_template_message(m) for m in messages]
        try:
            return self._template.render(messages=plain, tools=list(tools) if tools else None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.tokens)
        except self._jinja2.exceptions.TemplateError as e:
            raise LLMExportError(f"the chat template refused the conversation: {e}") from None


def _template_message(message: Message) -> dict:
    """A message as templates read it: as transformers, keys whose value is None are dropped
    (templates test for presence); a tool call's arguments, a JSON string in OpenAI's API, become
    the object templates write with `tojson` (as vLLM does), else a string would be quoted twice."""
    plain = {k: v for k, v in message.items() if v is not None}
    if plain.get("tool_calls"):
        plain["tool_calls"] = [_template_call(c) for c in plain["tool_calls"]]
    return plain


def _template_call(call: Mapping) -> dict:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass  # not JSON: the template gets the text as it is
    return {**call, "function": function}


def check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise LLMExportError("a chat needs a non-empty list of messages like {'role': 'user', 'content': 'hi'}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"]:
            raise LLMExportError(f"message {i} needs a 'role' string (system, user or assistant)")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not _well_formed_calls(calls):
                raise LLMExportError(f"message {i}: tool_calls belong to assistant messages, each "
                                     "{'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
            if calls and m.get("content") is None:
                continue  # OpenAI's assistant message that only calls tools has content None
        if not isinstance(m.get("content"), (str, list)):
            raise LLMExportError(f"message {i} needs a 'content' string")


def _well_formed_calls(calls) -> bool:
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        return False
    return all(isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)
               and isinstance(c["function"].get("name"), str) for c in calls)

