"""The bundle format: integrity records, manifest numbers checked before use, paths that stay
inside (ONNX external data included), and exports that leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import onnx
import pytest

from llmexport import LLMExportError
from llmexport.exporter.export import export_bundle
from llmexport.runtime.bundle import Bundle, integrity, writer
from llmexport.runtime.bundle.manifest import store, update_manifest
from llmexport.runtime.session import Session
from tests.conftest import run_cli


@pytest.fixture
def copy(bundle_factory, tmp_path):
    """A private copy of a tiny bundle with a tokenizer."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# -- integrity -----------------------------------------------------------------------------------

def test_every_file_is_recorded_with_its_sha256(copy):
    record = _manifest(copy)["integrity"]
    assert set(record["files"]) == {"prefill.onnx", "decode.onnx", "genai.onnx", "genai_config.json", "weights.bin",
                                    "tokenizer.json", "generation_config.json"}
    for name, entry in record["files"].items():
        data = (copy / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # sha256sum's digest
    Bundle.open(copy, check_integrity=True)


@pytest.mark.parametrize("name", ["prefill.onnx", "decode.onnx", "genai.onnx", "weights.bin", "tokenizer.json",
                                  "generation_config.json"])
def test_a_flipped_byte_is_reported_by_file_name(copy, name):
    _flip(copy / name, (copy / name).stat().st_size // 2)
    Bundle.open(copy)  # sizes and paths are fine: only hashing can tell
    with pytest.raises(LLMExportError, match=f"sha256 mismatch in {name}: .*re-copy or re-export"):
        Bundle.open(copy, check_integrity=True)
    with pytest.raises(LLMExportError, match=f"sha256 mismatch in {name}"):
        Session(copy, check_integrity=True)
    result = run_cli("verify", "--bundle", str(copy), "--integrity")
    assert result.returncode == 1 and f"sha256 mismatch in {name}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chunks_are_checked_in_parallel_and_locate_the_damage(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(300_000))
    record = integrity.describe(tmp_path, ["weights.bin"], chunk_bytes=65536)
    entry = record.files["weights.bin"]
    assert len(entry.chunks) == 5 and entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    integrity.check_digests(record, lambda n: tmp_path / n, "test", workers=4)
    _flip(path, 200_000)
    with pytest.raises(LLMExportError, match=r"weights.bin chunk 3 \(bytes 196608..262143\)"):
        integrity.check_digests(record, lambda n: tmp_path / n, "test", workers=4)


def test_sizes_are_checked_on_every_open(copy):
    with open(copy / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(LLMExportError, match="tokenizer.json has .* bytes, the manifest records"):
        Bundle.open(copy)


def test_an_edited_manifest_is_detected(copy):
    manifest = _manifest(copy)
    manifest["limits"]["max_batch"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(LLMExportError, match="manifest.json does not match its recorded sha256"):
        Bundle.open(copy)


def test_verify_integrity_reports_time_without_running_graphs(copy):
    result = run_cli("verify", "--bundle", str(copy), "--integrity")
    assert result.returncode == 0 and "7 files" in result.stdout and "every sha256 matches" in result.stdout


# -- manifest numbers -----------------------------------------------------------------------

def _tensor(m):
    return m["weights"]["tensors"]["model.layers.0.self_attn.q_proj.weight.T"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: _tensor(m).update(offset=m["weights"]["bytes"] // 65536 * 65536), "past the end of the"),
    (lambda m: _tensor(m).update(offset=_tensor(m)["offset"] + 1), "not a multiple of 65536"),
    (lambda m: _tensor(m).update(offset=m["weights"]["tensors"]["model.embed_tokens.weight"]["offset"]), "overlap"),
    (lambda m: _tensor(m).update(length=_tensor(m)["length"] - 4), "has shape .* but length"),
    (lambda m: _tensor(m).update(offset=-65536), "malformed entry"),
    (lambda m: _tensor(m).update(shape=["64", 64]), "malformed entry"),
    (lambda m: m["cache"].update(num_layers=5), "cache num_layers 5 differs"),
    (lambda m: m["cache"]["shape"].__setitem__(2, 128), "cache shape .* does not fit max_seq_len"),
    (lambda m: m["limits"].update(max_batch=0), "are not positive integers"),
    (lambda m: m.update(dtype="float64"), "unknown dtype"),
    (lambda m: m.update(eos_token_ids=[10**9]), "are not token ids"),
    (lambda m: m.pop("weights"), "lacks or garbles field 'weights'"),
])
def test_manifest_numbers_are_checked_before_use(copy, edit, message):
    """Consistent edits (digest recomputed) with wrong numbers: each one clear error, before any
    byte is mapped (a shifted offset used to give garbage tokens silently)."""
    manifest = _manifest(copy)
    edit(manifest)
    store(copy, manifest)
    with pytest.raises(LLMExportError, match=message):
        Session(copy)


# -- paths --------------------------------------------------------------------------------------

def _point_external_data(copy, location: str) -> None:
    """Rewrite prefill.onnx so one initializer's external data lives at `location`, and record
    the new file consistently (as an attacker who also fixes the digests would)."""
    model = onnx.load(str(copy / "prefill.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(copy / "prefill.onnx"))
    manifest = _manifest(copy)
    del manifest["integrity"]["files"]["prefill.onnx"]
    update_manifest(copy, manifest, {}, ["prefill.onnx"])


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "link-out"])
def test_onnx_external_data_cannot_leave_the_bundle(copy, tmp_path, location, monkeypatch):
    shutil.copy(copy / "weights.bin", tmp_path / "outside.bin")
    (copy / "link-out").symlink_to(tmp_path / "outside.bin")
    _point_external_data(copy, location)
    Bundle.open(copy, check_integrity=True)  # the manifest is consistent: the graph is the problem
    import onnxruntime

    def never(*args, **kwargs):
        raise AssertionError("ONNX Runtime was handed a graph whose data lives outside the bundle")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    refused = "prefill.onnx \\(external data\\).*(only relative paths|resolves outside)"
    with pytest.raises(LLMExportError, match=refused):
        Session(copy)


def test_verify_refuses_outside_external_data_too(copy, tmp_path):
    _point_external_data(copy, "../outside.bin")
    result = run_cli("verify", "--bundle", str(copy), "--prompts", "1")
    assert result.returncode == 1 and "resolves outside the bundle" in result.stderr


# -- writing ------------------------------------------------------------------------------------

def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_stale_staging_of_a_killed_export_is_removed_live_ones_kept(tmp_path):
    out = tmp_path / "b"
    dead = tmp_path / f".b.partial-{_dead_pid()}"
    dead.mkdir()
    (dead / writer.MARKER).write_text(f"{__import__('socket').gethostname()}\n{_dead_pid()}\n")
    (dead / "weights.bin").write_bytes(b"x" * 1000)
    unmarked = tmp_path / f".b.partial-{_dead_pid()}"  # killed before it wrote its marker
    unmarked.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".b.partial-{live.pid}"
        running.mkdir()
        (running / writer.MARKER).write_text(f"{__import__('socket').gethostname()}\n{live.pid}\n")
        export_bundle("tiny-llama", out, max_seq_len=32)
        assert not dead.exists() and not unmarked.exists() and running.exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_sigkill_during_export_then_export_again_leaves_nothing(tmp_path):
    out = tmp_path / "b"
    child = subprocess.Popen([sys.executable, "-c", "from llmexport.cli import main; main()", "onnx", "--model",
                              "tiny-llama", "--out", str(out), "--max-seq-len", "32"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.partial-*")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = list(tmp_path.glob(".b.partial-*"))
    assert left and not out.exists()  # killed mid-export: staging left, --out never half-written
    export_bundle("tiny-llama", out, max_seq_len=32)
    assert list(tmp_path.glob(".b.*")) == [] and Bundle.open(out, check_integrity=True)


@pytest.mark.parametrize("out, message", [
    ("/proc/llmexport-test/b", "cannot be written"),
    ("{file}/b", "is not a directory"),
])
def test_unwritable_out_fails_before_any_work(tmp_path, out, message):
    (tmp_path / "file").write_text("x")
    started = time.perf_counter()
    result = run_cli("onnx", "--model", "tiny-llama", "--out", out.format(file=tmp_path / "file"))
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 30


def test_an_internal_error_is_one_line_naming_the_report(tmp_path, monkeypatch, capsys):
    from llmexport import cli

    def broken():
        raise TypeError("something the code did not expect")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == cli.BUG_EXIT and len(err.splitlines()) == 1
    assert "internal error (TypeError: something the code did not expect)" in err
    report = next((tmp_path / ".cache" / "llmexport").glob("llmexport-crash-*.txt"))
    assert str(report) in err and "Traceback" in report.read_text()
