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

# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Message = Mapping[str, object]


def _jinja():
    try:
        import jinja2
        import jinja2.ext
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
        except jinja2.exceptions.TemplateError as e:
            raise LLMExportError(f"the bundle's chat template does not compile: {e}; fix chat_template.jinja") from None
        self._jinja2 = jinja2
        self.tokens = dict(tokens or {})

    @classmethod
    def from_files(cls, template_file: Path | None, tokenizer_config: Path | None,
                   special_tokens_map: Path | None) -> "ChatTemplate | None":
        """The checkpoint's (or bundle's) template, or None when it has none."""
        config = read_json(tokenizer_config)
        text = template_file.read_text(encoding="utf-8") if template_file else None
        template = resolve_template(config, text)
        return cls(template, special_tokens(config, read_json(special_tokens_map))) if template else None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        # As transformers: keys whose value is None are dropped (templates test for presence).
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=plain, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.tokens)
        except self._jinja2.exceptions.TemplateError as e:
            raise LLMExportError(f"the chat template refused the conversation: {e}") from None


def check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise LLMExportError("a chat needs a non-empty list of messages like {'role': 'user', 'content': 'hi'}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"]:
            raise LLMExportError(f"message {i} needs a 'role' string (system, user or assistant)")
        if not isinstance(m.get("content"), (str, list)):
            raise LLMExportError(f"message {i} needs a 'content' string")

