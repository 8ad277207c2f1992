"""`llmexport bench-speculative`: decode tokens/s with speculative decoding (prompt lookup)
against plain decoding, batch 1, greedy, in one run on one bundle.

Workloads (benchmarks/data/):
- code edit: 10 functions of 40-80 lines from CPython's standard library
  (`code-edit-functions.json`), each given to the model with the request to return it with the
  function renamed and nothing else changed: the answer copies most of the prompt, where prompt
  lookup pays;
- stories: 10 requests for short stories (`story-prompts.txt`): little to copy, where
  speculation must not cost (the measured-cost switch falls back to plain decoding).

Each prompt runs with speculation off, then on (two sessions open side by side, so a drifting
load weighs on both); greedy outputs must be identical (counted).
Decode tokens/s is (tokens - 1) / (time from the first token to the last), per prompt; the
table gives the medians and the ratio of summed tokens over summed decode time.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .report import save_figure, write_reports
from .suite import _hardware, _versions

DATA = Path(__file__).parent / "data"


@dataclass
class SpeculativeBenchConfig:
    bundle: str
    threads: int = 2
    tokens: int = 5  # proposals per verification
    code_tokens: int = 200  # new tokens per code prompt
    story_tokens: int = 128
    prompts: int = 10
    command: str = ""


def code_prompts(n: int) -> list[list[dict]]:
    functions = json.loads((DATA / "code-edit-functions.json").read_text())[:n]
    return [[{"role": "user", "content": f"Rename the function `{f['function']}` to `{f['function']}_v2` and change "
                                         f"nothing else. Reply with the whole function in a Python code block and "
                                         f"nothing else.\n\n```python\n{f['code']}\n```"}] for f in functions]


def story_prompts(n: int) -> list[list[dict]]:
    lines = [line.strip() for line in (DATA / "story-prompts.txt").read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": line}] for line in lines[:n]]


def _run(session, conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    from llmexport.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens)
    rows = []
    for messages in conversations:
        ids = session.render_chat(messages)
        stats = dict(session.engine.stats)
        times, tokens = [], []
        for event in session.stream([ids], params):
            if event.token_id is not None:
                times.append(time.perf_counter())
                tokens.append(event.token_id)
        after = session.engine.stats
        rows.append({"prompt_tokens": len(ids), "tokens": tokens, "decode_s": times[-1] - times[0],
                     "decode_tokens_per_s": (len(tokens) - 1) / (times[-1] - times[0]) if len(tokens) > 1 else None,
                     "proposed": after["proposed_tokens"] - stats["proposed_tokens"],
                     "accepted": after["accepted_tokens"] - stats["accepted_tokens"],
                     "verifications": after["speculative_calls"] - stats["speculative_calls"]})
    return rows


def _summary(plain: list[dict], fast: list[dict]) -> dict:
    tokens = lambda rows: sum(len(r["tokens"]) - 1 for r in rows)  # noqa: E731
    seconds = lambda rows: sum(r["decode_s"] for r in rows)  # noqa: E731
    proposed = sum(r["proposed"] for r in fast)
    return {
        "plain_tokens_per_s": tokens(plain) / seconds(plain),
        "speculative_tokens_per_s": tokens(fast) / seconds(fast),
        "speedup": (tokens(fast) / seconds(fast)) / (tokens(plain) / seconds(plain)),
        "median_speedup": statistics.median(f["decode_tokens_per_s"] / p["decode_tokens_per_s"]
                                            for p, f in zip(plain, fast) if p["decode_tokens_per_s"]),
        "acceptance": sum(r["accepted"] for r in fast) / proposed if proposed else None,
        "tokens_per_verification": (sum(r["accepted"] for r in fast) + sum(r["verifications"] for r in fast))
                                   / max(1, sum(r["verifications"] for r in fast)),
        "identical_outputs": sum(p["tokens"] == f["tokens"] for p, f in zip(plain, fast)),
        "prompts": len(plain),
    }


def run_speculative_benchmark(config: SpeculativeBenchConfig, progress=lambda message: None) -> dict:
    from llmexport.runtime.session import Session

    workloads = {"code edit": (code_prompts(config.prompts), config.code_tokens),
                 "stories": (story_prompts(config.prompts), config.story_tokens)}
    runs: dict = {name: {"off": [], "on": []} for name in workloads}
    # both sessions open at once and each prompt run off then on, so a load that drifts during
    # the run weighs on both sides alike
    with Session(config.bundle, threads=config.threads, prompt_reuse=False) as plain, \
            Session(config.bundle, threads=config.threads, speculative="ngram", speculative_tokens=config.tokens,
                    prompt_reuse=False) as fast:
        for session in (plain, fast):
            session.generate([[1, 2, 3]])  # warm-up
        for name, (conversations, max_tokens) in workloads.items():
            for i, messages in enumerate(conversations):
                progress(f"{name}: prompt {i + 1} of {len(conversations)}")
                runs[name]["off"] += _run(plain, [messages], max_tokens)
                runs[name]["on"] += _run(fast, [messages], max_tokens)
        model, dtype = plain.bundle.manifest["model"]["name"], plain.bundle.dtype
    return {"command": config.command, "config": asdict(config), "hardware": _hardware("cpu"),
            "versions": _versions(), "model": model, "dtype": dtype, "runs": runs,
            "summary": {name: _summary(r["off"], r["on"]) for name, r in runs.items()}}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"`{result['command']}`", "",
             f"{result['model']} {result['dtype']}, batch 1, greedy, threads {cfg['threads']}, "
             f"{cfg['tokens']} proposals per verification; {result['hardware']['processor']} "
             f"({result['hardware']['cpus']} cpus)", "",
             "| workload | plain tokens/s | speculative tokens/s | speed-up (summed) | median speed-up | acceptance "
             "| tokens per verification | identical outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        acceptance = f"{100 * s['acceptance']:.0f}%" if s["acceptance"] is not None else "-"
        lines.append(f"| {name} | {s['plain_tokens_per_s']:.2f} | {s['speculative_tokens_per_s']:.2f} | "
                     f"{s['speedup']:.2f}x | {s['median_speedup']:.2f}x | {acceptance} | "
                     f"{s['tokens_per_verification']:.2f} | {s['identical_outputs']}/{s['prompts']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    def draw(ax):
        names = list(result["summary"])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [result["summary"][n]["plain_tokens_per_s"] for n in names], 0.4, label="plain")
        ax.bar([i + 0.2 for i in x], [result["summary"][n]["speculative_tokens_per_s"] for n in names], 0.4,
               label="prompt lookup")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("decode tokens/s, batch 1")
        ax.set_title(result["model"])
        ax.legend()

    save_figure(draw, path, (5, 3.2))


def write(result: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    return write_reports(result, out_dir, name, markdown=markdown, plot=plot)

