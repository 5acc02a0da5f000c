"""Eager against compiled attention: tokens/s of ``generate``, KV-cache bytes of bug 1, and start-up, in one run.

    python benchmarks/generate_bench.py --shape tiny --device cpu --json benchmarks/results/generate-tiny-cpu.json

- prefill and decode tokens/s of ``model.generate`` at each batch size, eager then compiled attention
  (``rewriter.compile("gemma4", compile_attention=True)``), warm-up excluded, median and spread of the repeats:
  prefill = tokens / time of a one-token generate; decode = new tokens / (time of an n+1-token generate minus it);
- graphs compiled and recompile-limit hits;
- KV-cache bytes held after prefilling and decoding with a Gemma-4 31B layer pattern (60 layers, five sliding to
  one full, window 1024, no KV-shared layers), unpatched against patched, next to the minimum the window allows
  (sliding layers keep window - 1 positions, full layers all of them);
- the start-up costs of ``benchmarks/startup_bench.py`` (``--startup-runs 0`` skips them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import rewriter
from rewriter import tiny
from rewriter.attention import recompile_limit_hits

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402
from startup_bench import measure as measure_startup  # noqa: E402

SHAPES = {"tiny": lambda: tiny.text_config(2), "e2b": tiny.e2b_text_config}
WINDOW, DECODE_STEPS = 1024, 16


def timed(device: str, function) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def throughput(model, device: str, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)

    def generate(n: int):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(new_tokens + 1)()  # warm-up (and compilation, for compiled attention)
    prefill, decode = [], []
    for _ in range(repeats):
        first = timed(device, generate(1))
        whole = timed(device, generate(new_tokens + 1))
        prefill.append(batch * prompt / first)
        decode.append(batch * new_tokens / max(whole - first, 1e-9))
    return {"prefill_tok_s": spread(prefill), "decode_tok_s": spread(decode)}


def measure_generate(model, device: str, args) -> dict:
    results = {f"batch_{batch}": throughput(model, device, batch, args.prompt, args.new_tokens, args.repeats) for batch in args.batches}
    first = results[f"batch_{args.batches[0]}"]
    return {
        "prefill_tok_s": first["prefill_tok_s"]["median"],
        "decode_tok_s": first["decode_tok_s"]["median"],
        "by_batch": results,
    }


def kv_bytes(lengths: list[int]) -> dict:
    """Fill a DynamicCache built from a 31B-shaped config as a model would, and count the bytes it holds."""
    from transformers import DynamicCache

    config = tiny.text_config(0, num_hidden_layers=60, layer_types=tiny.layer_pattern_31b(), sliding_window=WINDOW)
    kinds = config.layer_types
    dims = [config.head_dim if kind == "sliding_attention" else config.global_head_dim for kind in kinds]
    heads = config.num_key_value_heads
    result = {}
    for length in lengths:
        cache = DynamicCache(config=config)
        for step, tokens in enumerate([length - DECODE_STEPS] + [1] * DECODE_STEPS):
            for layer, dim in enumerate(dims):
                states = torch.zeros(1, heads, tokens, dim)
                cache.update(states, states, layer)
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        minimum = sum(
            2 * heads * dim * 4 * (min(length, WINDOW - 1) if kind == "sliding_attention" else length)
            for kind, dim in zip(kinds, dims)
        )
        result[str(length)] = {"bytes": held, "minimum_bytes": minimum, "ratio_to_minimum": held / minimum}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-lengths", type=lambda text: [int(n) for n in text.split(",")], default=[1024, 4096, 16384])
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    import transformers

    command = " ".join(["python", "benchmarks/generate_bench.py", *sys.argv[1:]])
    rewriter.restore("gemma4")
    unpatched_kv = kv_bytes(args.kv_lengths)
    report = rewriter.compile("gemma4")
    patched_kv = kv_bytes(args.kv_lengths)

    model = tiny.causal_lm(0, config=SHAPES[args.shape]()).to(args.device, getattr(torch, args.dtype))
    eager = measure_generate(model, args.device, args)
    attention = rewriter.compile("gemma4", compile_attention=True).attention
    compiled = measure_generate(model, args.device, args)
    graphs = rewriter.attention_graphs("gemma4")

    device = torch.cuda.get_device_name() if args.device == "cuda" else describe_machine()
    results = {
        "benchmark": "generate",
        "command": command,
        "machine": describe_machine(),
        "device": device,
        "shape": args.shape,
        "dtype": args.dtype,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cache_source": report.source,
        "attention": attention,
        "eager": eager,
        "compiled": compiled,
        "compiled_over_eager": {
            "prefill": compiled["prefill_tok_s"] / eager["prefill_tok_s"],
            "decode": compiled["decode_tok_s"] / eager["decode_tok_s"],
        },
        "graphs": sum(graph["graphs"] for graph in graphs),
        "graph_variants": graphs,
        "recompile_limit_hits": recompile_limit_hits(),
        "kv_cache_31b_pattern": {
            length: {
                "unpatched_bytes": unpatched_kv[length]["bytes"],
                "patched_bytes": patched_kv[length]["bytes"],
                "minimum_bytes": patched_kv[length]["minimum_bytes"],
                "unpatched_over_patched": unpatched_kv[length]["bytes"] / patched_kv[length]["bytes"],
            }
            for length in unpatched_kv
        },
        "startup": measure_startup(args.startup_runs) if args.startup_runs else None,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    ratio = results["compiled_over_eager"]
    print(f"{args.shape} {args.dtype} on {device}: eager decode {eager['decode_tok_s']:.1f} tok/s, "
          f"compiled {compiled['decode_tok_s']:.1f} tok/s ({ratio['decode']:.2f}x); prefill {ratio['prefill']:.2f}x; "
          f"{results['graphs']} graphs, {results['recompile_limit_hits']} recompile-limit hits")
    for length, kv in results["kv_cache_31b_pattern"].items():
        print(f"KV at {length} tokens: unpatched {kv['unpatched_bytes']:,} B, patched {kv['patched_bytes']:,} B "
              f"(minimum {kv['minimum_bytes']:,} B): {kv['unpatched_over_patched']:.2f}x")


if __name__ == "__main__":
    main()
