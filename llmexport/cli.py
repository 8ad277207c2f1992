"""The `llmexport` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from llmexport import LLMExportError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Export Llama-family LLMs to ONNX bundles and run them.")
console = Console(width=None if sys.stdout.isatty() else 120)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n > 2**27 else f"{n / 2**20:.2f} MiB"


@app.command()
def models() -> None:
    """List the model presets with parameter counts and weight sizes."""
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
    token_ids: str = typer.Option("1,2,3,4", help="Comma-separated prompt token ids."),
    max_new_tokens: int = typer.Option(16, min=1),
    dtype: str = typer.Option("float32"),
    temperature: float = typer.Option(0.0, min=0.0),
    seed: int = typer.Option(0),
) -> None:
    """Generate with the torch reference model (the oracle for every backend)."""
    from llmexport.model.generate import reference_generate
    from llmexport.model.weights import load_model

    prompt = _parse_ids(token_ids)
    net = load_model(model, dtype=dtype, max_seq_len=len(prompt) + max_new_tokens, seed=seed)
    out = reference_generate(net, [prompt], max_new_tokens, temperature=temperature, seed=seed,
                             eos_token_ids=net.config.eos_token_ids)
    print(json.dumps({"token_ids": out}))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LLMExportError(f"--token-ids {text!r} is not a comma-separated list of integers") from None


def main() -> None:
    """Console entry point: project errors become one line and exit status 1."""
    try:
        app()
    except LLMExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
