"""`llmexport bench-reuse`: what prompt reuse (runtime/kv_rows.py) saves, with and without it in
the same run, through the public Session API.

1. A multi-turn chat: a system prompt of about `system_tokens` tokens (the prose corpus), then
   `turns` user questions (benchmarks/data/chat-prompts.txt), each answered greedily with up to
   `reply_tokens` tokens and appended to the conversation as a client would. Time to first token
   of every turn; turns 2.. are where reuse finds the conversation's previous turn in its row.
2. `clients` requests arriving together that share the system prompt (each with its own
   question): prompt tokens received against prompt tokens computed, and the time until every
   request has its first token.
3. Host work per decode step at batch `host_batch` with a JSON-schema mask on every row, next
   to greedy without one (the engine's own clock: wall time of decode-only iterations minus the
   time inside the compute library).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmexport import LLMExportError

from .report import save_figure, write_reports
from .serving import host_row, host_table
from .suite import _hardware, _versions

DATA = Path(__file__).parent / "data"
SCHEMA = {  # nested: objects in an array, enums, numbers, strings
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "characters": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "role": {"enum": ["hero", "villain", "other"]},
                           "age": {"type": "number"}},
            "required": ["name", "role"]}},
    },
    "required": ["title", "characters"],
}


@dataclass
class ReuseBenchConfig:
    bundle: str
    threads: int = 2
    system_tokens: int = 1000
    turns: int = 6
    reply_tokens: int = 64
    clients: int = 8
    host_batch: int = 16
    host_tokens: int = 24
    command: str = ""


def _system_prompt(tokenizer, tokens: int) -> str:
    words = (DATA / "pride-and-prejudice-ch1-6.txt").read_text().split()
    low, high = 1, len(words)  # the longest prefix of words within `tokens` tokens
    while low < high:
        mid = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False)) <= tokens:
            low = mid
        else:
            high = mid - 1
    return "Answer questions about this text.\n\n" + " ".join(words[:low])


def _questions(n: int) -> list[str]:
    lines = [line.strip() for line in (DATA / "chat-prompts.txt").read_text().splitlines() if line.strip()]
    return lines[:n]


def chat_turns(config: ReuseBenchConfig, reuse: bool) -> list[dict]:
    from llmexport.runtime.sampling import SamplingParams
    from llmexport.runtime.session import Session

    params = SamplingParams(max_new_tokens=config.reply_tokens)
    with Session(config.bundle, threads=config.threads, prompt_reuse=reuse) as session:
        session.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))  # warm-up
        messages = [{"role": "system", "content": _system_prompt(session.tokenizer, config.system_tokens)}]
        stats, rows = session.engine.stats, []
        for turn, question in enumerate(_questions(config.turns), 1):
            messages.append({"role": "user", "content": question})
            ids = session.render_chat(messages)
            if len(ids) + config.reply_tokens > session.bundle.max_seq_len:
                raise LLMExportError(f"turn {turn} needs {len(ids) + config.reply_tokens} tokens; the bundle's "
                                     f"max_seq_len is {session.bundle.max_seq_len}: export with a larger one")
            reused, started, first, text = stats["reused_prompt_tokens"], time.perf_counter(), None, ""
            for event in session.stream([ids], params):
                first = first or time.perf_counter()
                text += event.text
            rows.append({"turn": turn, "prompt_tokens": len(ids), "reused_tokens": stats["reused_prompt_tokens"] - reused,
                         "ttft_s": first - started, "total_s": time.perf_counter() - started})
            messages.append({"role": "assistant", "content": text})
    return rows


def shared_system_prompt(config: ReuseBenchConfig, reuse: bool) -> dict:
    from llmexport.runtime.sampling import SamplingParams
    from llmexport.runtime.session import Session

    with Session(config.bundle, threads=config.threads, prompt_reuse=reuse) as session:
        session.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))  # warm-up
        system = _system_prompt(session.tokenizer, config.system_tokens)
        prompts = [session.render_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
                   for q in _questions(config.clients)]
        if len(prompts) > session.bundle.max_batch:
            raise LLMExportError(f"{len(prompts)} clients exceed the bundle's max_batch={session.bundle.max_batch}")
        stats = session.engine.stats
        before, started, firsts = dict(stats), time.perf_counter(), {}
        for event in session.stream(prompts, SamplingParams(max_new_tokens=4)):
            firsts.setdefault(event.index, time.perf_counter() - started)
        received = stats["prompt_tokens"] - before["prompt_tokens"]
        reused = stats["reused_prompt_tokens"] - before["reused_prompt_tokens"]
    return {"reuse": reuse, "clients": len(prompts), "received_tokens": received, "computed_tokens": received - reused,
            "all_first_tokens_s": max(firsts.values()), "median_ttft_s": statistics.median(firsts.values())}


def masked_host_work(config: ReuseBenchConfig) -> list[dict]:
    from llmexport.runtime.sampling import SamplingParams
    from llmexport.runtime.session import Session

    rows = []
    with Session(config.bundle, threads=config.threads) as session:
        batch = min(config.host_batch, session.bundle.max_batch)
        prompts = [session.render_chat([{"role": "user", "content": f"Describe a novel as JSON ({i})."}])
                   for i in range(batch)]
        session.grammars.matcher({"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}})  # compile
        session.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        for name, fmt in (("greedy, no mask", None),
                          ("greedy, JSON-schema mask", {"type": "json_schema",
                                                        "json_schema": {"name": "book", "schema": SCHEMA}})):
            rows.append(host_row(session, name, prompts, SamplingParams(max_new_tokens=config.host_tokens),
                                 response_format=fmt))
    return rows


def run_reuse_benchmark(config: ReuseBenchConfig, progress=lambda message: None) -> dict:
    from llmexport.runtime.bundle import Bundle

    bundle = Bundle.open(config.bundle)
    result = {"command": config.command, "config": asdict(config), "hardware": _hardware("cpu"),
              "versions": _versions(), "model": bundle.manifest["model"]["name"], "dtype": bundle.dtype}
    turns = {}
    for reuse in (True, False):
        progress(f"{config.turns}-turn chat, prompt reuse {'on' if reuse else 'off'}")
        turns["on" if reuse else "off"] = chat_turns(config, reuse)
    later = [off["ttft_s"] / on["ttft_s"] for on, off in zip(turns["on"][1:], turns["off"][1:])]
    result["chat"] = {"turns": turns, "ttft_ratio_turns_2_on": later,
                      "median_ttft_ratio_turns_2_on": statistics.median(later) if later else None}
    result["shared"] = []
    for reuse in (True, False):
        progress(f"{config.clients} clients sharing the system prompt, prompt reuse {'on' if reuse else 'off'}")
        result["shared"].append(shared_system_prompt(config, reuse))
    progress(f"host work per decode step at batch {config.host_batch}, with and without a JSON-schema mask")
    result["host_work"] = masked_host_work(config)
    return result


def markdown(result: dict) -> str:
    cfg, chat = result["config"], result["chat"]
    lines = [f"`{result['command']}`", "",
             f"{result['model']} {result['dtype']}, {result['hardware']['processor']} "
             f"({result['hardware']['cpus']} cpus), threads {cfg['threads']}", "",
             f"## {cfg['turns']}-turn chat, system prompt of ~{cfg['system_tokens']} tokens, replies up to "
             f"{cfg['reply_tokens']} tokens", "",
             "| turn | prompt tokens | reused (on) | TTFT on ms | TTFT off ms | off / on |", "|---|---|---|---|---|---|"]
    for on, off in zip(chat["turns"]["on"], chat["turns"]["off"]):
        lines.append(f"| {on['turn']} | {on['prompt_tokens']} | {on['reused_tokens']} | {1000 * on['ttft_s']:.0f} | "
                     f"{1000 * off['ttft_s']:.0f} | {off['ttft_s'] / on['ttft_s']:.1f}x |")
    if chat["median_ttft_ratio_turns_2_on"]:
        lines += ["", f"Median TTFT ratio (without / with reuse) over turns 2-{cfg['turns']}: "
                      f"**{chat['median_ttft_ratio_turns_2_on']:.1f}x** (goal >= 5x)."]
    lines += ["", f"## {cfg['clients']} requests arriving together, sharing the system prompt", "",
              "| prompt reuse | prompt tokens received | computed | all first tokens s | median TTFT s |",
              "|---|---|---|---|---|"]
    for s in result["shared"]:
        lines.append(f"| {'on' if s['reuse'] else 'off'} | {s['received_tokens']} | {s['computed_tokens']} | "
                     f"{s['all_first_tokens_s']:.2f} | {s['median_ttft_s']:.2f} |")
    lines += ["", f"## Host work per decode step, batch {cfg['host_batch']}", "", *host_table(result["host_work"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    def draw(ax):
        for key, label in (("on", "prompt reuse on"), ("off", "prompt reuse off")):
            turns = result["chat"]["turns"][key]
            ax.plot([t["turn"] for t in turns], [1000 * t["ttft_s"] for t in turns], marker="o", label=label)
        ax.set_xlabel("turn")
        ax.set_ylabel("time to first token, ms")
        ax.set_title(f"{result['model']}: multi-turn chat")
        ax.legend()

    save_figure(draw, path, (6, 3.5))


def write(result: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    return write_reports(result, out_dir, name, markdown=markdown, plot=plot)

