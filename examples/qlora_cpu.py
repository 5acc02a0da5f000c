"""QLoRA fine-tuning of a Gemma-4 model with KV-shared layers, on a CPU, with rewriter's fixes in place.

    python examples/qlora_cpu.py [--steps 8] [--checkpoint DIR]

Copy it and point ``--checkpoint`` at a real Gemma-4 E2B or E4B folder. Without one, it saves a tiny
random-weight model with E2B's KV sharing (sized for bitsandbytes on the CPU) and trains that.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import rewriter

# First, before the model exists: KV-shared layers then see the right K/V with use_cache=False.
report = rewriter.compile("gemma4")

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig, Gemma4ForCausalLM  # noqa: E402

from rewriter import testing  # noqa: E402

QLORA_WIDTHS = dict(hidden_size=128, intermediate_size=256, head_dim=32, global_head_dim=64, hidden_size_per_layer_input=64)


def tiny_checkpoint() -> str:
    """A tiny Gemma-4 with two KV-shared layers; bitsandbytes on a CPU needs linears 64 wide or more."""
    folder = tempfile.mkdtemp(prefix="gemma4-tiny-")
    torch.manual_seed(0)
    Gemma4ForCausalLM(testing.text_config(2, **QLORA_WIDTHS)).save_pretrained(folder)
    return folder


def load_for_qlora(checkpoint: str):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = Gemma4ForCausalLM.from_pretrained(checkpoint, quantization_config=quantization, device_map="cpu")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint", help="a Gemma-4 folder (default: a tiny random one)")
    args = parser.parse_args()
    print(f"rewriter: {', '.join(f'{o.rule} {o.status}' for o in report.outcomes)}")

    model = load_for_qlora(args.checkpoint or tiny_checkpoint())
    batch = testing.input_ids(batch=2, length=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss  # as every QLoRA recipe sets it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    tokens = model.generate(input_ids=batch[:1, :8], max_new_tokens=8, do_sample=False)
    print(f"generated: {tokens[0, 8:].tolist()}")


if __name__ == "__main__":
    main()
