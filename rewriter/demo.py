"""``python -m rewriter demo``: show Gemma-4, Gemma-3 and Gemma-2 bugs on the unpatched source, compile, and show them
fixed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewriter import testing


@dataclass(frozen=True)
class Check:
    bug: str
    what: str
    run: object  # () -> (fixed: bool, observation: str)


def static_cache_generate() -> tuple[bool, str]:
    """Bug 1, StaticCache: ``num_kv_shared_layers=0`` builds a cache with no layers and ``generate`` crashes."""
    model, ids = testing.causal_lm(0), testing.input_ids()
    try:
        static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    except IndexError as error:
        return False, f"IndexError: {error}"
    dynamic = model.generate(ids, max_new_tokens=8, do_sample=False)
    same = torch.equal(static, dynamic)
    return same, f"{static.shape[1] - ids.shape[1]} tokens, {'same as' if same else 'unlike'} DynamicCache"


def dynamic_cache_layers() -> tuple[bool, str]:
    """Bug 1, DynamicCache: no layers are built, so sliding layers fall back to keeping every position."""
    from transformers import DynamicCache

    model, ids = testing.causal_lm(0), testing.input_ids(length=16)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    kinds = [type(layer).__name__ for layer in cache.layers]
    sliding = sum(kind == "DynamicSlidingWindowLayer" for kind in kinds)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return sliding == 3, f"{sliding} of 3 sliding layers windowed, {kv_bytes:,} KV bytes"


def use_cache_parity() -> tuple[bool, str]:
    """Bug 2: KV-shared layers give other logits with ``use_cache=False`` than with a cache."""
    model, ids = testing.causal_lm(2), testing.input_ids()
    with torch.no_grad():
        cached = model(ids, use_cache=True).logits
        uncached = model(ids, use_cache=False).logits
    gap = (cached - uncached).abs().max().item()
    return gap == 0.0, f"max |logits(cache) - logits(no cache)| = {gap:.4g}"


def packed_input_proj() -> tuple[bool, str]:
    """Bug 3: a bitsandbytes 4-bit packed ``input_proj`` weight crashes the vision tower."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from bitsandbytes.nn import Params4bit
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(testing.vision_config()).eval()
    embedder = model.model.vision_tower.patch_embedder
    pixels, positions = testing.image_patches()
    packed, state = quantize_4bit(embedder.input_proj.weight.detach().to(torch.bfloat16))
    reference = F.linear((2 * (pixels - 0.5)).to(torch.bfloat16), dequantize_4bit(packed, state))
    embedder.input_proj.weight = Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    with torch.no_grad():
        try:
            model.model.get_image_features(pixels, positions)
            projected = embedder.input_proj(2 * (pixels - 0.5))
        except RuntimeError as error:
            return False, f"RuntimeError: {error}"
    gap = (projected - reference).abs().max().item()
    return gap == 0.0, f"vision forward runs; max |input_proj - F.linear(dequantized)| = {gap:.4g}"


def inputs_embeds_bfloat16() -> tuple[bool, str]:
    """per-layer-inputs-from-embeds: bfloat16 ``inputs_embeds`` alone find no token (and every vector is compared
    with the whole vocabulary at once)."""
    model, ids = testing.per_layer_inputs_model("gemma4", torch.bfloat16), testing.input_ids()
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        try:
            by_embeddings = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        except RuntimeError as error:
            return False, f"RuntimeError: {str(error)[:60]}..."
    gap = (by_embeddings - by_ids).abs().max().item()
    return gap == 0.0, f"max |logits(inputs_embeds) - logits(input_ids)| = {gap:.4g}"


def text_only_image_hidden_states() -> tuple[bool, str]:
    """text-only-output-properties (5.24.0 on): ``image_hidden_states`` of a text-only output raises."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ModelOutputWithPast

    try:
        value = Gemma4ModelOutputWithPast().image_hidden_states
    except AttributeError as error:
        return False, f"AttributeError: {error}"
    return value is None, f"image_hidden_states = {value}"


def processor_bos() -> tuple[bool, str]:
    """processor-double-bos: the processor puts a second ``<bos>`` before a prompt ``apply_chat_template`` rendered."""
    processor = testing.processor("gemma3")
    messages = [{"role": "user", "content": [{"type": "text", "text": "w1 w2"}]}]
    ids = processor(text=processor.apply_chat_template(messages, tokenize=False))["input_ids"][0]
    count = next(i for i, token in enumerate(ids) if token != processor.tokenizer.bos_token_id)
    return count == 1, f"{count} <bos> before the prompt"


def flash_attention_images() -> tuple[bool, str]:
    """flash-attention-image-mask: under FlashAttention (a CPU stand-in of its kernel), Gemma-3 image tokens lose
    the bidirectional mask over their image."""
    model, inputs = testing.gemma3_image_model(), testing.gemma3_image_inputs()
    with torch.no_grad(), testing.flash_attention_stand_in():
        sdpa = model(**inputs).logits
        testing.use_attention(model, "flash_attention_2")
        try:
            gap = (model(**inputs).logits - sdpa).abs().max().item()
        except ValueError as error:
            if "Flash Attention cannot" not in str(error):
                raise
            return True, "image batch refused (ValueError)"
    return False, f"image batch runs, max |logits - sdpa's| = {gap:.3g}"


def audio_eager_mask() -> tuple[bool, str]:
    """audio-eager-mask: under eager attention the audio tower attends exactly where its mask says not to."""
    sdpa = testing.audio_features(testing.audio_tower("sdpa"))
    gap = (testing.audio_features(testing.audio_tower("eager")) - sdpa).abs().max().item()
    return gap == 0.0, f"max |audio features(eager) - (sdpa)| = {gap:.3g}"


def softcap_default_attention() -> tuple[bool, str]:
    """softcap-sdpa: a Gemma-2 built with no ``attn_implementation`` runs SDPA, which drops the attention softcap."""
    ids = testing.input_ids(batch=2)
    model = testing.gemma2_model()
    with torch.no_grad():
        gap = (model(ids).logits - testing.gemma2_model("eager")(ids).logits).abs().max().item()
    return gap == 0.0, f"{model.config._attn_implementation}: max |logits - eager's| = {gap:.3g}"


ROTARY_ORDER = """
import sys
import rewriter
from rewriter import testing
if sys.argv[1] == "patched":
    rewriter.compile("gemma4")
names = [name.split(".")[-1] for name, _ in testing.causal_lm(2).named_buffers() if name.endswith("attention_inv_freq")]
print(", ".join(name.removesuffix("_attention_inv_freq") for name in names))
"""


def rotary_buffer_order() -> tuple[bool, str]:
    """Rotary order: processes with other string hash seeds (two ranks of one job) order the buffers differently."""
    import rewriter

    state = "patched" if rewriter.compiled("gemma4") is not None else "unpatched"
    orders = [
        subprocess.run(
            [sys.executable, "-c", ROTARY_ORDER, state],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("0", "1")
    ]
    return orders[0] == orders[1], f"hash seed 0: {orders[0]}; hash seed 1: {orders[1]}"


FAMILIES = ("gemma4", "gemma3", "gemma2")  # compiled by the demo, the families of the checks
CHECKS = (
    Check("1 kv-shared-slice", "StaticCache generate, num_kv_shared_layers=0", static_cache_generate),
    Check("1 kv-shared-slice", "DynamicCache sliding layers after 40 tokens", dynamic_cache_layers),
    Check("2 kv-sharing-without-cache", "use_cache=False vs True, 2 KV-shared layers", use_cache_parity),
    Check("3 input-proj-dequant", "vision tower with a 4-bit packed input_proj", packed_input_proj),
    Check("4 rotary-buffer-order", "inv_freq buffer order in two processes", rotary_buffer_order),
    Check("5 per-layer-inputs-from-embeds", "bfloat16 inputs_embeds vs input_ids", inputs_embeds_bfloat16),
    Check("6 processor-double-bos", "Gemma-3 processor on a rendered chat prompt", processor_bos),
    Check("7 flash-attention-image-mask", "Gemma-3 image batch under FlashAttention", flash_attention_images),
    Check("8 softcap-sdpa", "Gemma-2 default attention vs eager, softcap 1.0", softcap_default_attention),
)
TEXT_ONLY_OUTPUT = Check(
    "10 text-only-output-properties", "image_hidden_states of a text-only output", text_only_image_hidden_states
)
AUDIO_MASK = Check("9 audio-eager-mask", "Gemma-4 audio tower, eager vs sdpa, a padded clip", audio_eager_mask)


def checks() -> tuple[Check, ...]:
    """``CHECKS``, and those of the bugs only some releases have, where the installed release has them: output
    properties from 5.24.0; an audio tower that takes sdpa's mask, so that eager can be compared with it, to 5.19.x."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4ModelOutputWithPast

    later = {
        TEXT_ONLY_OUTPUT: isinstance(getattr(Gemma4ModelOutputWithPast, "image_hidden_states", None), property),
        AUDIO_MASK: Gemma4AudioModel._supports_sdpa,
    }
    return (*CHECKS, *(check for check, present in later.items() if present))


def run(console) -> bool:
    """Print the report and the before/after table; ``True`` when every bug is shown fixed."""
    from rich.table import Table

    import rewriter
    from rewriter.tables import report_table

    shown = checks()
    before = [check.run() for check in shown]
    reports = [rewriter.compile(family) for family in FAMILIES]
    for report in reports:
        console.print(report_table(report))
    after = [check.run() for check in shown]

    title = f"Gemma bugs on transformers {reports[0].transformers_version}: unpatched vs compiled"
    table = Table(title=title)
    for column in ("bug", "unpatched", "after rewriter.compile", ""):
        table.add_column(column)
    for check, (_, seen), (fixed, now) in zip(shown, before, after):
        verdict = "[green]fixed[/]" if fixed else "[red]NOT FIXED[/]"
        table.add_row(f"{check.bug}\n[dim]{check.what}[/]", seen, now, verdict)
    console.print(table)
    return all(fixed for fixed, _ in after)
