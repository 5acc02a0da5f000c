"""Eager against compiled attention and compiled decoding: ``generate`` tokens/s, compile time, the decode roofline,
KV-cache bytes of bug 1, and start-up, in one run.

    python benchmarks/generate_bench.py --shape tiny --device cpu --json benchmarks/results/generate-tiny-cpu.json

- modes, in this order in one process: ``eager``; ``attention`` (``compile_attention=True``); ``decode_layers``
  and ``decode_forward`` (``compile_decode="layers"`` / ``"forward"``: a static cache, each decode step as
  compiled graphs). Inductor starts from an empty cache folder, so no mode reuses a previous run's kernels (a later
  mode may reuse kernels an earlier one compiled in this process);
- per mode and batch size: the first ``generate`` (compilation included) in wall seconds and in CPU seconds of the
  process and its compiler subprocesses, cold (empty inductor cache) and warm (a new process on the same machine
  reusing the cache this run filled: what every start after the first one pays); then prefill and decode tokens/s,
  median and spread of the repeats, the modes taking turns within each repeat (installed again with their graphs
  kept) so that load from other jobs falls on all of them alike: prefill = tokens / time of a one-token generate
  (the median of ``--prefill-runs`` of them per repeat: a tiny prefill takes milliseconds, which one scheduling
  hiccup doubles); decode = new tokens / (time of an n+1-token generate minus that);
- the decode roofline: bytes a decode step must read (every weight but the per-layer embedding table, which is
  looked up, plus the K/V each layer attends to at the last position) over the memory bandwidth measured here
  (a large tensor copy), and each decode figure as a share of it;
- graphs compiled per mode and recompile-limit hits; which mode is slower than eager anywhere;
- KV-cache bytes held after prefilling and decoding with a Gemma-4 31B layer pattern (60 layers, five sliding to
  one full, window 1024, no KV-shared layers), unpatched against patched, next to the minimum the window allows;
- the start-up costs of ``benchmarks/startup_bench.py`` (``--startup-runs 0`` skips them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARM_CACHE = "GENERATE_BENCH_WARM_CACHE"  # set for the warm-start child only: its parent's inductor cache
os.environ["TORCHINDUCTOR_CACHE_DIR"] = (
    os.environ.get(WARM_CACHE) or tempfile.mkdtemp(prefix="generate-bench-inductor-")
)

import torch  # noqa: E402

import rewriter  # noqa: E402
from rewriter import testing  # noqa: E402
from rewriter.attention import compile_attention  # noqa: E402
from rewriter.generation import compile_decoding  # noqa: E402
from rewriter.variants import recompile_limit_hits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402
from startup_bench import measure as measure_startup  # noqa: E402

SHAPES = {"tiny": lambda: testing.text_config(2), "e2b": testing.e2b_text_config}
MODES = ("eager", "attention", "decode_layers", "decode_forward")
MODELING = "transformers.models.gemma4.modeling_gemma4"
WINDOW, DECODE_STEPS = 1024, 16


def timed(device: str, function) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and of the subprocesses it waited for (inductor's compiler workers, gcc)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def generator(model, ids: torch.Tensor, n: int):
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def install(mode: str):
    """Install ``mode`` on the patched classes; (installed object, status), ``None`` for eager."""
    if mode == "eager":
        return None, "eager"
    if mode == "attention":
        return compile_attention(MODELING, "Gemma4TextAttention")
    return compile_decoding("gemma4", MODELING, mode.removeprefix("decode_"))


def benchmark_model(args):
    """The random-weight model of ``--shape``, the same in the run and in its warm-start child."""
    return testing.causal_lm(0, config=SHAPES[args.shape]()).to(args.device, getattr(torch, args.dtype))


def prompts(model, device: str, args) -> dict[int, torch.Tensor]:
    vocab = model.config.vocab_size
    return {batch: torch.randint(0, vocab, (batch, args.prompt), device=device) for batch in args.batches}


def first_generates(model, device: str, inputs: dict[int, torch.Tensor], args, label="first_generate") -> dict:
    """Wall and CPU seconds of the first ``generate`` per batch size (compilation included)."""
    first = {}
    for batch, ids in inputs.items():
        cpu = cpu_seconds()
        seconds = timed(device, generator(model, ids, args.new_tokens + 1))
        first[f"batch_{batch}"] = {f"{label}_s": seconds, f"{label}_cpu_s": cpu_seconds() - cpu}
    return first


def warm_first_generates(mode: str) -> dict:
    """``first_generates`` of ``mode`` in a new process reusing this run's inductor cache; ``{}`` if that process
    fails (said on stderr: the run's other figures are kept)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--warm-start", mode]
    env = {**os.environ, WARM_CACHE: os.environ["TORCHINDUCTOR_CACHE_DIR"]}
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"warm start of {mode} failed (exit {child.returncode}): {child.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return json.loads(child.stdout.splitlines()[-1])


def measure_modes(model, device: str, args) -> dict:
    """First ``generate`` of each mode (compilation included), then its steady tokens/s, the modes taking turns
    within each repeat so that load from other jobs falls on all of them alike."""
    inputs = prompts(model, device, args)
    installed, results = {}, {}
    for mode in args.modes:
        compiled, status = install(mode)
        first = first_generates(model, device, inputs, args)
        if compiled is not None:
            compiled.uninstall()
        installed[mode], results[mode] = compiled, {"status": status, "by_batch": first}
    samples = {mode: {batch: ([], []) for batch in inputs} for mode in args.modes}
    for _ in range(args.repeats):
        for mode, compiled in installed.items():
            if compiled is not None:
                compiled.install()
            for batch, ids in inputs.items():
                one = statistics.median(timed(device, generator(model, ids, 1)) for _ in range(args.prefill_runs))
                whole = timed(device, generator(model, ids, args.new_tokens + 1))
                samples[mode][batch][0].append(batch * args.prompt / one)
                samples[mode][batch][1].append(batch * args.new_tokens / max(whole - one, 1e-9))
            if compiled is not None:
                compiled.uninstall()
    for mode, compiled in installed.items():
        for batch, (prefill, decode) in samples[mode].items():
            figures = results[mode]["by_batch"][f"batch_{batch}"]
            figures.update(prefill_tok_s=spread(prefill), decode_tok_s=spread(decode))
        if compiled is not None:
            for batch, warm in warm_first_generates(mode).items():
                results[mode]["by_batch"][batch].update(warm)
        graphs = compiled.graphs() if compiled is not None else []
        results[mode].update(graphs=sum(g["graphs"] for g in graphs), graph_variants=graphs)
    return results


def memory_bandwidth(device: str, mebibytes: int = 256, runs: int = 5) -> float:
    """Bytes per second of the best of ``runs`` copies of a large tensor (each byte read once and written once)."""
    source = torch.ones(mebibytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    best = min(timed(device, lambda: target.copy_(source)) for _ in range(runs))
    return 2 * source.numel() * source.element_size() / best


def decode_bytes(model, batch: int, length: int) -> dict:
    """Bytes one decode step reads at context ``length``: the weights once, and the K/V each layer attends to."""
    looked_up = "embed_tokens_per_layer"
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if looked_up not in name)
    config, kv = model.config, 0
    element = next(model.parameters()).element_size()
    for layer in model.model.layers:
        attention = layer.self_attn
        heads = attention.k_proj.out_features // attention.head_dim
        positions = min(length, config.sliding_window) if attention.is_sliding else length
        kv += 2 * batch * heads * attention.head_dim * positions * element
    return {"weight_bytes": weights, "kv_bytes": kv, "bytes_per_step": weights + kv}


def roofline(model, device: str, args) -> dict:
    bandwidth = memory_bandwidth(device)
    by_batch = {}
    for batch in args.batches:
        step = decode_bytes(model, batch, args.prompt + args.new_tokens)
        by_batch[f"batch_{batch}"] = {**step, "roof_tok_s": batch * bandwidth / step["bytes_per_step"]}
    return {"bandwidth_bytes_s": bandwidth, "by_batch": by_batch}


def kv_bytes(lengths: list[int]) -> dict:
    """Fill a DynamicCache built from a 31B-shaped config as a model would, and count the bytes it holds."""
    from transformers import DynamicCache

    config = testing.text_config(0, num_hidden_layers=60, layer_types=testing.layer_pattern_31b(), sliding_window=WINDOW)
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


def over_eager(modes: dict) -> dict:
    """Each compiled mode's median tokens/s over eager's, per batch size and phase."""
    eager = modes["eager"]["by_batch"]
    return {
        mode: {
            batch: {
                phase: figures[f"{phase}_tok_s"]["median"] / eager[batch][f"{phase}_tok_s"]["median"]
                for phase in ("prefill", "decode")
            }
            for batch, figures in result["by_batch"].items()
        }
        for mode, result in modes.items()
        if mode != "eager"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4])
    parser.add_argument(
        "--modes", type=lambda text: ["eager", *(m for m in text.split(",") if m != "eager")], default=list(MODES)
    )
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-runs", type=int, default=5, help="one-token generates per repeat (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--kv-lengths", type=lambda text: [int(n) for n in text.split(",")], default=[1024, 4096, 16384])
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--warm-start", choices=MODES[1:], help=argparse.SUPPRESS)  # the child of warm_first_generates
    args = parser.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warm_start:
        rewriter.compile("gemma4")
        model = benchmark_model(args)
        install(args.warm_start)
        inputs = prompts(model, args.device, args)
        print(json.dumps(first_generates(model, args.device, inputs, args, label="first_generate_warm")))
        return
    load_before = os.getloadavg()
    command = " ".join(["python", "benchmarks/generate_bench.py", *sys.argv[1:]])
    rewriter.restore("gemma4")
    unpatched_kv = kv_bytes(args.kv_lengths)
    report = rewriter.compile("gemma4")
    patched_kv = kv_bytes(args.kv_lengths)

    model = benchmark_model(args)
    modes = measure_modes(model, args.device, args)
    ratios = over_eager(modes)

    device = torch.cuda.get_device_name() if args.device == "cuda" else describe_machine()
    results = {
        "benchmark": "generate",
        "command": command,
        "machine": describe_machine(),
        "device": device,
        "shape": args.shape,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cache_origin": report.origin,
        "modes": modes,
        "over_eager": ratios,
        "slower_than_eager": [
            f"{mode} {batch} {phase} {ratio:.2f}x"
            for mode, batches in ratios.items()
            for batch, phases in batches.items()
            for phase, ratio in phases.items()
            if ratio < 1.0
        ],
        "roofline": roofline(model, args.device, args),
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
    print(f"{args.shape} {args.dtype} on {device}, {results['threads']} threads, load {load_before[0]:.1f}:")
    for mode, result in modes.items():
        for batch, figures in result["by_batch"].items():
            ratio = ratios.get(mode, {}).get(batch)
            versus = f" ({ratio['decode']:.2f}x decode, {ratio['prefill']:.2f}x prefill)" if ratio else ""
            warm = f" (warm {figures['first_generate_warm_s']:.1f} s)" if "first_generate_warm_s" in figures else ""
            print(f"  {mode} {batch}: decode {figures['decode_tok_s']['median']:.1f} tok/s{versus}, "
                  f"first generate {figures['first_generate_s']:.1f} s{warm}, {result['graphs']} graphs")
    print(f"  slower than eager: {', '.join(results['slower_than_eager']) or 'nowhere'}; "
          f"{results['recompile_limit_hits']} recompile-limit hits")


if __name__ == "__main__":
    main()
