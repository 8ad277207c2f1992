"""The interactive chat loop behind `llmexport chat`: lines in, streamed replies out, on a Session.

Each line read is a user message; its reply streams to `stdout` as it is generated and joins
the conversation. `/reset` forgets the conversation (the system message stays), `/exit`,
`/quit` or the end of input ends it, blank lines are skipped. A reply that fails (the
conversation outgrew max_seq_len, say) is reported on `stderr` as one line, its message is
dropped, and the loop goes on with the same session.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from llmexport import LLMExportError

from .chat import Message

if TYPE_CHECKING:
    from .sampling import SamplingParams
    from .session import Session

PROMPT = "> "  # shown before each line when reading from a terminal
EXIT, RESET = ("/exit", "/quit"), "/reset"


def chat_repl(session: Session, params: SamplingParams | None = None, system: str | None = None, *,
              stdin: TextIO | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None) -> list[Message]:
    """Chat until the input ends or says /exit; returns the conversation as it stands then.
    `params` None: the bundle's generation defaults. Streams default to the process's own."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    start: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    for line in _lines(stdin, stdout):
        command = line.strip()
        if command in EXIT:
            break
        if command == RESET:
            messages = list(start)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for event in session.chat_stream(messages, params):
                stdout.write(event.text)
                stdout.flush()
                reply.append(event.text)
        except LLMExportError as e:
            messages.pop()
            print(f"error: {e}", file=stderr)
            continue
        print(file=stdout)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


def _lines(stream: TextIO, output: TextIO) -> Iterator[str]:
    """The lines of `stream` without their newline. A terminal gets a prompt, and the process's
    own stdin is read with input() so the terminal's line editing works."""
    interactive = stream.isatty()
    while True:
        if interactive and stream is sys.stdin and output is sys.stdout:
            try:
                yield input(PROMPT)
            except EOFError:
                return
            continue
        if interactive:
            output.write(PROMPT)
            output.flush()
        line = stream.readline()
        if not line:
            return
        yield line.removesuffix("\n")
