"""The chat loop (`llmexport chat`) as a function of a Session and three streams."""

from __future__ import annotations

import io
import shutil

import pytest

from llmexport.exporter.export import export_bundle
from llmexport.runtime.chat_repl import chat_repl
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

GREEDY = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def session(bundle_factory, tmp_path_factory):
    """A tiny bundle whose tokenizer reads "w5 w6" as [5, 6] and whose template joins the messages."""
    ckpt = tmp_path_factory.mktemp("repl") / "ckpt"
    shutil.copytree(bundle_factory("llama2", "ort")[1], ckpt)
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with Session(export_bundle(ckpt, ckpt.parent / "bundle", max_seq_len=64, max_batch=2)) as opened:
        yield opened


def _chat(session, text: str, system: str | None = None):
    out, err = io.StringIO(), io.StringIO()
    conversation = chat_repl(session, GREEDY, system, stdin=io.StringIO(text), stdout=out, stderr=err)
    return conversation, out.getvalue().splitlines(), err.getvalue()


def test_each_message_gets_the_reply_session_chat_gives(session):
    conversation, replies, err = _chat(session, "w5 w6\n\nw7\n", system="w40")
    assert err == "" and len(replies) == 2  # the blank line is skipped
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert replies == [conversation[2]["content"], conversation[4]["content"]]
    assert replies[1] == session.chat(conversation[:4], GREEDY).text[0]  # the whole conversation so far


def test_reset_keeps_the_system_message_and_exit_stops_reading(session):
    conversation, replies, _ = _chat(session, "w5\n/reset\nw7\n/exit\nw8\n", system="w40")
    assert len(replies) == 2
    assert [m["content"] for m in conversation[:2]] == ["w40", "w7"]


def test_a_failed_reply_is_one_error_line_and_the_chat_goes_on(session):
    too_long = " ".join(["w5"] * 70)  # more tokens than max_seq_len=64
    conversation, replies, err = _chat(session, f"{too_long}\nw6\n")
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "max_seq_len" in err
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["w6"] and len(replies) == 1
