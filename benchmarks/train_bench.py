"""One LoRA training step of tiny Gemma-4 and Gemma-3 text models with the real 262,144-token vocabulary: the eager
loss head against rewriter's fused, chunked one and TRL's fused LM head, in one run.

    nice -n 10 python benchmarks/train_bench.py [--tokens 2048] [--hidden 128] [--steps 3] [--threads N] [--json PATH]

Models: ``rewriter.testing``'s six-layer text configs at ``--hidden`` and the real vocabulary, Gemma-4 with its
soft cap of 30 and 262,144 per-layer-input tokens, Gemma-3 without a cap (as their checkpoints), float32, the LM
head tied to the input embedding. LoRA (peft, r=8) on the attention projections: the LM head is frozen. One batch
of 1 x ``--tokens`` random tokens, labels = inputs; AdamW on the adapters. Variants:

- ``eager``: the model's forward with labels, after ``rewriter.compile(family)`` (the fixes, no fused loss):
  transformers' ``ForCausalLMLoss`` on the full logits;
- ``fused``: the same forward with labels, after ``rewriter.compile(family, fused_loss=True)``: the rewritten
  forward computes ``rewriter.fused_loss.causal_lm_loss`` and no logits (the loss head alone: the base model's
  hidden states through ``fused_linear_cross_entropy`` with ``model.lm_head.weight`` and the model's soft cap);
- ``trl``: TRL 1.16 has no ``chunked_nll`` function: ``loss_type="chunked_nll"`` is a deprecated alias of ``"nll"``,
  which ``SFTTrainer`` computes with ``trl.trainer.utils.add_fused_lm_head`` (``ChunkedLogProbFunction``, torch ops
  off Triton devices) and the per-token outputs it asks for (log-probabilities, entropy, top-1 for its accuracy
  metric); this adds the head as ``SFTTrainer`` does and calls the model with ``fused_lm_head=True``.

Each (model, variant) runs in a process of its own, which measures, in order: the loss head alone (from the base
model's hidden states, as a leaf that requires grad: forward and backward), then ``--steps`` training steps (forward,
backward, AdamW step). Per phase: wall and CPU seconds, and the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs after returning freed heap memory with malloc_trim), absolute and above the resident memory
before the phase. Other jobs on the machine's cores stretch the wall time and, with several threads, the CPU time as
well (OpenMP threads spin while a sibling waits for a core): on a shared machine, ``--threads 1``. Tokens/s is of
the median step after the first (which allocates the optimizer's state), and of the fastest; tokens per CPU second
of the median. The whole process's ``ru_maxrss`` is reported too. Ratios are of this run's figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine

from rewriter.fused_loss import DEFAULT_CHUNK_SIZE, fused_linear_cross_entropy

VOCABULARY = 262_144
FAMILIES = ("gemma4", "gemma3")
VARIANTS = ("eager", "fused", "trl")
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks TRL's fused LM head for
NOTE = (
    "eager and fused train the model's own forward after rewriter.compile(family) and rewriter.compile(family, "
    "fused_loss=True); trl is SFTTrainer's loss_type='nll' (TRL 1.16's 'chunked_nll' is a deprecated alias of it): "
    "trl.trainer.utils.add_fused_lm_head with outputs " + ", ".join(SFT_OUTPUTS)
)


def build_model(family: str, hidden: int):
    """The tiny text model of ``family`` at the real vocabulary, float32, in training mode, with LoRA adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma4ForCausalLM

    from rewriter import testing

    widths = {"vocab_size": VOCABULARY, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    torch.manual_seed(0)
    if family == "gemma4":
        config = testing.text_config(0, vocab_size_per_layer_input=VOCABULARY, final_logit_softcapping=30.0, **widths)
        model = Gemma4ForCausalLM(config)
    else:
        model = Gemma3ForCausalLM(testing.gemma3_text_config(**widths))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model.train(), lora)


def eager_head(base, hidden_states, ids):
    """The model's own code after its backbone: LM head, soft cap, ``self.loss_function``."""
    import torch

    logits = base.lm_head(hidden_states)
    if (softcap := base.config.final_logit_softcapping) is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return base.loss_function(logits, ids, base.vocab_size)


def fused_head(base, hidden_states, ids):
    softcap = base.config.final_logit_softcapping
    return fused_linear_cross_entropy(hidden_states[:, :-1], base.lm_head.weight, ids[:, 1:], softcap=softcap)


def trl_head(base, hidden_states, ids):
    """``add_fused_lm_head``'s forward after the backbone, off Triton devices (every position scored)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    hidden_states, labels = hidden_states[:, :-1], ids[:, 1:]
    mask = labels != -100
    per_token = ChunkedLogProbFunction.apply(
        hidden_states.reshape(-1, hidden_states.shape[-1]),
        base.lm_head.weight,
        None,
        labels.clamp(min=0).reshape(-1),
        1.0,
        _CHUNKED_LOGPROB_CHUNK_SIZE,
        base.config.final_logit_softcapping,
        1.0,
        SFT_OUTPUTS,
    )
    log_probs = per_token[0].view(mask.shape).masked_fill(~mask, 0)
    return -log_probs.sum() / mask.sum().clamp(min=1)


HEADS = {"eager": eager_head, "fused": fused_head, "trl": trl_head}


def training_step(model, optimizer, variant: str, ids) -> float:
    optimizer.zero_grad(set_to_none=True)
    fused_lm_head = {"fused_lm_head": True} if variant == "trl" else {}
    outputs = model(input_ids=ids, labels=ids, use_cache=False, **fused_lm_head)
    if variant == "fused" and outputs.logits is not None:
        raise RuntimeError("the forward computed the logits: the fused loss is not installed")
    loss = outputs.loss
    loss.backward()
    optimizer.step()
    return loss.item()


def memory_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(function) -> dict:
    """The loss ``function()`` returns, its wall and CPU seconds, and the process's peak resident memory while it
    ran, in MiB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start, cpu = time.perf_counter(), cpu_seconds()
    loss = function()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = memory_kib("VmHWM")
    return {
        "loss": loss,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": peak / 1024,
        "added_peak_mib": (peak - before) / 1024,
    }


def loss_head_alone(variant: str, base, ids) -> dict:
    """``measured`` forward and backward of ``variant``'s loss head from the base model's hidden states."""
    import torch

    with torch.no_grad():
        hidden_states = base.model(input_ids=ids, use_cache=False).last_hidden_state
    hidden_states.requires_grad_()

    def forward_and_backward() -> float:
        loss = HEADS[variant](base, hidden_states, ids)
        loss.backward()
        return loss.item()

    return measured(forward_and_backward)


def run_case(family: str, variant: str, args) -> dict:
    """One (model, variant): the loss head alone, then the training steps, in this process."""
    import torch

    import rewriter

    if args.threads:
        torch.set_num_threads(args.threads)
    rewriter.compile(family, fused_loss=variant == "fused")
    model = build_model(family, args.hidden)
    base = model.get_base_model()
    if variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(base, outputs=SFT_OUTPUTS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, VOCABULARY, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    head = loss_head_alone(variant, base, ids)
    steps = [measured(lambda: training_step(model, optimizer, variant, ids)) for _ in range(args.steps)]
    return {
        "loss_head": head,
        "steps": steps,
        "tokens_per_s": args.tokens / statistics.median(step["seconds"] for step in steps[1:]),
        "tokens_per_s_best": args.tokens / min(step["seconds"] for step in steps[1:]),
        "tokens_per_cpu_s": args.tokens / statistics.median(step["cpu_seconds"] for step in steps[1:]),
        "step_peak_rss_mib": max(step["peak_rss_mib"] for step in steps),
        "step_added_peak_mib": max(step["added_peak_mib"] for step in steps),
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }


def case(family: str, variant: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        family,
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--steps",
        str(args.steps),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return {"failed": run.stderr.strip().splitlines()[-1:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def ratios(rows: dict) -> dict:
    """fused over eager and over trl: step peak, peaks above the resident memory before the phase, tokens/s."""
    figures = {
        "step_peak_rss": lambda row: row["step_peak_rss_mib"],
        "step_added_peak": lambda row: row["step_added_peak_mib"],
        "loss_head_added_peak": lambda row: row["loss_head"]["added_peak_mib"],
        "loss_head_seconds": lambda row: row["loss_head"]["seconds"],
        "loss_head_cpu_seconds": lambda row: row["loss_head"]["cpu_seconds"],
        "tokens_per_s": lambda row: row["tokens_per_s"],
        "tokens_per_cpu_s": lambda row: row["tokens_per_cpu_s"],
    }
    measured_ok = {variant for variant, row in rows.items() if "failed" not in row}
    return {
        f"fused_over_{other}": {name: figure(rows["fused"]) / figure(rows[other]) for name, figure in figures.items()}
        for other in ("eager", "trl")
        if {"fused", other} <= measured_ok
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps per case, at least 2")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--case", nargs=2, metavar=("FAMILY", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case, args)))
        return
    import peft
    import torch
    import transformers
    import trl

    load_before = os.getloadavg()[0]
    models = {family: {variant: case(family, variant, args) for variant in args.variants} for family in args.families}
    result = {
        "benchmark": "train_step",
        "machine": describe_machine(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "command": "python " + " ".join(sys.argv),
        "tokens": args.tokens,
        "hidden": args.hidden,
        "steps": args.steps,
        "vocabulary": VOCABULARY,
        "fused_chunk_size": DEFAULT_CHUNK_SIZE,
        "note": NOTE,
        "models": {family: {"variants": rows, "ratios": ratios(rows)} for family, rows in models.items()},
    }
    for family, rows in models.items():
        for variant, row in rows.items():
            if "failed" in row:
                print(f"{family} {variant:5}: failed {row['failed']}")
                continue
            head = row["loss_head"]
            print(
                f"{family} {variant:5}: loss {row['steps'][0]['loss']:.6f}, {row['tokens_per_s']:.1f} tokens/s "
                f"({row['tokens_per_cpu_s']:.1f} per CPU second), "
                f"step peak {row['step_peak_rss_mib']:.0f} MiB (+{row['step_added_peak_mib']:.0f}), "
                f"loss head +{head['added_peak_mib']:.0f} MiB in {head['seconds']:.1f} s "
                f"({head['cpu_seconds']:.1f} CPU s)"
            )
        for name, figures in result["models"][family]["ratios"].items():
            print(f"{family} {name}: " + ", ".join(f"{key} {value:.2f}x" for key, value in figures.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
