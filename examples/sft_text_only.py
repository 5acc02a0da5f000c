"""Fine-tune a Gemma-4 (or Gemma-3) multimodal model on text-only data with TRL's SFTTrainer, LoRA adapters and
gradient accumulation, with rewriter's fixes in place.

    python examples/sft_text_only.py [--checkpoint DIR] [--family gemma4] [--steps 3] [--batch 2] [--accumulation 2]
    torchrun --nproc-per-node 2 examples/sft_text_only.py --batch 1     # the same global batch on two processes

Copy it and point ``--checkpoint`` at a real Gemma-4 31B / 26B-A4B or Gemma-3 folder, with your own dataset.
Without one, each process builds the same tiny random-weight model, and a tokenizer of made-up words. On a machine
without a GPU it trains on the CPU, and torchrun's processes talk over gloo.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

import rewriter

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--family", choices=("gemma4", "gemma3"), default="gemma4")
parser.add_argument("--checkpoint", help="a model folder (default: a tiny random model)")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--batch", type=int, default=2, help="rows per process and micro-batch")
parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
parser.add_argument("--output-dir", default="sft-output")
args = parser.parse_args()

# First, before the model exists: text-only batches train, the loss is right under accumulation.
report = rewriter.compile(args.family)

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from rewriter import testing  # noqa: E402


def model_and_tokenizer():
    if args.checkpoint:
        model = AutoModelForImageTextToText.from_pretrained(args.checkpoint)
        return model, AutoTokenizer.from_pretrained(args.checkpoint)
    if args.family == "gemma4":
        config = testing.vision_config(use_bidirectional_attention="vision")  # as Gemma-4 31B and 26B-A4B
    else:
        config = testing.gemma3_vision_config()
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config), testing.word_tokenizer()


def main() -> None:
    model, tokenizer = model_and_tokenizer()
    use_cpu = not torch.cuda.is_available()
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun or accelerate launch
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and launched_distributed else None,
    )
    text_attention = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=text_attention)
    dataset = Dataset.from_dict({"text": testing.sentences(16)})  # your dataset: a "text" column, or chat "messages"
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    if trainer.is_world_process_zero():
        print(f"rewriter: {', '.join(f'{o.rule} {o.status}' for o in report.outcomes)}")
        print(f"world size {trainer.args.world_size}")
    trainer.train()
    if trainer.is_world_process_zero():
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step']}: loss {entry['loss']:.6f}")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # Free the DDP model (its gradient reducer holds the process group) before destroying the group, and destroy
        # it before Python shuts down. Otherwise the group's last owner is the reducer, freed while holding the GIL
        # that gloo's worker threads need to release their last collective's tensors: a deadlock, or at shutdown an
        # abort ("terminate called without an active exception"), in about 1 run in 8 here (torch 2.13).
        gc.collect()
        torch.distributed.destroy_process_group()
