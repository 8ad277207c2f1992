"""Benchmark reports: JSON as measured, a markdown table, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from llmexport import LLMExportError


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g}"


def markdown(result: dict) -> str:
    """Decode and TTFT tables, with the roofline next to every decode figure."""
    gbps = result["read_bandwidth_bytes_per_s"] / 1e9
    cfg = result["config"]
    lines = [
        f"`{result['command']}`",
        "",
        f"{cfg['model']} {cfg['dtype']} on {result['hardware']['device']} "
        f"({result['hardware'].get('gpu') or result['hardware']['processor']}, {result['hardware']['cpus']} cpus); "
        f"measured read bandwidth {gbps:.1f} GB/s; weights {result['weight_bytes'] / 2**20:.2f} MiB; "
        f"export {result['bundle']['export_s']:.1f} s"
        + (f", export peak RSS {result['bundle']['export_peak_rss_bytes'] / 2**20:.0f} MiB"
           if result["bundle"].get("export_peak_rss_bytes") else ""),
        "",
        "| backend | weights MiB | batch | decode ms/step (median, min-max) | tokens/s | floor ms "
        "| fraction of floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        for batch, d in r["decode"].items():
            floor = d["fraction_of_floor"] * d["median_s"]  # each backend's floor: its own weight bytes
            lines.append(f"| {r['backend']} | {r['weight_bytes'] / 2**20:.0f} | {batch} | {_ms(d['median_s'])} "
                         f"({_ms(d['min_s'])}-{_ms(d['max_s'])}) | {d['tokens_per_s']:.1f} | {_ms(floor)} | "
                         f"{d['fraction_of_floor']:.3f} |")
    lines += ["", "| backend | prompt tokens | time to first token ms (median, min-max) | load s | peak memory MiB |",
              "|---|---|---|---|---|"]
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        for length, t in r["ttft"].items():
            lines.append(f"| {r['backend']} | {length} | {_ms(t['median_s'])} ({_ms(t['min_s'])}-{_ms(t['max_s'])}) | "
                         + (f"{r['load_s']:.2f} | {r['peak_device_bytes'] / 2**20:.1f} |" if "load_s" in r
                            else "- | - (child process) |"))
    skipped = [r for r in result["results"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r['backend']} ({r['reason']})" for r in skipped)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Decode latency vs batch and TTFT vs prompt length, one line per backend."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = list(result["roofline"])
    left.plot([int(b) for b in batches], [result["roofline"][b]["floor_s"] * 1000 for b in batches], "k--",
              label="bandwidth floor")
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        left.plot([int(b) for b in r["decode"]], [d["median_s"] * 1000 for d in r["decode"].values()], "o-",
                  label=r["backend"])
        right.plot([int(n) for n in r["ttft"]], [t["median_s"] * 1000 for t in r["ttft"].values()], "o-",
                   label=r["backend"])
    left.set(xlabel="batch", ylabel="decode ms / step", title="decode latency", xscale="log", yscale="log")
    right.set(xlabel="prompt tokens", ylabel="ms", title="time to first token", xscale="log", yscale="log")
    for axis, ticks in ((left, [int(b) for b in batches]), (right, [int(n) for n in result["config"]["prompt_lens"]])):
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(f"{result['config']['model']} {result['config']['dtype']} on {result['hardware']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_name(model: str, bundle: str | Path | None, dtype: str, device: str) -> str:
    """Named after what was measured, never a path (a --model /abs/dir must not write outside --out)."""
    if bundle:
        return f"{Path(bundle).resolve().name}-{device}"
    return f"{Path(model).name}-{dtype}-{device}"


def check_name(name: str) -> str:
    """A report name is a plain file name (checked before a benchmark runs, and again on writing)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise LLMExportError(f"report name {name!r} must be a plain file name (no directories); pass --name")
    return name


def save_figure(draw, path: Path, size: tuple[float, float]) -> None:
    """A matplotlib figure (Agg, no display) of `size` inches: draw(ax), then saved to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(result: dict, out_dir: str | Path, name: str, markdown=markdown, plot=plot) -> dict[str, Path]:
    """`name`.json, .md and .png in out_dir; `markdown` and `plot` render this kind of result."""
    check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
