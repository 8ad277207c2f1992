"""Shared fixtures: tiny Hugging Face checkpoints written by transformers itself (the oracle), and
the two real models converted from their GGUF files once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny configs of each family, in the keys transformers' own config classes take.
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
HF_FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                      rope_theta=1000000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8)),
}


def write_hf_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """Random weights saved by transformers' save_pretrained; returns the directory."""
    import transformers

    config_cls, model_cls, extra = HF_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    # Larger than the default init so logits are far from uniform and greedy choices are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llama2", "llama3", "qwen2"])
def hf_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, directory) for each family the parity tests cover."""
    family = request.param
    return family, write_hf_checkpoint(family, tmp_path_factory.mktemp(family))


@pytest.fixture(scope="session")
def llama3_checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint("llama3", tmp_path_factory.mktemp("llama3-single"))


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory):
    """write_hf_checkpoint into a fresh directory: make_hf_checkpoint("mistral")."""
    return lambda family, seed=0: write_hf_checkpoint(family, tmp_path_factory.mktemp(family), seed)


WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 256)]


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary: "w5 w17" <-> [5, 17]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """bundle_factory(family, target, dtype="float32", **export_kwargs) -> (bundle dir, checkpoint dir).

    Bundles are exported from transformers-saved checkpoints (with a tokenizer.json) and cached
    for the session, since several test files drive the same ones.
    """
    from llmexport.exporter.export import export_bundle

    cache: dict = {}

    def make(family: str, target: str, dtype: str = "float32", **kwargs):
        key = (family, target, dtype, tuple(sorted(kwargs.items())))
        if key not in cache:
            ckpt = write_hf_checkpoint(family, tmp_path_factory.mktemp(f"ckpt-{family}"))
            write_tokenizer(ckpt / "tokenizer.json")
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{target}-{dtype}"
            kwargs = {"max_seq_len": 64, "max_batch": 4} | kwargs
            cache[key] = (export_bundle(ckpt, out, target=target, dtype=dtype, **kwargs), ckpt)
        return cache[key]

    return make


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory):
    """real_checkpoint(flag) -> the checkpoint `examples/convert_gguf.py --FLAG` writes (as a user
    makes it; the downloaded GGUF cached in ~/.cache/llmexport). Converted once per session for
    every test file that uses the model (Qwen2.5-Coder's conversion takes about a minute): treat
    it as read-only."""
    made: dict[str, Path] = {}

    def convert(flag: str) -> Path:
        if flag not in made:
            out = tmp_path_factory.mktemp(f"real-{flag}") / "ckpt"
            done = subprocess.run([sys.executable, str(ROOT / "examples" / "convert_gguf.py"), f"--{flag}",
                                   "--cache", str(Path.home() / ".cache" / "llmexport"), "--out", str(out)],
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            made[flag] = out
        return made[flag]

    return convert


def run_cli(*args: str, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command line as a user runs it: the entry point in a fresh process."""
    return subprocess.run([sys.executable, "-c", "from llmexport.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, input=input)
