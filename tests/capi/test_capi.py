"""The C API from real C (and C++) programs, on a library with no Python in it: the examples, error
paths, open/close cycles, threads, older struct layouts, what the process loads."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session
from tests.conftest import write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
CC = shutil.which("cc") or shutil.which("gcc")
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on this machine"),
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                       reason="the C API is built over onnxruntime-genai's library: pip install onnxruntime-genai"),
]


def byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer over the tiny models' 256 ids (id = byte), which both the
    `tokenizers` library and onnxruntime-genai's tokenizer read: tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = dict(zip(printable + others, [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]))
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "add_bos_token": False}))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny llama3 `ort` bundle with a byte-level tokenizer (onnxruntime-genai reads both)."""
    from llmexport.exporter.export import export_bundle

    ckpt = write_hf_checkpoint("llama3", tmp_path_factory.mktemp("ckpt-capi"))
    byte_tokenizer(ckpt)
    out = export_bundle(ckpt, tmp_path_factory.mktemp("capi-bundle") / "llama3", target="ort", max_seq_len=64,
                        max_batch=4)
    if not (out / "genai_config.json").is_file():
        pytest.skip("this exporter's ort bundles have no genai_config.json yet (onnxruntime-genai cannot run them)")
    return out


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


def _run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)


def _shipped_only(capi_dir: Path, **extra) -> dict:
    """The environment of `env -i LD_LIBRARY_PATH=DIR/lib`: nothing of this Python's."""
    return {"LD_LIBRARY_PATH": str(capi_dir / "lib"), **extra}


def test_example_streams_the_python_runtimes_greedy_tokens_with_only_the_shipped_libraries(example, capi_dir,
                                                                                           bundle):
    done = _run(example, bundle, "5,6,7", 12, env=_shipped_only(capi_dir))
    assert done.returncode == 0, done.stderr
    tokens, finish = done.stdout.strip().splitlines()
    assert [int(t) for t in tokens.split()] == _python_tokens(bundle, [5, 6, 7], 12)
    assert finish == "finish: length (12 tokens)"


def test_nothing_the_example_loads_links_libpython(example, capi_dir, bundle):
    """Every shared object the running example loads (the dynamic loader's own list, dlopen'ed
    ONNX Runtime included), and everything each of those needs (ldd), is free of libpython."""
    done = _run(example, bundle, "5,6,7", 2, env=_shipped_only(capi_dir, LD_DEBUG="files"))
    assert done.returncode == 0, done.stderr
    loaded = set(re.findall(r"file=(\S+) \[0\];\s+(?:generating link map|needed by)", done.stderr))
    loaded |= set(re.findall(r"calling init: (\S+)", done.stderr))
    assert str(capi_dir / "lib" / "libonnxruntime.so.1") in loaded, sorted(loaded)
    paths = {p for p in loaded if p.startswith("/")} | {str(example)}
    for path in paths:
        ldd = _run("ldd", path, env=_shipped_only(capi_dir))
        assert "libpython" not in ldd.stdout and "libpython" not in path, (path, ldd.stdout)


def test_callback_stops_generation_early(example, capi_dir, bundle):
    done = _run(example, bundle, "5,6,7", 12, 3, env=_shipped_only(capi_dir))
    tokens, finish = done.stdout.strip().splitlines()
    assert [int(t) for t in tokens.split()] == _python_tokens(bundle, [5, 6, 7], 12)[:3]
    assert finish == "finish: callback (3 tokens)"


def test_example_reports_a_missing_bundle(example, tmp_path):
    done = _run(example, tmp_path / "nowhere", "1,2")
    assert done.returncode == 1 and done.stderr.startswith("error: bundle ") and "does not exist" in done.stderr


def test_error_paths_and_1000_open_close_cycles(capi_dir, bundle, tmp_path):
    unreadable = tmp_path / "word-level"  # a tokenizer onnxruntime-genai cannot read
    shutil.copytree(bundle, unreadable)
    (unreadable / "tokenizer_config.json").unlink()
    (unreadable / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"a": 0}}}')
    portable = tmp_path / "portable"  # what onnxruntime-genai cannot run: no genai_config.json
    shutil.copytree(bundle, portable)
    (portable / "genai_config.json").unlink()
    program = _compile(capi_dir, HERE / "errors.c", tmp_path / "errors")
    done = _run(program, bundle, unreadable, portable)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    raw = dict(line.partition(" ")[::2] for line in done.stdout.splitlines())
    expected_status = {"missing_bundle": 2, "null_out": 1, "bad_backend": 1, "no_genai_config": 2,
                       "bad_temperature": 1, "bad_top_p": 1,
                       "uninitialised_params": 1, "bad_token": 1, "null_prompt": 1, "prompt_too_long": 3,
                       "past_max_len": 0, "generate_text": 0, "open_unreadable_tokenizer": 0,
                       "text_without_tokenizer": 1, "still_usable": 0, "close": 0, "close_twice": 1,
                       "generate_after_close": 1}
    for name, status in expected_status.items():
        assert int(lines[name][0]) == status, (name, lines[name])
        if status:  # every failure has a readable message
            assert len(lines[name][1]) > 10, name
    assert "no tokenizer" in raw["text_without_tokenizer"]
    assert "genai_config.json" in raw["no_genai_config"] and "--target ort" in raw["no_genai_config"]
    assert lines["missing_bundle_handle_null"] == ["1"]
    assert lines["past_max_len_reason"] == ["max_seq_len", "62"]  # 64 slots - 3 prompt + the last sampled
    assert lines["still_usable_tokens"] == ["4"]
    assert lines["seed_reproduces"] == ["1"] and lines["top_k_1_is_greedy"] == ["1"]
    with Session(bundle) as session:
        text = session.generate("hf", SamplingParams(max_new_tokens=6, ignore_eos=True)).text[0]
    # A prompt whose greedy reply is printable: bytes that are not UTF-8 come out as U+FFFD in
    # both runtimes, but not as the same number of them.
    assert text.isprintable() and text.isascii(), f"pick another prompt: the tiny model now answers {text!r}"
    assert bytes.fromhex(raw["generate_text_result"]).decode() == text
    assert lines["cycles_failures"] == ["0"]
    before, after = int(lines["rss_kib_before"][0]), int(lines["rss_kib_after"][0])
    assert after - before < 8 * 1024, f"RSS grew {after - before} KiB over 1,000 open/close cycles"


@pytest.mark.parametrize("shared", [False, True])
def test_two_threads_with_two_sessions_or_one_shared(capi_dir, bundle, tmp_path, shared):
    program = _compile(capi_dir, HERE / "threads.c", tmp_path / "threads", "-pthread")
    done = _run(program, bundle, *(["shared"] if shared else []))
    assert done.returncode == 0, done.stderr
    rows = [line.split(":", 1) for line in done.stdout.strip().splitlines()]
    for (head, tokens), prompt in zip(rows, ([5, 6, 7], [9, 10, 11])):
        assert head.endswith("status 0")
        assert [int(t) for t in tokens.split()] == _python_tokens(bundle, prompt, 16)


def test_older_struct_layouts_keep_working_and_integrity_is_an_open_option(capi_dir, bundle, tmp_path):
    """llmx_sampling / llmx_open_options from an older, smaller header: nothing is written past
    them, missing fields take their defaults; check_integrity names a damaged file."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    with open(damaged / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x40]))
    program = _compile(capi_dir, HERE / "old_layout.c", tmp_path / "old_layout")
    done = _run(program, bundle, damaged)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}
    assert lines["sampling_size"].endswith(" 1") and lines["sampling_guard"] == "1"
    assert lines["sampling_defaults"] == "64 0 0"
    assert lines["options_guard"] == "1" and lines["open_old"] == "0"
    status, *tokens = lines["generate_old"].split()
    with Session(bundle) as session:  # ignore_eos is not in the old layout: its default, False
        want = session.generate([[5, 6, 7]], SamplingParams(max_new_tokens=5)).token_ids[0]
    assert status == "0" and [int(t) for t in tokens] == want
    assert lines["open_damaged"].startswith("2 1 ") and "weights.bin" in lines["open_damaged"]
    assert "sha256 mismatch" in lines["open_damaged"]
    assert lines["open_intact"] == "0"
    assert lines["bad_threads"] == "1"


def test_speculative_options_are_checked_and_decode_plainly(capi_dir, bundle, tmp_path):
    """speculative "ngram" or "draft" (with a draft bundle) give plain decoding's tokens; a bad
    method or a draft method without a bundle is LLMX_ERROR_INVALID_ARGUMENT naming the fix."""
    program = _compile(capi_dir, HERE / "speculative.c", tmp_path / "speculative")
    done = _run(program, bundle)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}
    assert lines["plain"].split()[0] == "0" and len(lines["plain"].split()) == 25
    assert lines["ngram"] == lines["plain"] and lines["draft"] == lines["plain"]
    assert lines["bad_method"].startswith("1 ") and "not one of ngram, draft" in lines["bad_method"]
    assert lines["draft_without_bundle"].startswith("1 ") and "needs a draft bundle" in lines["draft_without_bundle"]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on this machine")
def test_cpp_example_streams_the_python_runtimes_tokens(capi_dir, bundle, tmp_path):
    """examples/cpp (g++, RAII over the C API) streams text, then the token ids: Python's."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples" / "cpp"), f"LLMX={capi_dir}", f"OUT={tmp_path}"],
                   check=True, timeout=120)
    done = subprocess.run([str(tmp_path / "generate"), str(bundle), "104,101,108,108,111", "10"], capture_output=True,
                          timeout=600, env=_shipped_only(capi_dir))  # bytes: the tiny model's text may be any bytes
    assert done.returncode == 0, done.stderr
    *_, tokens, finish = done.stdout.decode("utf-8", "replace").splitlines()
    assert tokens == "tokens: " + " ".join(map(str, _python_tokens(bundle, [104, 101, 108, 108, 111], 10)))
    assert finish == "finish: length (10 tokens)"
