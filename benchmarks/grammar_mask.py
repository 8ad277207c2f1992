"""Token-mask cost of constrained JSON decoding: llguidance against xgrammar on one tokenizer.

For a nested JSON schema (objects in arrays, enums, integers, numbers, strings, a nullable
field) and for JSON mode (any object), each library compiles the grammar, then a realistic
document (json.dumps(..., indent=2), tokenized as the model would emit it, then EOS) is fed token
by token: before each token the next-token mask is computed and timed. One row, then 16 rows
with 16 different documents: one call per row in turn, and each library's batch call (its own
threads, off the Python thread). Also: whether a mask computation lets the Python thread run
(so it can overlap the model's step), the cost of applying a bitmask to one float32 logits row
in numpy, and llmexport.runtime.grammar's own cost (mask computed and applied).

    python -m llmexport.benchmarks.grammar_mask --tokenizer /tmp/ckpt/qwen2.5-coder-0.5b-instruct \\
        --eos 151645 --out benchmarks/results --name grammar-mask-cpu

llguidance is a dependency of llmexport; xgrammar (which needs torch, transformers and triton) is
measured when it is installed, its tokenizer info built through transformers (its documented
constructor); llguidance reads tokenizer.json itself. Writes NAME.json and NAME.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROWS = 16
PASSES = 3  # documents (or sets of 16) per measurement, for steadier medians on a shared machine
THREADS = 2  # the batch calls' worker threads (this machine has 2 cores)

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                           "tier": {"enum": ["free", "pro", "enterprise"]}},
            "required": ["name", "email", "tier"], "additionalProperties": False},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                               "unit_price": {"type": "number"},
                               "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["sku", "quantity", "unit_price", "tags"], "additionalProperties": False}},
        "total": {"type": "number"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "status", "customer", "items", "total", "notes"],
    "additionalProperties": False,
}
JSON_OBJECT = {"type": "object"}  # OpenAI's JSON mode: any object
WORDS = ["red", "blue", "steel", "garden", "hose", "lamp", "desk", "cable", "kit", "mini", "pro", "eco"]
NAMES = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson", "Linus Torvalds"]


def document(seed: int) -> str:
    """An order as a model would write it for SCHEMA (and for JSON mode): indented, 3-6 items."""
    rng = random.Random(seed)
    items = [{"sku": f"{rng.choice(WORDS).upper()}-{rng.randint(100, 9999)}", "quantity": rng.randint(1, 12),
              "unit_price": round(rng.uniform(0.5, 400), 2),
              "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 3))]} for _ in range(rng.randint(3, 6))]
    name = rng.choice(NAMES)
    doc = {"order_id": f"ORD-{rng.randint(10000, 99999)}", "status": rng.choice(["pending", "paid", "shipped"]),
           "customer": {"name": name, "email": name.split()[0].lower() + "@example.com",
                        "tier": rng.choice(["free", "pro", "enterprise"])},
           "items": items, "total": round(sum(i["quantity"] * i["unit_price"] for i in items), 2),
           "notes": rng.choice([None, "Leave the parcel at the back door, please."])}
    return json.dumps(doc, indent=2)


def _stats_us(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    return {"median_us": round(statistics.median(us), 1), "p95_us": round(us[int(0.95 * (len(us) - 1))], 1),
            "max_us": round(us[-1], 1), "n": len(us)}


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import llguidance
        import llguidance.numpy

        self.llg = llguidance
        start = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.tokenizer_s = time.perf_counter() - start
        self.executor = llguidance.LLExecutor(THREADS)
        self.words = (vocab + 31) // 32

    def version(self) -> str:
        from importlib.metadata import version

        return version("llguidance")

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fork(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask: np.ndarray, row: int) -> None:
        self.llg.numpy.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list, bitmask: np.ndarray) -> None:
        self.llg.numpy.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def bitmask(self, rows: int) -> np.ndarray:
        return np.full((rows, self.words), -1, dtype=np.int32)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_dir: Path, vocab: int, eos: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=THREADS)
        self.tokenizer_s = time.perf_counter() - start
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)
        self.vocab = vocab

    def version(self) -> str:
        from importlib.metadata import version

        return version("xgrammar")

    def compile(self, schema: dict):
        self.compiler.clear_cache()  # time a cold compile, as for a schema not seen before
        if schema == JSON_OBJECT:  # strict mode would forbid every property of {"type": "object"}
            compiled = self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False)
        else:
            compiled = self.compiler.compile_json_schema(json.dumps(schema))
        return compiled

    def fork(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)  # a torch tensor: its matcher takes DLPack


def measure_library(lib, encode: Callable[[str], list[int]], eos: int, schema_name: str, schema: dict) -> dict:
    start = time.perf_counter()
    compiled = lib.compile(schema)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = lib.fork(compiled)
    fork_s = time.perf_counter() - start

    # One row: a mask before every token of the document and before EOS; PASSES documents.
    bitmask = lib.bitmask(1)
    samples, first_mask_s, tokens = [], None, 0
    for seed in range(PASSES):
        ids = encode(document(seed)) + [eos]
        tokens += len(ids)
        for i, token in enumerate(ids):
            t = time.perf_counter()
            lib.fill(matcher, bitmask, 0)
            elapsed = time.perf_counter() - t
            if first_mask_s is None:
                first_mask_s = elapsed  # builds the lexer lazily: reported apart
            else:
                samples.append(elapsed)
            lib.accept(matcher, token)
        matcher = lib.fork(compiled)

    result = {"schema": schema_name, "compile_ms": round(compile_s * 1e3, 2), "new_matcher_ms": round(fork_s * 1e3, 3),
              "first_mask_us": round(first_mask_s * 1e6, 1), "document_tokens": round(tokens / PASSES),
              "one_row": _stats_us(samples), "rows": ROWS}
    # 16 rows, 16 documents, stepped together until the shortest ends (all rows busy); PASSES sets.
    for mode in ("sequential", "batch"):
        samples = []
        for p in range(PASSES):
            docs = [encode(document(1000 * (p + 1) + row)) for row in range(ROWS)]
            matchers = [lib.fork(compiled) for _ in range(ROWS)]
            bitmask = lib.bitmask(ROWS)
            for step in range(min(len(d) for d in docs)):
                t = time.perf_counter()
                if mode == "sequential":
                    for row, m in enumerate(matchers):
                        lib.fill(m, bitmask, row)
                else:
                    lib.fill_batch(matchers, bitmask)
                samples.append(time.perf_counter() - t)
                for m, d in zip(matchers, docs):
                    lib.accept(m, d[step])
        result[f"rows_{mode}"] = _stats_us(samples)
    result["python_thread_kept"] = gil_release(lib, compiled, encode)
    return result


def _python_rate(seconds: float, stop: threading.Event | None = None) -> float:
    """Pure-Python loop iterations per second on this thread (needs the GIL throughout)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop and stop.is_set()):
        n += 1
    return n / seconds


def gil_release(lib, compiled, encode, seconds: float = 0.5) -> float:
    """Masks computed one row at a time in a background thread, while this thread runs Python:
    the fraction of its solo loop rate it keeps (near 1: the library does not hold the GIL, so
    the mask can be computed while the model's step runs; near 0.5 or less: it does)."""
    ids = encode(document(0))
    bitmask = lib.bitmask(1)
    stop = threading.Event()

    def work():
        while not stop.is_set():
            matcher = lib.fork(compiled)
            for token in ids:
                if stop.is_set():
                    return
                lib.fill(matcher, bitmask, 0)
                lib.accept(matcher, token)

    kept = []
    for _ in range(3):
        solo = _python_rate(seconds)
        stop.clear()
        thread = threading.Thread(target=work)
        thread.start()
        shared = _python_rate(seconds)
        stop.set()
        thread.join()
        kept.append(shared / solo)
    return round(statistics.median(kept), 2)


def real_masks(lib: Llguidance, encode, eos: int) -> list[np.ndarray]:
    """The bitmasks llguidance computes along document(0), for both schemas: what is applied."""
    masks = []
    for schema in (SCHEMA, JSON_OBJECT):
        matcher, bitmask = lib.compile(schema), lib.bitmask(1)
        for token in encode(document(0)) + [eos]:
            lib.fill(matcher, bitmask, 0)
            masks.append(bitmask[0].copy())
            lib.accept(matcher, token)
    return masks


def apply_costs(vocab: int, masks: list[np.ndarray]) -> dict:
    """Applying each bitmask (32-bit words, bit 1 = allowed, lowest bit first) to a (vocab,)
    float32 logits row in numpy, four ways; the row is refreshed outside the timer."""
    base = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    table = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),
                     np.float32(np.inf), np.float32(-np.inf))  # (256, 8): each byte's 8 bits as +-inf

    def boolean_index(logits, words):
        ok = np.unpackbits(words.view(np.uint8), count=vocab, bitorder="little").view(np.bool_)
        logits[~ok] = -np.inf

    def putmask(logits, words):  # what runtime/grammar.py does
        ok = np.unpackbits(words.view(np.uint8), count=vocab, bitorder="little")
        np.putmask(logits, ok == 0, -np.inf)

    def copyto(logits, words):
        ok = np.unpackbits(words.view(np.uint8), count=vocab, bitorder="little").view(np.bool_)
        np.copyto(logits, np.float32(-np.inf), where=~ok)

    def byte_table_minimum(logits, words):
        np.minimum(logits, table[words.view(np.uint8)].reshape(-1)[:vocab], out=logits)  # no branches

    allowed = [int(np.unpackbits(m.view(np.uint8), count=vocab).sum()) for m in masks]
    out = {"masks": len(masks), "allowed_tokens_median": statistics.median(allowed), "allowed_tokens_max": max(allowed)}
    for name, fn in (("unpackbits + boolean index", boolean_index), ("unpackbits + putmask", putmask),
                     ("unpackbits + copyto(where)", copyto), ("byte table + minimum", byte_table_minimum)):
        samples = []
        for words in masks:
            logits = base.copy()
            t = time.perf_counter()
            fn(logits, words)
            samples.append(time.perf_counter() - t)
        out[name] = _stats_us(samples)
    return out


def measure_llmexport(tokenizer_json: Path, vocab: int, eos: int, encode) -> dict:
    """llmexport.runtime.grammar's public API as the engine calls it: one row's mask_logits
    (mask computed and applied) per token; 16 rows by Grammars.mask_rows and one by one."""
    from llmexport.runtime.grammar import Grammars

    start = time.perf_counter()
    grammars = Grammars(tokenizer_json, vocab, eos_token_ids=[eos])
    out = {"session_setup_ms": round((time.perf_counter() - start) * 1e3, 1)}
    for schema_name, fmt in (("nested", {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}}),
                             ("json_object", {"type": "json_object"})):
        start = time.perf_counter()
        grammars.matcher(fmt)
        first = time.perf_counter() - start
        start = time.perf_counter()
        matcher = grammars.matcher(fmt)
        cached = time.perf_counter() - start
        logits = np.zeros(vocab, dtype=np.float32)
        samples = []
        for token in encode(document(0)) + [eos]:
            logits[:] = 0.0
            t = time.perf_counter()
            matcher.mask_logits(logits)
            samples.append(time.perf_counter() - t)
            matcher.accept(token)
        timed = {}
        for mode in ("mask_rows", "mask_logits"):
            timed[mode] = []
            for p in range(PASSES):
                docs = [encode(document(1000 * (p + 1) + row)) for row in range(ROWS)]
                matchers = [grammars.matcher(fmt) for _ in range(ROWS)]
                rows = np.zeros((ROWS, vocab), dtype=np.float32)
                for step in range(min(len(d) for d in docs)):
                    t = time.perf_counter()
                    if mode == "mask_rows":
                        grammars.mask_rows(matchers, rows)
                    else:
                        for m, row in zip(matchers, rows):
                            m.mask_logits(row)
                    timed[mode].append(time.perf_counter() - t)
                    for m, d in zip(matchers, docs):
                        m.accept(d[step])
        out[schema_name] = {"first_matcher_ms": round(first * 1e3, 2), "cached_matcher_ms": round(cached * 1e3, 3),
                            "mask_logits_one_row": _stats_us(samples[1:]),
                            "mask_rows_16": _stats_us(timed["mask_rows"]),
                            "mask_logits_16_one_by_one": _stats_us(timed["mask_logits"])}
    return out


def run(tokenizer_dir: Path, eos: int) -> dict:
    from tokenizers import Tokenizer

    tokenizer_json = tokenizer_dir / "tokenizer.json"
    hf = Tokenizer.from_file(str(tokenizer_json))
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"] if (
        tokenizer_dir / "config.json").is_file() else hf.get_vocab_size()

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    report = {"tokenizer": str(tokenizer_dir), "vocab": vocab, "eos": eos, "threads_for_batch_calls": THREADS,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (not idle; "
                         f"1-minute load average {os.getloadavg()[0]:.1f} at the start)",
              "libraries": {}}
    libs = [Llguidance(tokenizer_json.read_text(), vocab, eos)]
    try:
        libs.append(Xgrammar(tokenizer_dir, vocab, eos))
    except ImportError as e:  # not a dependency of llmexport: measured when installed
        report["skipped"] = f"xgrammar: {e}"
    for lib in libs:
        rows = [measure_library(lib, encode, eos, name, schema)
                for name, schema in (("nested", SCHEMA), ("json_object", JSON_OBJECT))]
        report["libraries"][lib.name] = {"version": lib.version(), "schemas": rows,
                                         "tokenizer_setup_ms": round(lib.tokenizer_s * 1e3, 1)}
    report["apply_mask_numpy"] = apply_costs(vocab, real_masks(libs[0], encode, eos))
    report["llmexport_runtime_grammar"] = measure_llmexport(tokenizer_json, vocab, eos, encode)
    return report


def markdown(report: dict, command: str) -> str:
    lines = ["# Token-mask cost: llguidance vs xgrammar", "", f"`{command}`", "",
             f"Tokenizer {report['tokenizer']} ({report['vocab']:,}-token vocabulary), EOS {report['eos']}; "
             f"{report['machine']}. Batch calls use {report['threads_for_batch_calls']} threads. "
             "Times are per mask (one row) or per step (16 rows); the document is fed token by token, "
             "a mask computed before each token. New matcher: a fresh one from the compiled grammar "
             "(llguidance: a copy of a fresh matcher). Python thread kept: the share of its solo rate a "
             "pure-Python loop keeps while masks are computed in a background thread (near 1: the library "
             "releases the GIL; the machine's load lowers it too).", "",
             "| library | schema | tokenizer setup ms | compile ms | new matcher ms | first mask us | "
             "1 row median us | 1 row p95 us | 16 rows one by one median us | p95 us | "
             "16 rows batch call median us | p95 us | Python thread kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, lib in report["libraries"].items():
        for r in lib["schemas"]:
            lines.append(f"| {name} {lib['version']} | {r['schema']} ({r['document_tokens']} tokens) | "
                         f"{lib['tokenizer_setup_ms']} | {r['compile_ms']} | {r['new_matcher_ms']} | "
                         f"{r['first_mask_us']} | {r['one_row']['median_us']} | {r['one_row']['p95_us']} | "
                         f"{r['rows_sequential']['median_us']} | {r['rows_sequential']['p95_us']} | "
                         f"{r['rows_batch']['median_us']} | {r['rows_batch']['p95_us']} | {r['python_thread_kept']} |")
    if "skipped" in report:
        lines += ["", f"Skipped: {report['skipped']} (pip install xgrammar to compare)."]
    apply = report["apply_mask_numpy"]
    lines += ["", f"Applying a bitmask to one float32 logits row in numpy ({apply['masks']} masks llguidance computed "
              f"along the document for both schemas; allowed tokens: median {apply['allowed_tokens_median']}, "
              f"max {apply['allowed_tokens_max']:,}):", "", "| method | median us | p95 us |", "|---|---|---|"]
    for method, s in apply.items():
        if isinstance(s, dict):
            lines.append(f"| {method} | {s['median_us']} | {s['p95_us']} |")
    ours = report["llmexport_runtime_grammar"]
    lines += ["", f"llmexport.runtime.grammar (Grammars set up in {ours['session_setup_ms']} ms):", "",
              "| schema | first matcher ms | cached matcher ms | mask_logits 1 row median us | p95 us | "
              "16 rows: mask_rows median us | p95 us | 16 rows: mask_logits one by one median us | p95 us |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ("nested", "json_object"):
        r = ours[name]
        lines.append(f"| {name} | {r['first_matcher_ms']} | {r['cached_matcher_ms']} | "
                     f"{r['mask_logits_one_row']['median_us']} | {r['mask_logits_one_row']['p95_us']} | "
                     f"{r['mask_rows_16']['median_us']} | {r['mask_rows_16']['p95_us']} | "
                     f"{r['mask_logits_16_one_by_one']['median_us']} | {r['mask_logits_16_one_by_one']['p95_us']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="a checkpoint or bundle folder with tokenizer.json")
    parser.add_argument("--eos", type=int, required=True, help="the model's EOS token id")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--name", default="grammar-mask-cpu")
    args = parser.parse_args(argv)
    report = run(args.tokenizer, args.eos)
    command = "python -m llmexport.benchmarks.grammar_mask " + " ".join(sys.argv[1:] if argv is None else argv)
    report["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
