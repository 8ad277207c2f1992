"""The C API from real C programs: the example, error paths, open/close cycles, threads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on this machine"),
    pytest.mark.skipif(not sysconfig.get_config_var("Py_ENABLE_SHARED"),
                       reason="this Python has no shared libpython to embed"),
]


@pytest.fixture(scope="module")
def capi_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("capi")
    done = subprocess.run([sys.executable, "-c", "from llmexport.cli import main; main()", "capi", "build",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "lib" / "libllmexport.so").is_file() and (out / "include" / "llmexport.h").is_file()
    return out


def _compile(capi_dir: Path, source: Path, out: Path, *flags: str) -> Path:
    subprocess.run([CC, "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_POSIX_C_SOURCE=200809L", *flags,
                    f"-I{capi_dir}/include", "-o", str(out), str(source), f"-L{capi_dir}/lib", "-lllmexport",
                    f"-Wl,-rpath,{capi_dir}/lib"], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def example(capi_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example")
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples" / "c"), f"LLMX={capi_dir}", f"OUT={out}"],
                   check=True, timeout=120)
    return out / "generate"


def _python_tokens(bundle_dir, prompt, n) -> list[int]:
    with Session(bundle_dir) as session:
        return session.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True)).token_ids[0]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)


def test_example_streams_the_python_runtimes_greedy_tokens(example, bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    done = _run(example, bundle_dir, "5,6,7", 12)
    assert done.returncode == 0, done.stderr
    tokens, finish = done.stdout.strip().splitlines()
    assert [int(t) for t in tokens.split()] == _python_tokens(bundle_dir, [5, 6, 7], 12)
    assert finish == "finish: length (12 tokens)"


def test_callback_stops_generation_early(example, bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    done = _run(example, bundle_dir, "5,6,7", 12, 3)
    tokens, finish = done.stdout.strip().splitlines()
    assert [int(t) for t in tokens.split()] == _python_tokens(bundle_dir, [5, 6, 7], 12)[:3]
    assert finish == "finish: callback (3 tokens)"


def test_example_reports_a_missing_bundle(example, tmp_path):
    done = _run(example, tmp_path / "nowhere", "1,2")
    assert done.returncode == 1 and done.stderr.startswith("error: bundle ") and "does not exist" in done.stderr


def test_error_paths_and_1000_open_close_cycles(capi_dir, bundle_factory, tmp_path):
    from llmexport.exporter.export import export_bundle

    bundle_dir, _ = bundle_factory("llama3", "ort")
    plain = export_bundle("tiny-llama", tmp_path / "plain", max_seq_len=32)  # a preset: no tokenizer
    program = _compile(capi_dir, HERE / "errors.c", tmp_path / "errors")
    done = _run(program, bundle_dir, plain)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    raw = dict(line.partition(" ")[::2] for line in done.stdout.splitlines())
    expected_status = {"missing_bundle": 2, "null_out": 1, "bad_backend": 1, "bad_temperature": 1, "bad_top_p": 1,
                       "uninitialised_params": 1, "bad_token": 1, "null_prompt": 1, "prompt_too_long": 3,
                       "past_max_len": 0, "generate_text": 0, "text_without_tokenizer": 1, "still_usable": 0, "close": 0,
                       "close_twice": 1, "generate_after_close": 1}
    for name, status in expected_status.items():
        assert int(lines[name][0]) == status, (name, lines[name])
        if status:  # every failure has a readable message
            assert len(lines[name][1]) > 10, name
    assert lines["missing_bundle_handle_null"] == ["1"]
    assert lines["past_max_len_reason"] == ["max_seq_len", "62"]  # 64 slots - 3 prompt + the last sampled
    assert lines["still_usable_tokens"] == ["4"]
    with Session(bundle_dir) as session:
        text = session.generate("w5 w6 w7", SamplingParams(max_new_tokens=6, ignore_eos=True)).text[0]
    assert raw["generate_text_result"] == text
    assert lines["cycles_failures"] == ["0"]
    before, after = int(lines["rss_kib_before"][0]), int(lines["rss_kib_after"][0])
    assert after - before < 8 * 1024, f"RSS grew {after - before} KiB over 1,000 open/close cycles"


@pytest.mark.parametrize("shared", [False, True])
def test_two_threads_with_two_sessions_or_one_shared(capi_dir, bundle_factory, tmp_path, shared):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    program = _compile(capi_dir, HERE / "threads.c", tmp_path / "threads", "-pthread")
    done = _run(program, bundle_dir, *(["shared"] if shared else []))
    assert done.returncode == 0, done.stderr
    rows = [line.split(":", 1) for line in done.stdout.strip().splitlines()]
    for (head, tokens), prompt in zip(rows, ([5, 6, 7], [9, 10, 11])):
        assert head.endswith("status 0")
        assert [int(t) for t in tokens.split()] == _python_tokens(bundle_dir, prompt, 16)


def test_older_struct_layouts_keep_working_and_integrity_is_an_open_option(capi_dir, bundle_factory, tmp_path):
    """llmx_sampling / llmx_open_options from an older, smaller header: nothing is written past
    them, missing fields take their defaults; check_integrity names a damaged file."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle_dir, damaged)
    with open(damaged / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x40]))
    program = _compile(capi_dir, HERE / "old_layout.c", tmp_path / "old_layout")
    done = _run(program, bundle_dir, damaged)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}
    assert lines["sampling_size"].endswith(" 1") and lines["sampling_guard"] == "1"
    assert lines["sampling_defaults"] == "64 0 0"
    assert lines["options_guard"] == "1" and lines["open_old"] == "0"
    status, *tokens = lines["generate_old"].split()
    with Session(bundle_dir) as session:  # ignore_eos is not in the old layout: its default, False
        want = session.generate([[5, 6, 7]], SamplingParams(max_new_tokens=5)).token_ids[0]
    assert status == "0" and [int(t) for t in tokens] == want
    assert lines["open_damaged"].startswith("2 1 ") and "weights.bin" in lines["open_damaged"]
    assert "sha256 mismatch" in lines["open_damaged"]
    assert lines["bad_threads"] == "1"


def test_speculative_decoding_is_an_open_option(capi_dir, bundle_factory, tmp_path):
    """speculative "ngram" or "draft" (with a draft bundle) give plain decoding's tokens; a bad
    method or a draft method without a bundle is LLMX_ERROR_INVALID_ARGUMENT naming the fix."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    program = _compile(capi_dir, HERE / "speculative.c", tmp_path / "speculative")
    done = _run(program, bundle_dir)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}
    assert lines["plain"].split()[0] == "0" and len(lines["plain"].split()) == 25
    assert lines["ngram"] == lines["plain"] and lines["draft"] == lines["plain"]
    assert lines["bad_method"].startswith("1 ") and "not one of ngram, draft" in lines["bad_method"]
    assert lines["draft_without_bundle"].startswith("1 ") and "needs a draft bundle" in lines["draft_without_bundle"]
