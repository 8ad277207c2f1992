"""Chat templates and generation defaults, with transformers' apply_chat_template as the oracle."""

from __future__ import annotations

import json
import shutil

import pytest

from llmexport import LLMExportError
from llmexport.runtime.bundle.manifest import update_manifest
from llmexport.runtime.chat import ChatTemplate
from llmexport.runtime.session import Session
from tests.conftest import run_cli, write_hf_checkpoint, write_tokenizer
from tests.real_model.conftest import checkpoint  # noqa: F401 (the fixture: Qwen2.5-Coder converted from its GGUF)

# Templates in the styles real checkpoints use (markers are words of the tiny vocabulary).
TEMPLATES = {
    "chatml-default-system": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ 'w10 system\nw11 w12 w13\n' }}{% endif %}{{ 'w10 ' + message['role'] + '\n' + message['content'] + ' w14\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'w10 assistant\n' }}{% endif %}"),
    "llama3-bos-and-raise": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ 'w20 ' + message['role'] + ' w21 ' + message['content'] | trim + ' w22 ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'w20 assistant w21 ' }}{% endif %}"),
    "blocks-tojson-loopcontrols": (
        "{%- set ns = namespace(n=0) -%}\n"
        "{%- for message in messages -%}\n"
        "  {%- if ns.n >= 6 %}{% break %}{% endif -%}\n"
        "  {%- set ns.n = ns.n + 1 -%}\n"
        "  w30 {{ message['content'] }} {{ eos_token }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt %} w31{% endif %}"),
}
CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "w5 w6 w7"}],
    "system-user": [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w5 w6"}],
    "multi-turn": [{"role": "system", "content": "w40"}, {"role": "user", "content": "w5"},
                   {"role": "assistant", "content": "w50 w51"}, {"role": "user", "content": "w6 w7 "}],
}


# Qwen2.5's tool section, shortened: tools as JSON lines in the system prompt, calls as <tool_call>
# blocks written from the arguments object, tool replies inside <tool_response> in a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- 'w10 system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'w11' }}{%- endif %}"
    "{{- '\n<tools>' }}{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}{{- '\n</tools> w14\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- 'w10 system\n' + messages[0]['content'] + ' w14\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- 'w10 ' + message.role + '\n' + message.content + ' w14\n' }}"
    "{%- elif message.role == 'assistant' %}{{- 'w10 assistant' }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- ' w14\n' }}"
    "{%- elif message.role == 'tool' %}{{- 'w10 user\n<tool_response>\n' + message.content + '\n</tool_response> w14\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'w10 assistant\n' }}{%- endif %}")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ARGUMENTS = {"city": "Paris, ☀"}
TOOL_CONVERSATION = [
    {"role": "system", "content": "w40"},
    {"role": "user", "content": "w5 w6"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "w7 w8"},
]


def _hf_tokenizer(directory, template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(write_tokenizer(directory / "tokenizer.json")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=template)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("style", TEMPLATES)
def test_rendered_text_equals_apply_chat_template(tmp_path, style, conversation):
    hf = _hf_tokenizer(tmp_path, TEMPLATES[style])
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate(TEMPLATES[style], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    assert ours.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_tools_render_as_apply_chat_template_renders_them(tmp_path):
    hf = _hf_tokenizer(tmp_path, TOOLS_TEMPLATE)
    messages = [{"role": "user", "content": "w5 w6"}]
    ours = ChatTemplate(TOOLS_TEMPLATE).render(messages, tools=TOOLS)
    assert ours == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in ours


def test_tool_calls_and_tool_replies_render_with_the_arguments_as_an_object(tmp_path):
    """OpenAI sends a call's arguments as a JSON string; the template must see the object
    (transformers' oracle is given the object), or it would write a quoted string."""
    hf = _hf_tokenizer(tmp_path, TOOLS_TEMPLATE)
    as_hf = [dict(m) for m in TOOL_CONVERSATION]
    as_hf[2] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": ARGUMENTS}}]}
    ours = ChatTemplate(TOOLS_TEMPLATE).render(TOOL_CONVERSATION, tools=TOOLS)
    assert ours == hf.apply_chat_template(as_hf, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '{"name": "get_weather", "arguments": {"city": "Paris, ☀"}}' in ours
    assert "<tool_response>\nw7 w8\n</tool_response>" in ours


def test_a_template_says_whether_it_takes_tools():
    assert ChatTemplate(TOOLS_TEMPLATE).takes_tools
    assert not ChatTemplate(TEMPLATES["chatml-default-system"]).takes_tools


def test_tools_for_a_template_that_ignores_them_are_an_error():
    with pytest.raises(LLMExportError, match="this model's chat template does not take tools"):
        ChatTemplate(TEMPLATES["chatml-default-system"]).render(CONVERSATIONS["one-user"], tools=TOOLS)
    assert ChatTemplate(TEMPLATES["chatml-default-system"]).render(CONVERSATIONS["one-user"], tools=None)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "w5", "tool_calls": [{"function": {"name": "f"}}]}], "belong to assistant"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}], "belong to assistant"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "message 0 needs a 'content'"),
])
def test_bad_tool_calls_in_messages_are_clear_errors(messages, message):
    with pytest.raises(LLMExportError, match=message):
        ChatTemplate(TOOLS_TEMPLATE).render(messages)


def test_a_bad_tools_list_is_a_clear_error():
    with pytest.raises(LLMExportError, match=r"tools\[0\] must be"):
        ChatTemplate(TOOLS_TEMPLATE).render(CONVERSATIONS["one-user"], tools=[{"name": "get_weather"}])


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory):
    """A tiny llama bundle exported from a checkpoint whose tokenizer files transformers wrote."""
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama2", tmp_path_factory.mktemp("chat-ckpt"))
    hf = _hf_tokenizer(tmp_path_factory.mktemp("tok"), TEMPLATES["llama3-bos-and-raise"])
    hf.save_pretrained(ckpt)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 22]}))
    out = export_bundle(ckpt, tmp_path_factory.mktemp("chat-bundle") / "b", max_seq_len=64, max_batch=2)
    return out, hf


def test_bundle_keeps_and_names_the_chat_and_generation_files(chat_bundle):
    bundle, _ = chat_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["chat"] == {"template": "chat_template.jinja", "tokenizer_config": "tokenizer_config.json",
                                "special_tokens_map": None}
    assert manifest["generation"]["file"] == "generation_config.json"
    assert manifest["eos_token_ids"] == [2, 22]
    for name in ("chat_template.jinja", "tokenizer_config.json", "generation_config.json", "tokenizer.json"):
        assert (bundle / name).is_file()


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_session_prompt_ids_equal_apply_chat_template(chat_bundle, conversation):
    bundle, hf = chat_bundle
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    with Session(bundle) as session:
        assert session.render_chat(messages) == expected
        assert expected[0] == 1  # BOS written once, by the template, not again by the tokenizer


def test_generation_config_gives_the_defaults_and_calls_override_them(chat_bundle):
    bundle, _ = chat_bundle
    with Session(bundle) as session:
        params = session.default_params()
        assert (params.temperature, params.top_k, params.top_p) == (0.6, 50, 0.9)  # top_k: transformers' default
        assert session.default_params(temperature=0.0).temperature == 0.0
        reply = session.chat(CONVERSATIONS["one-user"])
        assert reply.token_ids[0] and reply.finish_reason[0] in ("eos", "length", "max_seq_len")


def test_template_inside_tokenizer_config_is_used_without_a_jinja_file(chat_bundle, tmp_path):
    bundle, hf = chat_bundle
    copy = shutil.copytree(bundle, tmp_path / "b")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": TEMPLATES["chatml-default-system"]}]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["chat"]["template"] = None  # re-recorded as an export would have: without the .jinja file
    del manifest["integrity"]["files"]["chat_template.jinja"]
    update_manifest(copy, manifest, {}, ["tokenizer_config.json"])
    (copy / "chat_template.jinja").unlink()
    hf.chat_template = TEMPLATES["chatml-default-system"]
    with Session(copy) as session:
        messages = CONVERSATIONS["multi-turn"]
        assert session.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list of messages"),
    ([{"content": "w5"}], "message 0 needs a 'role'"),
    ([{"role": "user"}], "message 0 needs a 'content'"),
    ([{"role": "robot", "content": "w5"}], "refused the conversation: bad role"),
])
def test_bad_conversations_are_clear_errors(chat_bundle, messages, message):
    bundle, _ = chat_bundle
    with Session(bundle) as session:
        with pytest.raises(LLMExportError, match=message):
            session.chat(messages)
        assert session.chat(CONVERSATIONS["one-user"]).token_ids[0]  # still usable


def test_bundle_without_a_template_says_so(bundle_factory):
    bundle, _ = bundle_factory("llama2", "ort")
    with Session(bundle) as session, pytest.raises(LLMExportError, match="no chat template"):
        session.chat(CONVERSATIONS["one-user"])


def test_cli_chat_and_generate_chat(chat_bundle):
    bundle, hf = chat_bundle
    out = run_cli("generate", "--bundle", str(bundle), "--chat", "w5 w6", "--system", "w40",
                         "--temperature", "0", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"][0]) <= 4
    out = run_cli("chat", "--bundle", str(bundle), "--max-new-tokens", "3", "--temperature", "0",
                         input="w5 w6\n/reset\nw7\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2  # one reply per message


def test_a_generation_config_that_is_not_an_object_is_a_clear_export_error(tmp_path):
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama2", tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text("[2]")
    with pytest.raises(LLMExportError, match="generation_config.json is not a JSON object"):
        export_bundle(ckpt, tmp_path / "b", max_seq_len=32)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
class TestQwenTemplateTools:
    """Qwen2.5-Coder's own template, from the checkpoint converted from its GGUF."""

    flag = "qwen-coder"  # for the checkpoint fixture

    def test_the_system_prompt_lists_the_tools_as_transformers_renders_it(self, checkpoint):
        from transformers import AutoTokenizer

        template = ChatTemplate.from_files(checkpoint / "chat_template.jinja", checkpoint / "tokenizer_config.json", None)
        assert template.takes_tools
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        ours = template.render(messages, tools=TOOLS)
        system = ours.split("<|im_end|>")[0]
        assert system.startswith("<|im_start|>system\n") and "# Tools" in system
        assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in system
        hf = AutoTokenizer.from_pretrained(checkpoint)
        assert ours == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        as_hf = [dict(m) for m in TOOL_CONVERSATION]
        as_hf[2] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": ARGUMENTS}}]}
        assert template.render(TOOL_CONVERSATION, tools=TOOLS) == hf.apply_chat_template(
            as_hf, tools=TOOLS, tokenize=False, add_generation_prompt=True)
