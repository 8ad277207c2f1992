"""Bad export requests: one clear error each, and never a partial bundle left behind."""

from __future__ import annotations

import errno
import shutil

import pytest

from llmexport import LLMExportError
from llmexport.runtime.bundle import weights as weights_file  # where weights.bin is opened
from llmexport.exporter.export import export_bundle


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name] == []


def test_unknown_preset(tmp_path):
    with pytest.raises(LLMExportError, match="unknown preset 'llama-9'"):
        export_bundle("llama-9", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_unreadable_checkpoint_leaves_nothing(llama3_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama3_checkpoint, ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LLMExportError, match="corrupt or truncated"):
        export_bundle(ckpt, tmp_path / "b")
    assert not (tmp_path / "b").exists() and _no_leftovers(tmp_path)


def test_max_seq_len_above_the_model_limit(tmp_path):
    with pytest.raises(LLMExportError, match="--max-seq-len 100000 is outside 1..256"):
        export_bundle("tiny-llama", tmp_path / "b", max_seq_len=100_000)


@pytest.mark.parametrize("target, dtype, message", [
    ("portable", "bfloat16", "--dtype bfloat16 is not supported by --target portable"),
    ("ort", "int8", "unsupported dtype 'int8'"),
    ("tensorrt-ish", "float32", "unknown --target"),
])
def test_unsupported_dtype_or_target(tmp_path, target, dtype, message):
    with pytest.raises(LLMExportError, match=message):
        export_bundle("tiny-llama", tmp_path / "b", target=target, dtype=dtype)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LLMExportError, match="pass --force"):
        export_bundle("tiny-llama", out, max_seq_len=32)
    assert (out / "precious.txt").read_text() == "keep me"
    export_bundle("tiny-llama", out, max_seq_len=32, force=True)
    assert (out / "manifest.json").is_file() and not (out / "precious.txt").exists()
    assert _no_leftovers(tmp_path)


def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += 1
            if self.written > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(weights_file, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(LLMExportError, match="the disk is full"):
        export_bundle("tiny-llama", tmp_path / "b", max_seq_len=32)
    assert not (tmp_path / "b").exists() and _no_leftovers(tmp_path)


def test_bad_max_batch(tmp_path):
    with pytest.raises(LLMExportError, match="--max-batch 0"):
        export_bundle("tiny-llama", tmp_path / "b", max_batch=0)
