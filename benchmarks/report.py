"""Turn benchmark JSON files into benchmarks/RESULTS.md and a PNG chart of tokens/s (matplotlib).

    python benchmarks/report.py benchmarks/results/*.json

Everything from the heading line `## One-off measurements behind the design` to the end of the existing RESULTS.md is
written by hand and kept as it is; only the part above it is regenerated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
CHART = Path(__file__).parent / "results" / "tokens_per_second.png"
TAIL_HEADING = "## One-off measurements behind the design"


def hand_written_tail() -> str:
    """The existing RESULTS.md from the line `TAIL_HEADING` to its end, or "" when there is none."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    start = old.find(f"\n{TAIL_HEADING}\n")
    return old[start + 1:] if start >= 0 else ""


def startup_section(result: dict) -> list[str]:
    figures = result["startup"]
    lines = [
        f"### Start-up of `rewriter.compile(\"gemma4\")`, transformers {result['transformers']}",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Fresh process per run, transformers "
        "already imported; median (min to max) of the runs; ratios to the bare parse of the same run.",
        "",
        "| mode | median | min to max | ratio to bare parse |",
        "|---|---|---|---|",
    ]
    for mode, label in (
        ("bare_parse", "bare `libcst.parse_module` of both files"),
        ("libcst_import", "`import libcst, libcst.matchers` (inside cold)"),
        ("cold", "cold: LibCST rules, user cache written"),
        ("warm", "warm: user-cache hit"),
        ("shipped", "shipped-entry hit"),
        ("every_family_shipped", "`compile_on_import()`, every family's module imported: a shipped hit each"),
    ):
        if mode not in figures:
            continue
        f = figures[mode]
        ratio = f"{f['ratio_to_bare_parse']:.2f}x" if "ratio_to_bare_parse" in f else ""
        lines.append(f"| {label} | {f['median_s'] * 1000:.1f} ms | {f['min_s'] * 1000:.1f} to {f['max_s'] * 1000:.1f} ms | {ratio} |")
    return lines + [""]


LABELS = {
    "eager": "eager",
    "attention": "compiled attention",
    "decode_layers": "compiled decode, layers",
    "decode_forward": "compiled decode, forward",
}


def generate_section(result: dict) -> list[str]:
    modes, ratios, roof = result["modes"], result["over_eager"], result["roofline"]
    load = result["load_average_1min"]
    lines = [
        f"## Eager against compiled attention and compiled decoding: {result['shape']} shape, {result['dtype']}, "
        f"on {result['device']}",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}, transformers {result['transformers']}; "
        f"{result['threads']} torch threads; 1-minute load average {load['before']:.1f} before, {load['after']:.1f} "
        f"after (the benchmark itself keeps one core busy). Command: `{result['command']}`. "
        f"{result['recompile_limit_hits']} recompile-limit hits. Median tokens/s (min to max) of the repeats, "
        "warm-up excluded; ratios to eager in the same run.",
        "",
        "| batch | phase | " + " | ".join(LABELS[mode] for mode in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for batch in modes["eager"]["by_batch"]:
        for phase in ("prefill", "decode"):
            cells = []
            for mode, figures in modes.items():
                f = figures["by_batch"][batch][f"{phase}_tok_s"]
                ratio = f" **{ratios[mode][batch][phase]:.2f}x**" if mode in ratios else ""
                cells.append(f"{f['median']:.1f} ({f['min']:.1f} to {f['max']:.1f}){ratio}")
            lines.append(f"| {batch.removeprefix('batch_')} | {phase} | " + " | ".join(cells) + " |")
    slower = result["slower_than_eager"]
    lines += ["", f"Slower than eager: {', '.join(slower) if slower else 'nowhere'}.", ""]
    lines += [
        "First `generate` of each mode (compilation included), wall seconds and CPU seconds (the process and its "
        "compiler subprocesses): cold, with an empty inductor cache, and warm, in a new process reusing the cache "
        "this run filled (every start after the first one on a machine); graphs dynamo holds at the end:",
        "",
        "| mode | status | "
        + " | ".join(f"{batch.removeprefix('batch_')}: {start} wall s / CPU s" for start in ("cold", "warm")
                     for batch in modes["eager"]["by_batch"])
        + " | graphs |",
        "|---|---|" + "---|" * 2 * len(modes["eager"]["by_batch"]) + "---|",
    ]
    for mode, figures in modes.items():
        cells = [
            f"{f[f'{label}_s']:.1f} / {f[f'{label}_cpu_s']:.1f}" if f"{label}_s" in f else ""
            for label in ("first_generate", "first_generate_warm")
            for f in figures["by_batch"].values()
        ]
        variants = f" in {len(figures['graph_variants'])} variants" if figures["graph_variants"] else ""
        graphs = f"{figures['graphs']}{variants}"
        lines.append(f"| {LABELS[mode]} | {figures['status']} | " + " | ".join(cells) + f" | {graphs} |")
    lines += [
        "",
        f"Decode roofline: measured memory bandwidth {roof['bandwidth_bytes_s'] / 1e9:.1f} GB/s (a 256 MiB tensor "
        "copy); a decode step reads every weight but the per-layer embedding table, and the K/V each layer attends "
        "to at the last position. Each decode figure as a share of the roof:",
        "",
        "| batch | bytes per step (weights + KV) | roof tok/s | " + " | ".join(LABELS[mode] for mode in modes) + " |",
        "|---|---|---|" + "---|" * len(modes),
    ]
    for batch, step in roof["by_batch"].items():
        decode = [figures["by_batch"][batch]["decode_tok_s"]["median"] for figures in modes.values()]
        shares = [f"{tok_s / step['roof_tok_s']:.1%}" for tok_s in decode]
        lines.append(
            f"| {batch.removeprefix('batch_')} | {step['bytes_per_step']:,} "
            f"({step['weight_bytes']:,} + {step['kv_bytes']:,}) | "
            f"{step['roof_tok_s']:,.0f} | " + " | ".join(shares) + " |"
        )
    lines += [
        "",
        "KV-cache bytes held after prefill and 16 decoded tokens, Gemma-4 31B layer pattern (60 layers, five "
        "sliding to one full, window 1024, no KV-shared layers): the memory bug 1 wastes.",
        "",
        "| tokens | unpatched | patched | window minimum | unpatched / patched |",
        "|---|---|---|---|---|",
    ]
    for length, kv in result["kv_cache_31b_pattern"].items():
        lines.append(
            f"| {int(length):,} | {kv['unpatched_bytes']:,} | {kv['patched_bytes']:,} | {kv['minimum_bytes']:,} | "
            f"{kv['unpatched_over_patched']:.2f}x |"
        )
    lines.append("")
    if result.get("startup"):
        lines += startup_section({**result, "startup": result["startup"]})
    return lines


def chart(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["benchmark"] == "generate"]
    if not runs:
        return
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['shape']} {r['dtype']}\n{r['device'].split(', Python')[0]}" for r in runs]
    modes = list(LABELS)
    width = 0.8 / len(modes)
    for axis, phase in zip(axes, ("prefill_tok_s", "decode_tok_s")):
        for index, mode in enumerate(modes):
            positions = [p - 0.4 + width * (index + 0.5) for p in range(len(runs))]
            values = [r["modes"][mode]["by_batch"]["batch_1"][phase]["median"] if mode in r["modes"] else 0
                      for r in runs]
            axis.bar(positions, values, width, label=LABELS[mode])
        axis.set_xticks(list(range(len(runs))), labels, fontsize=8)
        axis.set_yscale("log")
        axis.set_title(f"{phase.removesuffix('_tok_s')} tokens/s, batch 1 (median)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(CHART, dpi=110)


def inputs_embeds_section(result: dict) -> list[str]:
    lines = [
        f"## Per-layer token lookup from `inputs_embeds` alone, Gemma-4 at E2B's vocabulary, transformers "
        f"{result['transformers']}",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}. Command: `{result['command']}`. One process per "
        f"case; `get_per_layer_inputs` of a {result['vocabulary']:,} x {result['hidden']:,} embedding table; the peak "
        "resident memory the call adds, and its wall time (noisy: one run).",
        "",
        "| dtype | tokens | stock | stock: added peak, time | patched | patched: added peak, time |",
        "|---|---|---|---|---|---|",
    ]
    rows = {(row["dtype"], row["tokens"], row["mode"]): row for row in result["rows"]}
    for dtype, tokens in dict.fromkeys((row["dtype"], row["tokens"]) for row in result["rows"]):
        cells = []
        for mode in ("stock", "patched"):
            row = rows[dtype, tokens, mode]
            cells += [row["outcome"], f"{row['added_peak_mib']:,.0f} MiB, {row['seconds']:.2f} s"]
        lines.append(f"| {dtype} | {tokens} | {' | '.join(cells)} |")
    return lines + [""]


def train_step_section(result: dict) -> list[str]:
    lines = [
        f"## One LoRA training step at Gemma's {result['vocabulary']:,}-token vocabulary, transformers "
        f"{result['transformers']}",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Tiny models of hidden {result['hidden']}, "
        f"1 x {result['tokens']:,} tokens, {result['steps']} steps (forward, backward, AdamW), each variant in its own "
        "process; peaks are resident memory above the process's baseline. Ratios are to eager of the same run. "
        f"{result['note'][0].upper()}{result['note'][1:]}.",
        "",
        "| model | variant | step peak | ratio | loss-head peak | ratio | loss head | tokens/s (best step) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, figures in result["models"].items():
        variants = figures["variants"]
        eager = variants["eager"]
        for name, f in variants.items():
            head = f["loss_head"]
            lines.append(
                f"| {model} | {name} | {f['step_added_peak_mib']:,.0f} MiB | "
                f"{f['step_added_peak_mib'] / eager['step_added_peak_mib']:.2f}x | {head['added_peak_mib']:,.0f} MiB | "
                f"{head['added_peak_mib'] / eager['loss_head']['added_peak_mib']:.2f}x | {head['seconds']:.1f} s | "
                f"{f['tokens_per_s_best']:.0f} | {f['tokens_per_s_best'] / eager['tokens_per_s_best']:.2f}x |"
            )
    return lines + [""]


SECTIONS = {
    "startup": startup_section,
    "generate": generate_section,
    "inputs_embeds": inputs_embeds_section,
    "train_step": train_step_section,
}


def main(paths: list[str]) -> None:
    results = [json.loads(Path(path).read_text()) for path in paths]
    chart(results)
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from the JSON files named below.", ""]
    if CHART.exists():
        lines += [f"![tokens/s, eager and compiled modes](results/{CHART.name})", ""]
    for path, result in zip(paths, results):
        lines += SECTIONS[result["benchmark"]](result)
        lines += [f"Source: `{path}`", ""]
    tail = hand_written_tail()
    RESULTS.write_text("\n".join(lines) + (f"\n{tail}" if tail else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
