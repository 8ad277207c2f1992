"""The command line as a user runs it: the installed entry point in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from llmexport.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "models" in out.stdout


def test_models_lists_presets_with_sizes():
    out = run_cli("models")
    assert out.returncode == 0
    assert "llama-2-7b" in out.stdout and "6.74B" in out.stdout and "12.55 GiB" in out.stdout


def test_reference_generates_the_requested_tokens():
    out = run_cli("reference", "--model", "tiny-llama", "--token-ids", "1,2,3", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"][0]) == 5


def test_errors_are_one_line_without_traceback():
    out = run_cli("reference", "--model", "no-such-model")
    assert out.returncode == 1
    assert out.stderr.startswith("error: unknown preset 'no-such-model'")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
