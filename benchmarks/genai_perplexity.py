"""Perplexity of an onnxruntime-genai model (its builder's model.onnx) on `llmexport eval`'s
terms: the same token ids (the checkpoint's tokenizer.json, read by llmexport's Tokenizer), the
same non-overlapping windows, every token after a window's first scored. The peer's graph
returns every position's logits, so each window is one ONNX Runtime call (CPU, accuracy level
as built). This puts the peer's quantization on the figure README's quality table uses.

    python -m llmexport.benchmarks.genai_perplexity GENAI_DIR --checkpoint CKPT --text FILE \
        [--window 1024] [--max-tokens N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from llmexport.runtime.evaluate import windows
from llmexport.runtime.logprobs import log_softmax_at


def perplexity(model_dir: str | Path, ids: list[int], window: int, threads: int | None = None) -> dict:
    import onnxruntime as ort

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / config["filename"]), options, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    chunks = windows(ids, window)
    total, scored = 0.0, 0
    for chunk in chunks:
        feeds = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, len(chunk)), np.int64)}
        for p in past:  # an empty cache: (1, kv_heads, 0, head_size)
            feeds[p.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        logits = session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)  # (S-1, V): predicts 1..S-1
        total -= float(log_softmax_at(logits, np.array(chunk[1:])).sum())
        scored += len(chunk) - 1
    return {"perplexity": math.exp(total / scored), "tokens_scored": scored, "windows": len(chunks)}


def main() -> None:
    from llmexport.runtime.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint both were built from (tokenizer.json)")
    parser.add_argument("--text", required=True)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None, help="score the text's first N tokens (as eval)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ids = Tokenizer(str(Path(args.checkpoint) / "tokenizer.json")).encode(Path(args.text).read_text(encoding="utf-8"))
    ids = ids[: args.max_tokens]
    result = perplexity(args.model_dir, ids, args.window, args.threads)
    print(f"{args.model_dir}: perplexity {result['perplexity']:.4f} ({result['tokens_scored']} tokens, "
          f"{result['windows']} windows of {args.window})")


if __name__ == "__main__":
    main()
