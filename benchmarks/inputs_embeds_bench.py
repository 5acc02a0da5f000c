"""Memory and time of Gemma-4's per-layer token lookup from ``inputs_embeds`` alone, at E2B's vocabulary.

    python benchmarks/inputs_embeds_bench.py [--tokens 1 4 16] [--dtypes bfloat16 float32] [--json benchmarks/results/inputs-embeds-e2b-cpu.json]

Each case runs in a process of its own: the real ``Gemma4TextModel.get_per_layer_inputs`` of the installed
transformers, stock or patched (``per-layer-inputs-from-embeds``), on an embedding table of E2B's shape (262,144 x
1,536, bfloat16 and float32) and a small per-layer table in its place of E2B's 262,144 x 8,960 (the lookup does not depend on
it). Reported: the peak resident memory the call adds over the process's before it (``ru_maxrss``), and its wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

VOCABULARY, HIDDEN = 262_144, 1_536
CASE = """
import json, resource, sys, time, types
import torch
import rewriter
from transformers.models.gemma4 import modeling_gemma4

mode, tokens, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
if mode == "patched":
    rewriter.compile("gemma4")
torch.manual_seed(0)
torch.set_default_dtype(dtype)  # the table made in its dtype: no float32 copy raises the peak before the call
model = types.SimpleNamespace(  # what the method reads of the model
    config=types.SimpleNamespace(hidden_size={hidden}, num_hidden_layers=1),
    hidden_size_per_layer_input=8,
    embed_tokens=modeling_gemma4.Gemma4TextScaledWordEmbedding({vocabulary}, {hidden}, 0, embed_scale={hidden} ** 0.5),
    embed_tokens_per_layer=torch.nn.Embedding({vocabulary}, 8),
)
ids = torch.randint(0, {vocabulary}, (1, tokens), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    embeds = model.embed_tokens(ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    with torch.no_grad():
        modeling_gemma4.Gemma4TextModel.get_per_layer_inputs(model, None, embeds)
    outcome = "ok"
except RuntimeError as error:
    outcome = "RuntimeError"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"outcome": outcome, "added_peak_mib": (peak - before) / 1024, "seconds": seconds}}))
""".format(vocabulary=VOCABULARY, hidden=HIDDEN)


def case(mode: str, tokens: int, dtype: str) -> dict:
    run = subprocess.run([sys.executable, "-c", CASE, mode, str(tokens), dtype], capture_output=True, text=True)
    if run.returncode != 0:
        return {"outcome": f"failed: {run.stderr.strip().splitlines()[-1:]}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    import transformers

    rows = [
        {"dtype": dtype, "mode": mode, "tokens": tokens, **case(mode, tokens, dtype)}
        for dtype in args.dtypes
        for tokens in args.tokens
        for mode in ("stock", "patched")
    ]
    result = {
        "benchmark": "inputs_embeds",
        "machine": describe_machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vocabulary": VOCABULARY,
        "hidden": HIDDEN,
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    for row in rows:
        print(f"{row['dtype']:8} {row['mode']:8} {row['tokens']:3} tokens: {row.get('outcome')}, "
              f"+{row.get('added_peak_mib', float('nan')):.0f} MiB peak, {row.get('seconds', float('nan')):.3f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
