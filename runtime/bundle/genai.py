"""genai_config.json: what onnxruntime-genai's runtime reads to run an `ort` bundle's genai.onnx.

onnxruntime-genai opens a folder holding genai_config.json, the graph it names and the
tokenizer files (tokenizer.json, tokenizer_config.json: already in the bundle). The graph,
genai.onnx, follows its decoder contract (names.py: input_ids, attention_mask,
past_key_values.N.key/value in; logits, present.N.key/value out) and reads the bundle's
weights.bin. Its logits are (batch, 1, vocab), each row's last real token, which genai takes
as already picked ("pruned" logits); the caches are genai's shared past/present buffers of
search.max_length slots (`past_present_share_buffer`: GroupQueryAttention writes in place), so
beam search (num_beams > 1, which turns sharing off) is not supported. Batched prompts are
right-padded with pad_token_id, as genai pads them.

The search defaults are the manifest's `generation.defaults` (from generation_config.json), in
genai's terms: greedy unless they sample; top_k 0 (off) is the whole vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import names as io
from .manifest import Manifest

LOG_ID = "onnxruntime-genai"


def genai_config(manifest: Manifest, generation: dict) -> dict:
    """genai_config.json of a bundle with a genai graph; `generation`: its generation_config.json
    (for pad_token_id; empty without one)."""
    config, limits, defaults = manifest.model.config, manifest.limits, manifest.generation.defaults or {}
    eos = list(manifest.eos_token_ids)
    pad = generation.get("pad_token_id")
    if type(pad) is not int:
        pad = eos[0] if eos else 0
    decoder = {
        "session_options": {"log_id": LOG_ID, "provider_options": []},
        "filename": manifest.graphs[io.GENAI].file,
        "head_size": manifest.cache.head_dim,
        "hidden_size": config["hidden_size"],
        "inputs": {"input_ids": io.INPUT_IDS, "attention_mask": io.ATTENTION_MASK,
                   # genai's printf patterns for layer N's names
                   "past_key_names": io.past_key("%d"), "past_value_names": io.past_value("%d")},
        "outputs": {"logits": io.LOGITS, "present_key_names": io.present_key("%d"),
                    "present_value_names": io.present_value("%d")},
        "num_attention_heads": config["num_heads"],
        "num_hidden_layers": config["num_layers"],
        "num_key_value_heads": config["num_kv_heads"],
    }
    model = {"bos_token_id": manifest.bos_token_id, "context_length": limits.max_seq_len, "decoder": decoder,
             "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad,
             "type": config["model_type"], "vocab_size": config["vocab_size"]}
    if manifest.bos_token_id is None:
        del model["bos_token_id"]
    sampling = float(defaults.get("temperature", 0.0)) > 0
    search = {
        "do_sample": sampling,
        "max_length": limits.max_seq_len,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": float(defaults.get("repetition_penalty", 1.0)),
        "temperature": float(defaults.get("temperature", 1.0)) if sampling else 1.0,
        "top_k": (int(defaults.get("top_k", 50)) or config["vocab_size"]) if sampling else 50,
        "top_p": float(defaults.get("top_p", 1.0)) if sampling else 1.0,
    }
    return {"model": model, "search": search}


def write_genai_config(bundle_dir: Path, manifest: Manifest, generation: dict) -> str:
    """Write genai_config.json into `bundle_dir`; returns its file name."""
    (bundle_dir / io.GENAI_CONFIG).write_text(json.dumps(genai_config(manifest, generation), indent=4),
                                              encoding="utf-8")
    return io.GENAI_CONFIG
