"""`llmexport bench-serve`: N concurrent streaming clients against `llmexport serve`, and the
engine's host work per decode step.

The server runs in its own process (`llmexport serve`, the command users run) with a fixed
thread count; the clients are threads of this process, each taking the next request of one
fixed workload (seeded random prompts of token ids, greedy, `ignore_eos`, so every run does
the same work) and streaming it. For each client count: aggregate completion tokens/s over the
wall time of the whole workload, and client-side time to first token and inter-token latency
(p50, p99). One client is the workload served one request after another: every other row is
compared with it.

With `ray_replicas` (`--ray-replicas 1,2`) the same runs go to `llmexport serve --ray` with each
replica count, the same CPUs split among the replicas; at one replica the workload is also sent
to plain serve and to Ray alternately, one request at a time, so that Ray's own cost (its HTTP
proxy, the hop to the replica) is measured under the same load on a shared machine.

Host work: the same bundle in this process, one Session, a batch of decoding requests with
each sampling setting; the engine's own clock splits each decode-only iteration into the time
inside the compute library and everything else (binding, sampling, stopping, streaming).
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmexport import LLMExportError
from llmexport.runtime import defaults

from .report import write_reports
from .suite import _hardware, _versions

SAMPLING = {  # name -> SamplingParams fields for the host-work table
    "greedy": {},
    "temperature 0.8": {"temperature": 0.8},
    "temperature 0.8, top-p 0.9, repetition penalty 1.1": {"temperature": 0.8, "top_p": 0.9,
                                                          "repetition_penalty": 1.1},
    "same, on a peaked row (temperature 0.1)": {"temperature": 0.1, "top_p": 0.9, "repetition_penalty": 1.1},
}


@dataclass
class ServeBenchConfig:
    bundle: str
    clients: tuple[int, ...] = (1, 4, 8, 16)
    requests: int = 32
    prompt_tokens: tuple[int, int] = (16, 128)  # uniform in [low, high]
    max_tokens: int = 64
    threads: int = 2
    seed: int = 0
    host_batch: int = 16
    prefill_chunk: int = defaults.PREFILL_CHUNK
    prefill_stall: float = defaults.PREFILL_STALL
    command: str = ""
    # `llmexport serve --ray` too, once per replica count, the same threads split among the replicas
    ray_replicas: tuple[int, ...] = ()


def workload(config: ServeBenchConfig, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(config.seed)
    low, high = config.prompt_tokens
    return [rng.integers(3, vocab, size=int(rng.integers(low, high + 1))).tolist() for _ in range(config.requests)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`llmexport serve` in a child process, up and answering /health, stopped with SIGTERM.
    ray_replicas: `llmexport serve --ray` with that many replicas of threads / ray_replicas CPUs each."""

    def __init__(self, bundle: str, threads: int, prefill_chunk: int = defaults.PREFILL_CHUNK,
                 prefill_stall: float = defaults.PREFILL_STALL, ray_replicas: int | None = None):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        where = (["--threads", str(threads)] if ray_replicas is None else
                 ["--ray", "--replicas", str(ray_replicas), "--replica-cpus", f"{threads / ray_replicas:g}"])
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from llmexport.cli import main; main()", "serve", "--bundle", bundle,
             "--port", str(self.port), *where, "--max-queue", "100000",
             "--prefill-chunk", str(prefill_chunk), "--prefill-stall", str(prefill_stall)],
            # its log (a line per request) goes to a file: a pipe nobody reads would fill and block it
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise LLMExportError(f"llmexport serve exited: {self.log.read().strip()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise LLMExportError("llmexport serve did not answer /health within 300 s")
            time.sleep(0.2)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def _stream(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion: the send time, and the arrival time of each token's chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent, arrivals = time.perf_counter(), []
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise LLMExportError(f"the server answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise LLMExportError(f"the server failed a request: {chunk['error']['message']}")
                arrivals.append(time.perf_counter())
    return {"ttft_s": arrivals[0] - sent, "itl_s": np.diff(arrivals).tolist(), "tokens": len(arrivals)}


def run_clients(server: ServerProcess, prompts: list[list[int]], max_tokens: int, clients: int) -> dict:
    """The whole workload with `clients` concurrent streaming clients."""
    import httpx

    todo: queue.Queue = queue.Queue()
    for prompt in prompts:
        todo.put(prompt)
    done, errors = [], []

    def client_loop():
        with httpx.Client() as client:
            while True:
                try:
                    prompt = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.append(_stream(client, server.url, server.model, prompt, max_tokens))
                except Exception as e:  # noqa: BLE001  (reported with the result)
                    errors.append(str(e))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise LLMExportError(f"{len(errors)} of {len(prompts)} requests failed; first: {errors[0]}")
    ttft = [d["ttft_s"] for d in done]
    itl = [gap for d in done for gap in d["itl_s"]]
    tokens = sum(d["tokens"] for d in done)
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "ttft_s": {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99))},
            "itl_s": {"p50": float(np.percentile(itl, 50)), "p99": float(np.percentile(itl, 99))}}


def run_paired(plain: ServerProcess, ray: ServerProcess, prompts: list[list[int]], max_tokens: int) -> dict:
    """Each prompt to plain serve, then to Ray x1 (one request in flight at a time; the idle server
    waits), so both see the same load on a shared machine: TTFT and inter-token p50 of each, and
    Ray's over plain's (its HTTP proxy and the hop to the replica). Two figures that the noise of
    a busy machine moves less than p50s: the median of the per-prompt TTFT differences (the two
    requests of a prompt run back to back), and each server's time outside its engine (the
    client's TTFT less the engine's own, submission to first token, from /metrics; means)."""
    import httpx

    got = {"serve": [], "ray x1": []}
    before = {label: _engine_ttft(server) for label, server in (("serve", plain), ("ray x1", ray))}
    with httpx.Client() as client:
        for i, prompt in enumerate(prompts):
            order = [("serve", plain), ("ray x1", ray)] if i % 2 == 0 else [("ray x1", ray), ("serve", plain)]
            for label, server in order:
                got[label].append(_stream(client, server.url, server.model, prompt, max_tokens))
    out = {}
    for label, server in (("serve", plain), ("ray x1", ray)):
        done, after = got[label], _engine_ttft(server)
        engine = (after[0] - before[label][0]) / max(after[1] - before[label][1], 1)
        out[label] = {"ttft_p50_s": float(np.percentile([d["ttft_s"] for d in done], 50)),
                      "itl_p50_s": float(np.percentile([g for d in done for g in d["itl_s"]], 50)),
                      "outside_engine_s": float(np.mean([d["ttft_s"] for d in done])) - engine,
                      "requests": len(done), "ttft_s": [d["ttft_s"] for d in done]}
    out["ratio"] = {k: out["ray x1"][k] / out["serve"][k] for k in ("ttft_p50_s", "itl_p50_s")}
    out["ttft_difference_p50_s"] = float(np.median([r["ttft_s"] - p["ttft_s"]
                                                    for r, p in zip(got["ray x1"], got["serve"])]))
    return out


def _engine_ttft(server: ServerProcess) -> tuple[float, int]:
    """The server's time-to-first-token histogram: (sum of seconds, count), summed over the samples
    of the replica that answers (Ray x1: the only one)."""
    import httpx

    total, count = 0.0, 0
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("llmexport_time_to_first_token_seconds_sum"):
            total += float(value)
        elif name.startswith("llmexport_time_to_first_token_seconds_count"):
            count += int(float(value))
    return total, count


def host_work(bundle: str, threads: int, batch: int, prompt_len: int = 32, new_tokens: int = 33) -> list[dict]:
    """Per decode-only iteration of `batch` requests: wall ms, ms inside the compute library, and
    the rest (host work), for each sampling setting."""
    from llmexport.runtime.sampling import SamplingParams
    from llmexport.runtime.session import Session

    rows = []
    with Session(bundle, threads=threads) as session:
        batch = min(batch, session.bundle.max_batch)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, session.bundle.vocab_size, size=prompt_len).tolist() for _ in range(batch)]
        session.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        for name, fields in SAMPLING.items():
            rows.append(host_row(session, name, prompts,
                                 SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=1, **fields)))
    return rows


def host_row(session, name: str, prompts: list[list[int]], params, **generate_kwargs) -> dict:
    """Generate `prompts` together and split the engine's decode-only iterations into wall ms,
    ms inside the compute library, and the rest (host work)."""
    stats = session.engine.stats
    before = dict(stats)
    session.generate(prompts, params, **generate_kwargs)
    n = stats["decode_iterations"] - before["decode_iterations"]
    wall = (stats["decode_iteration_s"] - before["decode_iteration_s"]) / n
    inside = (stats["decode_run_s"] - before["decode_run_s"]) / n
    return {"sampling": name, "batch": len(prompts), "iterations": n, "iteration_ms": 1000 * wall,
            "graph_ms": 1000 * inside, "host_ms": 1000 * (wall - inside), "host_fraction": (wall - inside) / wall,
            "vocab_size": session.bundle.vocab_size}


def run_serve_benchmark(config: ServeBenchConfig, progress=lambda message: None) -> dict:
    from llmexport.runtime.bundle import Bundle

    bundle = Bundle.open(config.bundle)
    if max(config.clients) > bundle.max_batch:
        progress(f"note: {max(config.clients)} clients on a bundle of max_batch {bundle.max_batch}: the rest queue")
    prompts = workload(config, bundle.vocab_size)
    longest = config.prompt_tokens[1] + config.max_tokens
    if longest > bundle.max_seq_len + 1:
        raise LLMExportError(f"prompts up to {config.prompt_tokens[1]} tokens plus {config.max_tokens} new ones "
                             f"exceed the bundle's max_seq_len={bundle.max_seq_len}; lower them or re-export")
    runs, paired = [], None
    progress(f"starting llmexport serve on {config.bundle} ({config.threads} threads)")
    plain = ServerProcess(config.bundle, config.threads, config.prefill_chunk, config.prefill_stall)
    try:
        for replicas in (None, *config.ray_replicas):
            label = "serve" if replicas is None else f"ray x{replicas}"
            if replicas is not None:
                progress(f"starting llmexport serve --ray, {replicas} replica(s)")
            server = plain if replicas is None else ServerProcess(config.bundle, config.threads,
                                                                  config.prefill_chunk, config.prefill_stall, replicas)
            try:
                run_clients(server, prompts[:2], config.max_tokens, 2)  # warm-up: sessions, bindings, first shapes
                if replicas == 1:  # Ray's own cost: the same requests alternately to both, under the same load
                    progress("plain serve and Ray x1 alternately, one request at a time")
                    paired = run_paired(plain, server, prompts, config.max_tokens)
                for clients in config.clients:
                    progress(f"{label}, {clients} client(s): {config.requests} requests")
                    runs.append({"server": label, **run_clients(server, prompts, config.max_tokens, clients)})
            finally:
                if server is not plain:
                    server.stop()
    finally:
        plain.stop()
    sequential = next((r for r in runs if r["clients"] == 1 and r["server"] == "serve"), None)
    for r in runs:
        r["speedup_vs_sequential"] = r["tokens_per_s"] / sequential["tokens_per_s"] if sequential else None
    progress(f"host work per decode step, batch {config.host_batch}")
    host = host_work(config.bundle, config.threads, config.host_batch)
    return {"command": config.command, "config": asdict(config), "hardware": _hardware("cpu"),
            "versions": _versions(), "model": bundle.manifest["model"]["name"], "dtype": bundle.dtype,
            "max_batch": bundle.max_batch, "runs": runs, "paired": paired, "host_work": host}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"`{result['command']}`", "",
        f"{result['model']} {result['dtype']} (max_batch {result['max_batch']}), server threads {cfg['threads']}, "
        f"prefill chunk {cfg['prefill_chunk']}, prefill stall {cfg.get('prefill_stall', '-')}, "
        f"{result['hardware']['cpus']} cpus; {cfg['requests']} requests, prompts of {cfg['prompt_tokens'][0]}-"
        f"{cfg['prompt_tokens'][1]} tokens, {cfg['max_tokens']} new tokens each, greedy, streaming", "",
        "| server | clients | tokens/s | vs one after another | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms "
        "| inter-token p99 ms | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        speedup = f"{r['speedup_vs_sequential']:.2f}x" if r["speedup_vs_sequential"] else ""
        lines.append(f"| {r.get('server', 'serve')} | {r['clients']} | {r['tokens_per_s']:.1f} | {speedup} | "
                     f"{1000 * r['ttft_s']['p50']:.0f} | "
                     f"{1000 * r['ttft_s']['p99']:.0f} | {1000 * r['itl_s']['p50']:.1f} | "
                     f"{1000 * r['itl_s']['p99']:.1f} | {r['wall_s']:.1f} |")
    paired = result.get("paired")
    if paired:
        lines += ["", f"Plain serve and Ray x1 (the same {cfg['threads']} CPUs) alternately, one request at a time "
                  f"({paired['serve']['requests']} each):", "",
                  "| server | TTFT p50 ms | inter-token p50 ms |", "|---|---|---|"]
        for label in ("serve", "ray x1"):
            lines.append(f"| {label} | {1000 * paired[label]['ttft_p50_s']:.1f} | "
                         f"{1000 * paired[label]['itl_p50_s']:.2f} |")
        lines.append(f"| ray x1 / serve | {paired['ratio']['ttft_p50_s']:.3f} | {paired['ratio']['itl_p50_s']:.3f} |")
        if "ttft_difference_p50_s" in paired:
            lines += ["", f"Ray x1 less serve, per prompt (median of the {paired['serve']['requests']} differences): "
                      f"TTFT {1000 * paired['ttft_difference_p50_s']:+.1f} ms. Time to the first token outside the "
                      f"engine (the client's TTFT less the engine's own, means): serve "
                      f"{1000 * paired['serve']['outside_engine_s']:.1f} ms, Ray x1 "
                      f"{1000 * paired['ray x1']['outside_engine_s']:.1f} ms."]
    lines += ["", f"Host work per decode-only engine iteration (batch {result['host_work'][0]['batch']}, vocabulary "
              f"{result['host_work'][0]['vocab_size']:,}; everything outside the compute library's run call):", "",
              *host_table(result["host_work"])]
    return "\n".join(lines) + "\n"


def host_table(rows: list[dict]) -> list[str]:
    """host_row's results as markdown table lines."""
    out = ["| sampling | iteration ms | inside the library ms | host ms | host share |", "|---|---|---|---|---|"]
    for h in rows:
        out.append(f"| {h['sampling']} | {h['iteration_ms']:.1f} | {h['graph_ms']:.1f} | {h['host_ms']:.2f} | "
                   f"{100 * h['host_fraction']:.1f}% |")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("server", "serve") == "serve"]  # the table has the Ray rows
    clients = [r["clients"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(clients, [r["tokens_per_s"] for r in runs], "o-", label="llmexport serve")
    if runs and runs[0]["clients"] == 1:
        left.plot(clients, [runs[0]["tokens_per_s"]] * len(clients), "k--", label="one after another")
    left.set(xlabel="concurrent clients", ylabel="completion tokens / s", title="aggregate throughput")
    for key, style in (("ttft_s", "o-"), ("itl_s", "s-")):
        for q in ("p50", "p99"):
            right.plot(clients, [1000 * r[key][q] for r in runs], style, label=f"{key[:-2].upper()} {q}")
    right.set(xlabel="concurrent clients", ylabel="ms", title="latency (client side)", yscale="log")
    for axis in (left, right):
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.legend(fontsize=7)
    fig.suptitle(f"{result['model']} {result['dtype']}: llmexport serve, {result['config']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    return write_reports(result, out_dir, name, markdown=markdown, plot=plot)
