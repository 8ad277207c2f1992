"""The `llmexport` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from llmexport import LLMExportError
from llmexport.runtime import defaults

# Plain click help (rich_markup_mode=None): option names are never cut at 80 columns, and help text
# is printed as written (rich markup would eat "[serve]"). Progress displays still use rich.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Export Llama-family LLMs to ONNX bundles and run them.")
console = Console(width=None if sys.stdout.isatty() else 120)


# Reports of `bench`, `bench-serve` and `bench-kernels` go here unless --out says otherwise:
# benchmarks/results holds the committed reports, rewritten only when asked for by name.
BENCH_OUT = Path("bench-results")
BENCH_OUT_HELP = "Directory for the reports (benchmarks/results holds the committed ones)."


def _progress(*, bar: bool = True):
    """A rich progress display on stderr, off when stderr is not a terminal (logs and pipes stay
    clean). bar=False: a spinner and the task's description, for work counted in stages."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = ((TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) if bar
               else (SpinnerColumn(), TextColumn("{task.description}")))
    return Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n > 2**27 else f"{n / 2**20:.2f} MiB"


def _run_report(run, config, write, markdown, out: Path, name: str) -> None:
    """Run a benchmark under a spinner showing its progress, write its reports, print its table."""
    with _progress(bar=False) as status:
        task = status.add_task("benchmarking", total=None)
        result = run(config, progress=lambda message: status.update(task, description=message))
    paths = write(result, out, name)
    console.print(markdown(result))
    console.print("written: " + ", ".join(str(p) for p in paths.values()))


@app.command()
def models() -> None:
    """List the model presets with their sizes."""
    from llmexport.model.presets import PRESETS

    table = Table(box=None)
    for column in ("preset", "type", "layers", "hidden", "heads/kv", "params", "fp32", "fp16/bf16"):
        table.add_column(column, no_wrap=True)
    for name, c in PRESETS.items():
        n = c.num_parameters()
        table.add_row(name, c.model_type, str(c.num_layers), str(c.hidden_size), f"{c.num_heads}/{c.num_kv_heads}",
                      f"{n / 1e9:.2f}B" if n > 1e8 else f"{n / 1e6:.2f}M", _size(c.weight_bytes("float32")),
                      _size(c.weight_bytes("float16")))
    console.print(table)


@app.command()
def reference(
    model: str = typer.Option("tiny-llama", help="Preset name or Hugging Face checkpoint directory."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs the checkpoint's tokenizer.json)."),
    token_ids: Optional[str] = typer.Option(None, help="Comma-separated prompt token ids (default 1,2,3,4)."),
    max_new_tokens: int = typer.Option(16, min=1),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    seed: int = typer.Option(0, min=0),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)."),
) -> None:
    """Generate with the torch reference model, no export.

    The reference is the oracle every backend is compared with."""
    import torch

    from llmexport.model.generate import reference_generate
    from llmexport.model.weights import load_model, open_source
    from llmexport.runtime.tokenizer import Tokenizer

    if prompt is not None and token_ids is not None:
        raise LLMExportError("give either --prompt or --token-ids, not both")
    source = open_source(model, seed)
    tokenizer = Tokenizer(source.tokenizer_file) if source.tokenizer_file else None
    if prompt is not None:
        if tokenizer is None:
            raise LLMExportError(f"{model} has no tokenizer.json; pass --token-ids instead of --prompt")
        ids = tokenizer.encode(prompt)
    else:
        ids = _parse_ids(token_ids or "1,2,3,4")
    if threads:
        torch.set_num_threads(threads)
    net = load_model(source, dtype=dtype, max_seq_len=min(len(ids) + max_new_tokens,
                                                          source.config.max_position_embeddings))
    out = reference_generate(net, [ids], max_new_tokens, temperature=temperature, seed=seed,
                             eos_token_ids=net.config.eos_token_ids)
    result = {"token_ids": out}
    if tokenizer is not None:
        result["text"] = [tokenizer.decode(t) for t in out]
    print(json.dumps(result, ensure_ascii=False))


@app.command()
def onnx(
    model: str = typer.Option("tiny-llama", help="Preset name or Hugging Face checkpoint directory."),
    out: Path = typer.Option(..., help="Bundle directory to create."),
    target: str = typer.Option("ort", help="ort (ONNX Runtime fused ops), portable (standard ONNX ops only) or "
                                          "tensorrt (one plugin node per layer's attention)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache capacity (default: min(model limit, 4096))."),
    max_batch: int = typer.Option(8, help="Largest batch the runtime will run."),
    seed: int = typer.Option(0, min=0, help="Seed of a preset's random weights."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    quant: str = typer.Option("none", help="Weight-only quantization of the linear layers: none, int8 or int4."),
    quant_block: int = typer.Option(32, help="Weights per scale along each row (power of two >= 16)."),
    quant_asymmetric: Optional[bool] = typer.Option(
        None, "--quant-asymmetric/--quant-symmetric",
        help="Per-block offsets (asymmetric) or not. Default: int4 asymmetric, int8 symmetric."),
    quant_head: str = typer.Option("int8", help="Bits of the embedding table and LM head: int8 or int4."),
    quant_skip: str = typer.Option("", help="Comma-separated: lm_head and/or embed kept in float."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits compute: 4 int8 (fast on CPU), 1 float32, 0 default."),
    quant_search: Optional[bool] = typer.Option(
        None, "--quant-search/--quant-no-search",
        help="Search each block's grid for the least error (slower export). Default: on for asymmetric int4."),
    quant_zero_point: str = typer.Option("float", help="Asymmetric blocks' offset: float, or uint8 (a zero point "
                                                       "in MatMulNBits' packed kernel)."),
) -> None:
    """Export a model to a bundle of ONNX graphs.

    Prefill and decode graphs share one weight file; the bundle directory also holds the manifest
    and the checkpoint's tokenizer and chat files."""
    from llmexport.exporter.export import export_bundle
    from llmexport.exporter.quantize import QuantConfig

    quant_config = None if quant == "none" else QuantConfig(
        quant, quant_block, None if quant_asymmetric is None else not quant_asymmetric, accuracy_level,
        frozenset(filter(None, quant_skip.split(","))), quant_head, quant_search, quant_zero_point)

    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task({"trace": "tracing graphs", "weights": "writing tensors",
                                             "optimize": "optimising and checking"}[stage], total=total)
            bar.update(tasks[stage], completed=done, total=total)

        path = export_bundle(model, out, target=target, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                             force=force, seed=seed, quant=quant_config, progress=progress)
    console.print(f"bundle written to {path}")


@app.command()
def verify(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    prompts: int = typer.Option(8, min=1, help="Random prompts to compare."),
    decode_steps: int = typer.Option(16, min=0, help="Teacher-forced decode steps after each prompt."),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("cpu", help="ONNX Runtime device: cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for each side (default: all cores)."),
    model: Optional[str] = typer.Option(None, help="Preset or checkpoint the bundle was exported from: the "
                                                   "reference runs its weights instead of the bundle's."),
    bisect: bool = typer.Option(False, "--bisect", help="Always compare layer by layer (done anyway when "
                                                        "outputs disagree)."),
    integrity: bool = typer.Option(False, "--integrity", help="Only check every file's sha256 against the manifest "
                                                              "(no torch, no graphs run); exits 1 naming each "
                                                              "modified file and chunk."),
    workers: Optional[int] = typer.Option(None, min=1, help="Hashing threads for --integrity (default: up to 8)."),
) -> None:
    """Check a bundle's graphs against the torch reference.

    Runs them in ONNX Runtime beside the reference and judges every output against its dtype's
    tolerance; exits 1 past tolerance or on any NaN/Inf."""
    if integrity:
        _check_integrity(bundle, workers)
        return
    from llmexport.exporter.verify import reference_source, verify_bundle

    source = reference_source(bundle, model) if model else None
    with _progress() as bar:
        task = bar.add_task("verifying (prefill and decode steps, both sides)", total=None)
        report = verify_bundle(bundle, prompts=prompts, decode_steps=decode_steps, seed=seed, device=device,
                               threads=threads, source=source,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"{report.bundle}: {report.target} {report.dtype}, {report.prompts} prompts, "
                        f"{report.decode_steps} decode steps", box=None)
    for column in ("output", "max abs", "max scaled", "p99 scaled", "tolerance", "top-1", "NaN/Inf", "ok"):
        table.add_column(column, no_wrap=True)
    for r in report.rows:
        table.add_row(r.output, f"{r.max_abs:.3g}", f"{r.max_scaled:.3g}", f"{r.p99_scaled:.3g}", f"{r.tolerance:.3g}",
                      "-" if r.top1 is None else f"{r.top1:.4f}", str(r.nonfinite), "yes" if r.ok else "NO")
    console.print(table)
    if bisect or not report.ok:
        _print_bisect(bundle, source, seed, threads)
    if not report.ok:
        raise LLMExportError("verification failed: errors above the tolerance for " + report.dtype)


def _check_integrity(bundle: Path, workers: Optional[int]) -> None:
    import time

    from llmexport.runtime.bundle import Bundle

    start = time.perf_counter()
    opened = Bundle.open(bundle)
    files = opened.manifest.integrity.files
    with _progress(bar=False) as spinner:
        spinner.add_task(f"hashing {len(files)} files", total=None)
        opened.check_integrity(workers)
    total = sum(f.bytes for f in files.values())
    console.print(f"{bundle}: {len(files)} files, {total / 2**30:.2f} GiB, every sha256 matches "
                  f"({time.perf_counter() - start:.1f} s)")


def _print_bisect(bundle: Path, source, seed: int, threads: Optional[int]) -> None:
    from llmexport.exporter.bisect import bisect_bundle

    with _progress(bar=False) as spinner:
        spinner.add_task("bisect: comparing layer by layer", total=None)
        report = bisect_bundle(bundle, source=source, seed=seed, threads=threads)
    table = Table(title=f"bisect: one {report.tokens}-token prompt, prefill, layer by layer "
                        f"(worst probe of each; tolerance {report.tolerance:.3g})", box=None)
    for column in ("layer", "worst probe", "max |ref|", "max |onnx|", "max scaled", "NaN/Inf", "status"):
        table.add_column(column, no_wrap=True)

    def row(layer, p):
        status = "DIVERGES" if p.diverges else "ok"
        status += ", OVERFLOW" if p.overflow else ""
        table.add_row(layer, p.label, f"{p.max_ref:.3g}", f"{p.max_onnx:.3g}", f"{p.scaled:.3g}", str(p.nonfinite),
                      status)

    for layer, worst in report.layers():
        row(layer, worst)
    console.print(table)
    first = report.first_divergence
    if first:
        console.print(f"first divergence: layer {first.layer}, at {first.label} (max scaled error {first.scaled:.3g} "
                      f"> {report.tolerance:.3g}); probes of that layer:")
        for p in report.probes:
            if p.layer == first.layer:
                console.print(f"  {p.label:50} max scaled {p.scaled:.3g}{'  <- diverges' if p.diverges else ''}")
    else:
        console.print("bisect: every probe within tolerance")
    if report.first_overflow:
        o = report.first_overflow
        console.print(f"overflow: first at layer {o.layer}, {o.label} (max |x| {o.max_onnx:.3g}, {o.nonfinite} "
                      f"NaN/Inf; float16 tops out at 65504)")


def _check_chat(session, bundle: Path) -> None:
    """Chat needs a tokenizer and a chat template; say which is missing and what works instead."""
    if session.tokenizer is None:
        raise LLMExportError(f"{bundle} has no tokenizer (a preset's bundle has none), so it cannot chat; "
                             f"export a checkpoint directory that has tokenizer.json and a chat template, e.g. one "
                             f"made by examples/convert_gguf.py --smollm2, or give token ids: llmexport generate "
                             f"--bundle {bundle} --token-ids 1,2,3")
    try:
        session.chat_template  # noqa: B018  (reads the template, or fails if the bundle has none)
    except LLMExportError as e:
        if "no chat template" not in str(e):  # a template that is there but broken keeps its own message
            raise
        raise LLMExportError(f"{bundle} has no chat template (its checkpoint had no chat_template.jinja or "
                             f"tokenizer_config.json chat_template), so it cannot chat; give the prompt as plain "
                             f"text: llmexport generate --bundle {bundle} --prompt TEXT") from None


def _sampling(session, **given):
    """The bundle's generation defaults, overridden by the options the user gave (None: not given)."""
    return session.default_params(**{k: v for k, v in given.items() if v is not None})


SPECULATIVE_HELP = ("Speculative decoding: ngram (prompt lookup) or draft (with --draft): the same tokens, fewer "
                    "passes where output repeats input.")


def _speculative_option():
    return typer.Option(None, help=SPECULATIVE_HELP)


def _draft_option():
    return typer.Option(None, help="Draft bundle for --speculative draft (a smaller model, same tokenizer).")


def _speculative_tokens_option():
    return typer.Option(defaults.SPECULATIVE_TOKENS, min=1, max=32, help="Proposals verified per call.")


@app.command()
def generate(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    prompt: list[str] = typer.Option([], help="Prompt text (repeat for a batch); needs the bundle's tokenizer. "
                                              "Use $'...\\n...' in bash for newlines."),
    token_ids: list[str] = typer.Option([], help="Prompt as comma-separated token ids (repeat for a batch)."),
    chat: Optional[str] = typer.Option(None, help="A user message, rendered with the bundle's chat template."),
    system: Optional[str] = typer.Option(None, help="System message for --chat."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Default: generation_config.json's, else 64."),
    temperature: Optional[float] = typer.Option(None, help="0 is greedy. Default: generation_config.json's, else 0."),
    top_k: Optional[int] = typer.Option(None, help="Sample from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Sample from the smallest set of tokens holding this mass."),
    repetition_penalty: Optional[float] = typer.Option(None, help="Above 1 makes tokens already seen less "
                                                                  "likely."),
    seed: int = typer.Option(0, min=0),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or torch."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores)."),
    check_integrity: bool = typer.Option(False, "--check-integrity",
                                         help="Hash every bundle file against its manifest first."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON result instead of streaming text."),
    speculative: Optional[str] = _speculative_option(),
    speculative_tokens: int = _speculative_tokens_option(),
    draft: Optional[Path] = _draft_option(),
) -> None:
    """Generate from a bundle, streaming text as it comes."""
    from llmexport.runtime.session import Session

    prompts: list = [*prompt, *(_parse_ids(t) for t in token_ids)]
    if chat is not None and prompts:
        raise LLMExportError("give either --chat or --prompt/--token-ids, not both")
    if system is not None and chat is None:
        raise LLMExportError("--system needs --chat")
    if not prompts and chat is None:
        raise LLMExportError("give a --prompt, --token-ids or --chat")
    with Session(bundle, backend=backend, device=device, threads=threads, check_integrity=check_integrity,
                 speculative=speculative, speculative_tokens=speculative_tokens, draft=draft) as session:
        params = _sampling(session, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop) or None,
                           ignore_eos=ignore_eos or None)
        if chat is not None:
            _check_chat(session, bundle)
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            prompts = [session.render_chat(messages + [{"role": "user", "content": chat}])]
        if json_output:
            print(json.dumps(session.generate(prompts, params).to_dict()))
            return
        result = {"token_ids": [[] for _ in prompts]}
        for event in session.stream(prompts, params):
            result["token_ids"][event.index].append(event.token_id)
            if len(prompts) == 1 and session.tokenizer:
                print(event.text, end="", flush=True)
        if len(prompts) > 1 or not session.tokenizer:
            for ids in result["token_ids"]:
                print(" ".join(map(str, ids)))
        else:
            print()


@app.command("eval")
def eval_command(
    bundle: Path = typer.Option(..., help="Bundle directory (with a tokenizer)."),
    text: Path = typer.Option(..., help="UTF-8 text file to score."),
    max_tokens: Optional[int] = typer.Option(None, min=2, help="Score only the first N tokens of the text."),
    window: Optional[int] = typer.Option(None, min=2, help="Tokens per window (default: the bundle's max_seq_len)."),
    backend: Optional[str] = typer.Option(None, help="onnxruntime (default) or torch (the reference on the "
                                                     "bundle's own, possibly dequantized, weights)."),
    model: Optional[str] = typer.Option(None, help="Score the checkpoint or preset the bundle was exported from "
                                                   "instead (torch reference, float32): the unquantized baseline."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores)."),
) -> None:
    """Perplexity of a bundle over a text file.

    The text is cut into non-overlapping windows of at most max_seq_len tokens."""
    from llmexport.runtime.evaluate import perplexity
    from llmexport.runtime.session import Session

    reference = None
    if model is not None:
        from llmexport.exporter.verify import reference_source

        reference = reference_source(bundle, model)
    backend = backend or ("torch" if model is not None else "onnxruntime")

    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LLMExportError(f"cannot read --text {text}: {e}; pass a UTF-8 text file") from None
    with Session(bundle, backend=backend, device=device, threads=threads, reference=reference) as session:
        if session.tokenizer is None:
            raise LLMExportError(f"{bundle} has no tokenizer (a preset's bundle has none), so eval cannot read text; "
                                 f"export a checkpoint directory that has tokenizer.json, e.g. one made by "
                                 f"examples/convert_gguf.py --smollm2, and eval that bundle")
        ids = session.tokenizer.encode(content)[:max_tokens]
        with _progress() as bar:
            task = bar.add_task("scoring tokens", total=None)
            result = perplexity(session, ids, window,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}) over {result.tokens_scored} "
                  f"tokens in {result.windows} windows of {result.window}, {result.seconds:.1f} s, {backend}"
                  + (f" on --model {model}" if model else ""))


@app.command("chat")
def chat_command(
    bundle: Path = typer.Option(..., help="Bundle directory (with a tokenizer and chat template)."),
    system: Optional[str] = typer.Option(None, help="System message."),
    max_new_tokens: int = typer.Option(512, help="Per reply."),
    temperature: Optional[float] = typer.Option(None, help="Default: generation_config.json's, else 0 (greedy)."),
    top_p: Optional[float] = typer.Option(None),
    seed: int = typer.Option(0, min=0),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or torch."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores)."),
    check_integrity: bool = typer.Option(False, "--check-integrity",
                                         help="Hash every bundle file against its manifest first."),
    speculative: Optional[str] = _speculative_option(),
    speculative_tokens: int = _speculative_tokens_option(),
    draft: Optional[Path] = _draft_option(),
) -> None:
    """Interactive multi-turn chat with a bundle.

    Type a message, Enter sends it; /reset forgets the conversation, /exit or Ctrl-D ends. Reads
    plain lines from a pipe too."""
    from llmexport.runtime.chat_repl import chat_repl
    from llmexport.runtime.session import Session

    with Session(bundle, backend=backend, device=device, threads=threads, check_integrity=check_integrity,
                 speculative=speculative, speculative_tokens=speculative_tokens, draft=draft) as session:
        _check_chat(session, bundle)
        chat_repl(session, _sampling(session, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed), system)


@app.command()
def build(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    backend: str = typer.Option("tensorrt", help="Engine to build: tensorrt."),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimisation level, 0..5."),
    workspace_gib: int = typer.Option(8, min=1),
    plugin_library: Optional[Path] = typer.Option(None, help="Shared library with the LlmexportAttention plugin."),
) -> None:
    """Build a TensorRT engine from a bundle (untested).

    The engine is recorded in the bundle's manifest."""
    if backend != "tensorrt":
        raise LLMExportError(f"build --backend {backend} is not available: only --backend tensorrt builds an "
                             f"engine; onnxruntime needs no build step (it optimises the graphs when a session "
                             f"loads them), so run the bundle as it is: llmexport generate --bundle {bundle} ...")
    from llmexport.exporter.tensorrt_build import build_tensorrt

    path = build_tensorrt(bundle, optimization_level=optimization_level, workspace_gib=workspace_gib,
                          plugin_library=plugin_library)
    console.print(f"engine written to {path}")


@app.command()
def bench(
    model: str = typer.Option("tiny-llama", help="Preset or checkpoint to export and measure."),
    bundle: Optional[Path] = typer.Option(None, help="Measure an existing bundle instead of exporting one."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    target: str = typer.Option("ort", help="ort, portable or tensorrt."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    prompt_lens: Optional[str] = typer.Option(None, help="Prompt lengths for time to first token (default: "
                                                         "128,512,2048, those the model holds)."),
    batches: str = typer.Option("1,8,32", help="Batch sizes for decode latency."),
    decode_context: int = typer.Option(128, help="Prompt length before the timed decode steps."),
    warmup: int = typer.Option(2, min=0),
    repeats: int = typer.Option(5, min=1),
    out: Path = typer.Option(BENCH_OUT, help=BENCH_OUT_HELP),
    name: Optional[str] = typer.Option(None, help="Report file name: NAME.json, .md and .png (default: "
                                                  "MODEL-DTYPE-DEVICE, or BUNDLE_DIR_NAME-DEVICE with --bundle)."),
    workdir: Path = typer.Option(Path("bench-work"), help="Where the exported bundle goes."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for every system measured (default: each "
                                                            "library's own, usually every core)."),
    quant: str = typer.Option("", help="Comma-separated quantized variants to export and measure too: int8, int4, "
                                       "with optional +sym +asym +zp8 +search +head4 +head8 (e.g. int4+zp8+head4)."),
    genai: str = typer.Option("", help="Comma-separated onnxruntime-genai rows: int4,fp32 build from --model (a "
                                       "checkpoint directory) with its builder; bundle runs its runtime on this "
                                       "benchmark's own ort bundles (their genai.onnx)."),
    genai_python: Optional[str] = typer.Option(None, help="Python with onnxruntime-genai (default: this one)."),
) -> None:
    """Benchmark every backend on the same work.

    Time to first token, decode latency and tokens/s against eager torch, with the memory
    bandwidth floor beside each figure."""
    from llmexport.benchmarks.report import check_name, default_name, markdown, write_reports
    from llmexport.benchmarks.suite import BenchConfig, default_prompt_lens, model_limit, run_benchmark

    name = check_name(name or default_name(model, bundle, dtype, device))  # before the work, not after it
    if prompt_lens is None:  # the default work fits every model, the tiny presets' 256 positions too
        from llmexport.runtime.bundle import Bundle

        limit = Bundle.open(bundle).max_seq_len if bundle else model_limit(model)
        lens = default_prompt_lens(limit)
    else:
        lens = _ints(prompt_lens)
    config = BenchConfig(model=model, dtype=dtype, target=target, device=device, prompt_lens=lens,
                         batches=_ints(batches), decode_context=decode_context, warmup=warmup, repeats=repeats,
                         bundle=str(bundle) if bundle else None, workdir=str(workdir), threads=threads,
                         quants=_variants(quant),
                         genai=_names(genai, ("int4", "fp32", "bundle"), "--genai"), genai_python=genai_python)
    _run_report(run_benchmark, config, write_reports, markdown, out, name)


@app.command("bench-serve")
def bench_serve(
    bundle: Path = typer.Option(..., help="Bundle to serve (export it first, e.g. with --max-batch 16)."),
    clients: str = typer.Option("1,4,8,16", help="Concurrent streaming clients, one run each (1: one request "
                                                 "after another, the baseline)."),
    requests: int = typer.Option(32, min=1, help="Requests in the workload (the same for every client count)."),
    prompt_tokens: str = typer.Option("16,128", help="Prompt lengths: uniform between these two."),
    max_tokens: int = typer.Option(64, min=1, help="New tokens per request (greedy, EOS ignored)."),
    threads: int = typer.Option(2, min=1, help="The server's CPU threads."),
    prefill_chunk: int = typer.Option(defaults.PREFILL_CHUNK, min=1, help="The server's --prefill-chunk."),
    prefill_stall: float = typer.Option(defaults.PREFILL_STALL, min=0.01, help="The server's --prefill-stall."),
    host_batch: int = typer.Option(16, min=1, help="Batch for the host-work-per-decode-step table."),
    ray_replicas: str = typer.Option("", help="Also `llmexport serve --ray` with each of these replica counts "
                                              "(e.g. 1,2), the threads split among the replicas."),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(BENCH_OUT, help=BENCH_OUT_HELP),
    name: Optional[str] = typer.Option(None, help="Report file name: NAME.json, .md and .png (default: "
                                                  "BUNDLE_DIR_NAME-serve)."),
) -> None:
    """Benchmark `llmexport serve` with concurrent clients.

    N streaming clients on one fixed workload: tokens/s, time to first token and inter-token
    latency p50/p99, against the same requests one after another."""
    from llmexport.benchmarks.report import check_name
    from llmexport.benchmarks.serving import ServeBenchConfig, markdown, run_serve_benchmark, write

    name = check_name(name or f"{bundle.resolve().name}-serve")  # before the work, not after it
    low_high = _ints(prompt_tokens)
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        raise LLMExportError(f"--prompt-tokens {prompt_tokens!r} must be two lengths LOW,HIGH with LOW <= HIGH")
    config = ServeBenchConfig(bundle=str(bundle), clients=_ints(clients), requests=requests,
                              prompt_tokens=(low_high[0], low_high[1]), max_tokens=max_tokens, threads=threads,
                              seed=seed, host_batch=host_batch, prefill_chunk=prefill_chunk,
                              prefill_stall=prefill_stall, ray_replicas=_ints(ray_replicas) if ray_replicas else (),
                              command="llmexport " + " ".join(sys.argv[1:]))
    _run_report(run_serve_benchmark, config, write, markdown, out, name)


@app.command("bench-reuse")
def bench_reuse(
    bundle: Path = typer.Option(..., help="Bundle with a chat template, max_seq_len >= 2048 and max_batch >= 16 "
                                          "for the defaults."),
    threads: int = typer.Option(2, min=1, help="CPU threads."),
    system_tokens: int = typer.Option(1000, min=1, help="Length of the shared system prompt."),
    turns: int = typer.Option(6, min=2, help="Turns of the chat."),
    clients: int = typer.Option(8, min=1, help="Requests arriving together that share the system prompt."),
    host_batch: int = typer.Option(16, min=1, help="Batch for the host work with a JSON-schema mask."),
    out: Path = typer.Option(BENCH_OUT, help=BENCH_OUT_HELP),
    name: Optional[str] = typer.Option(None, help="Report file name (default: BUNDLE_DIR_NAME-reuse)."),
) -> None:
    """Measure what prompt reuse saves.

    With reuse on and off in one run: time to first token of each turn of a multi-turn chat;
    prompt tokens computed for clients sharing a system prompt; host work per decode step with a
    JSON-schema mask."""
    from llmexport.benchmarks.prompt_reuse import ReuseBenchConfig, markdown, run_reuse_benchmark, write
    from llmexport.benchmarks.report import check_name

    name = check_name(name or f"{bundle.resolve().name}-reuse")
    config = ReuseBenchConfig(str(bundle), threads, system_tokens, turns, clients=clients, host_batch=host_batch,
                              command="llmexport " + " ".join(sys.argv[1:]))
    _run_report(run_reuse_benchmark, config, write, markdown, out, name)


@app.command("bench-speculative")
def bench_speculative(
    bundle: Path = typer.Option(..., help="Bundle with a chat template and max_seq_len >= 2048 (the code prompts "
                                          "are up to 1,000 tokens)."),
    threads: int = typer.Option(2, min=1, help="CPU threads."),
    tokens: int = typer.Option(defaults.SPECULATIVE_TOKENS, min=1, max=32, help="Proposals per verification."),
    prompts: int = typer.Option(10, min=1, max=10, help="Prompts per workload."),
    out: Path = typer.Option(BENCH_OUT, help=BENCH_OUT_HELP),
    name: Optional[str] = typer.Option(None, help="Report file name (default: BUNDLE_DIR_NAME-speculative)."),
) -> None:
    """Measure speculative decoding against plain decoding.

    Batch 1, greedy, prompt lookup: decode tokens/s on a code-edit workload and on stories,
    with the acceptance rate and a check that the outputs are identical."""
    from llmexport.benchmarks.report import check_name
    from llmexport.benchmarks.speculative import SpeculativeBenchConfig, markdown, run_speculative_benchmark, write

    name = check_name(name or f"{bundle.resolve().name}-speculative")
    config = SpeculativeBenchConfig(str(bundle), threads, tokens, prompts=prompts,
                                    command="llmexport " + " ".join(sys.argv[1:]))
    _run_report(run_speculative_benchmark, config, write, markdown, out, name)


@app.command("bench-kernels")
def bench_kernels(
    device: str = typer.Option("cuda", help="cuda (meaningful timings) or cpu (needs TRITON_INTERPRET=1)."),
    lengths: str = typer.Option("128,1024,4096", help="Comma-separated cache lengths."),
    batches: str = typer.Option("1,16", help="Comma-separated batch sizes."),
    dtypes: str = typer.Option("float16,bfloat16", help="Comma-separated: float16, bfloat16, float32."),
    repeats: int = typer.Option(20, min=1),
    out: Path = typer.Option(BENCH_OUT, help="Directory for kernels-DEVICE.json and .md (benchmarks/results holds "
                                             "the committed ones)."),
) -> None:
    """Check and time the Triton attention kernel (GPU).

    Against the reference math and torch's scaled_dot_product_attention."""
    from llmexport.benchmarks.kernels import kernel_report, markdown

    report = kernel_report(device, _ints(lengths), _ints(batches), dtypes=tuple(dtypes.split(",")), repeats=repeats)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels-{device}.json").write_text(json.dumps(report, indent=2))
    (out / f"kernels-{device}.md").write_text(markdown(report))
    console.print(markdown(report))


@app.command()
def serve(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(defaults.SERVE_PORT, min=0, max=65535),
    max_queue: int = typer.Option(defaults.SERVE_MAX_QUEUE, min=0,
                                  help="Waiting requests beyond which new ones get 429 at once."),
    prefill_chunk: int = typer.Option(defaults.PREFILL_CHUNK, min=1,
                                      help="At most this many prompt tokens prefilled per iteration while others "
                                           "decode."),
    prefill_stall: float = typer.Option(defaults.PREFILL_STALL, min=0.01,
                                        help="And about as many as take this many decode steps' time (inter-token "
                                             "latency vs time to first token)."),
    prompt_reuse: bool = typer.Option(defaults.PROMPT_REUSE, "--prompt-reuse/--no-prompt-reuse",
                                      help="Keep finished requests' KV rows for prompts that start the same way."),
    speculative: Optional[str] = _speculative_option(),
    speculative_tokens: int = _speculative_tokens_option(),
    draft: Optional[Path] = _draft_option(),
    model_name: Optional[str] = typer.Option(None, help="The model id clients pass (default: the bundle's model)."),
    shutdown_timeout: float = typer.Option(30.0, min=0, help="On SIGTERM, seconds in-flight requests get to finish."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or torch."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: all cores; with --ray: the "
                                                           "replica's --replica-cpus)."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve replicas, each an engine over the bundle "
                                                  "(pip install -e '.[ray]')."),
    replicas: Optional[int] = typer.Option(None, min=1, help="With --ray: this many replicas (default 1)."),
    min_replicas: Optional[int] = typer.Option(None, min=0, help="With --ray: autoscale from this many replicas..."),
    max_replicas: Optional[int] = typer.Option(None, min=1, help="...to this many, on ongoing requests per replica."),
    replica_cpus: float = typer.Option(1.0, min=0.01, help="With --ray: CPUs Ray gives each replica (its threads)."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: join this Ray cluster ('auto' or HOST:PORT) "
                                                         "instead of starting a local Ray instance."),
    emit_kuberay: Optional[Path] = typer.Option(None, help="With --ray: write a KubeRay RayService manifest for "
                                                           "this bundle to this file and exit."),
) -> None:
    """Serve a bundle over OpenAI-compatible HTTP.

    /v1/completions, /v1/chat/completions (stream: SSE), /v1/models, /health, /metrics
    (Prometheus). Needs FastAPI and uvicorn: pip install -e '.[serve]' in the checkout.
    --ray serves the same app on Ray Serve replicas (pip install -e '.[ray]')."""
    from llmexport.runtime.serve import serve as run

    ray_flags = {"--replicas": replicas, "--min-replicas": min_replicas, "--max-replicas": max_replicas,
                 "--ray-address": ray_address, "--emit-kuberay": emit_kuberay}
    if not ray and any(v is not None for v in ray_flags.values()):
        used = ", ".join(k for k, v in ray_flags.items() if v is not None)
        raise LLMExportError(f"{used} work with --ray: add --ray, or leave them out to serve in this process")
    session = dict(backend=backend, device=device, max_queue=max_queue, prefill_chunk=prefill_chunk,
                   prefill_stall=prefill_stall, prompt_reuse=prompt_reuse, speculative=speculative,
                   speculative_tokens=speculative_tokens, draft=str(draft) if draft else None)
    if ray and emit_kuberay is not None:
        from llmexport.runtime.serve.kuberay import write_rayservice

        write_rayservice(emit_kuberay, str(bundle), port=port, replicas=replicas, min_replicas=min_replicas,
                         max_replicas=max_replicas, replica_cpus=replica_cpus, model_name=model_name, session=session)
        print(f"RayService manifest written to {emit_kuberay} (untested on a Kubernetes cluster)")
        return
    if ray:
        from llmexport.runtime.serve import serve_on_ray

        if threads is not None:
            raise LLMExportError("--threads is set per replica by --replica-cpus under --ray; leave --threads out")
        print(f"starting Ray Serve replicas of {bundle} ...", file=sys.stderr, flush=True)
        serve_on_ray(str(bundle), host, port, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                     replica_cpus=replica_cpus, ray_address=ray_address, model_name=model_name,
                     ready=lambda url: print(f"serving {bundle} on {url} with Ray Serve (Ctrl-C or SIGTERM stops)",
                                             file=sys.stderr, flush=True), **session)
        return
    print(f"serving {bundle} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
    run(str(bundle), host, port, backend=backend, device=device, threads=threads, max_queue=max_queue,
        prefill_chunk=prefill_chunk, prefill_stall=prefill_stall, prompt_reuse=prompt_reuse, speculative=speculative,
        speculative_tokens=speculative_tokens, draft=str(draft) if draft else None, model_name=model_name,
        shutdown_timeout=shutdown_timeout)


@app.command()
def doctor(
    device: str = typer.Option("cpu", help="cpu, or cuda: exit 1 unless everything a GPU run needs is ok."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
) -> None:
    """Check what this machine can run.

    Python, onnxruntime and its providers, GPU, CUDA/cuDNN, torch, TensorRT, Triton,
    onnxruntime-genai: one line per check with ok / missing / fail and why."""
    from llmexport.runtime.doctor import failures, render, run_checks

    if device not in ("cpu", "cuda"):
        raise LLMExportError(f"unknown --device {device!r}; use cpu or cuda")
    checks = run_checks()
    failed = failures(checks, device)
    if as_json:
        print(json.dumps({"device": device, "ok": not failed, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        print(render(checks))  # plain: one unwrapped line per check
        if failed:
            print(f"--device {device}: not ready ({', '.join(c.name for c in failed)})")
    if failed:
        raise typer.Exit(1)


def _variants(text: str) -> tuple[str, ...]:
    from llmexport.benchmarks.suite import quant_flags

    names = tuple(filter(None, text.split(",")))
    for name in names:
        quant_flags(name)  # a clear error now, not after the first export
    return names


def _names(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(filter(None, text.split(",")))
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise LLMExportError(f"{flag} {','.join(unknown)}: choose from {', '.join(allowed)}")
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise LLMExportError(f"{text!r} is not a comma-separated list of positive integers")
    return values


capi = typer.Typer(help="The C API: libllmexport.so and llmexport.h.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(capi, name="capi")


@capi.command("build")
def capi_build(out: Path = typer.Option(..., help="Directory for include/llmexport.h and lib/ (libllmexport.so "
                                                   "and the onnxruntime-genai and ONNX Runtime libraries it loads).")
               ) -> None:
    """Compile the C API library (no Python inside) and gather the libraries a service ships."""
    from llmexport.runtime.capi import build_library, shipped_files

    build_library(out)
    files = "\n".join(f"  {p.name:<26} {size:>12,} bytes" for p, size in shipped_files(out))
    console.print(f"header {out / 'include' / 'llmexport.h'}\nship {out / 'lib'} (with the bundle):\n{files}\n"
                  f"link with: -I{out}/include -L{out}/lib -lllmexport -Wl,-rpath,{out.resolve()}/lib",
                  highlight=False)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LLMExportError(f"--token-ids {text!r} is not a comma-separated list of integers") from None


BUG_EXIT = 70  # EX_SOFTWARE: an internal error, not the user's


def _crash_report() -> Path:
    """Write the current exception's traceback and the command line to a file; returns its path."""
    import tempfile
    import time
    import traceback

    text = f"llmexport {__import__('llmexport').__version__}\ncommand: {sys.argv!r}\n\n{traceback.format_exc()}"
    name = f"llmexport-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (Path.home() / ".cache" / "llmexport", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(could not be written)")


def main() -> None:
    """Console entry point: project errors become one line and exit status 1; anything else is a
    bug, reported in one line naming the file that holds its traceback (exit status 70)."""
    try:
        app()
    except LLMExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001  (the last line of defence: never a traceback)
        report = _crash_report()
        print(f"error: internal error ({type(e).__name__}: {str(e)[:200]}); this is a bug in llmexport, please "
              f"report it with {report}", file=sys.stderr)
        sys.exit(BUG_EXIT)
