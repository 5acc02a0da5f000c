"""Run inside an environment with the latest transformers release: the bugs still open there, unpatched, then
patched. Prints one JSON object.

    python tests/release_check_latest.py CACHE_DIR

- text-only-output-properties: every model output of Gemma-3, Gemma-3n and Gemma-4 whose ``image_hidden_states``
  (``audio_hidden_states``) is a property, made without that modality as the models make it for text-only
  batches, and a real text-only and image forward of Gemma-4 and Gemma-3: the property raises, or gives ``None``
  (5.23.0's field did) and the pooled features when there is an image.
- per-layer-inputs-from-embeds: logits from ``inputs_embeds`` against the ``input_ids`` path on the same weights.
- flash-attention-image-mask: Gemma-3 built for FlashAttention (refused, or let through), and image and text
  batches under it against sdpa on the same weights.
- processor-double-bos: how many ``<bos>`` the Gemma-3 and Gemma-3n processors put before a rendered chat prompt.

Used by tests/test_latest_release.py; kept a plain script so that it runs under whatever transformers that
environment has.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch

import rewriter
from rewriter import testing

FAMILIES = ("gemma3", "gemma3n", "gemma4")
PROPERTIES = ("image_hidden_states", "audio_hidden_states")


def read(get):
    """What ``get()`` gives, as JSON: ``None``, a bool, the name of its type, or the name of the exception it raises."""
    try:
        value = get()
    except Exception as error:
        return type(error).__name__
    return value if value is None or isinstance(value, bool) else type(value).__name__


def output_properties() -> dict:
    found = {}
    for family in FAMILIES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for name, cls in vars(module).items():
            for prop in PROPERTIES:
                if name.endswith("OutputWithPast") and isinstance(getattr(cls, prop, None), property):
                    found[f"{name}.{prop}"] = read(lambda: getattr(cls(), prop))
    return found


def multimodal_forward() -> dict:
    from transformers import Gemma3ForConditionalGeneration, Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    gemma4 = Gemma4ForConditionalGeneration(testing.vision_config()).eval()
    torch.manual_seed(0)
    gemma3 = Gemma3ForConditionalGeneration(testing.gemma3_vision_config()).eval()
    pixels, positions = testing.image_patches()
    with torch.no_grad():
        text = gemma4(input_ids=testing.input_ids())
        image = gemma4(input_ids=testing.image_prompt(), pixel_values=pixels, image_position_ids=positions)
        gemma3_text = gemma3(input_ids=testing.input_ids())
    return {
        "gemma4 text-only": read(lambda: text.image_hidden_states),
        "gemma4 image is the pooled output": read(lambda: image.image_hidden_states is image.image_outputs.pooler_output),
        "gemma3 text-only": read(lambda: gemma3_text.image_hidden_states),
    }


def inputs_embeds_gaps() -> dict:
    """max |logits(inputs_embeds) - logits(input_ids)| per family and dtype, or the exception raised."""
    gaps = {}
    ids = testing.input_ids(batch=2, length=12)
    for family in ("gemma4", "gemma3n"):
        for dtype in (torch.float32, torch.bfloat16):
            model = testing.per_layer_inputs_model(family, dtype)
            with torch.no_grad():
                by_ids = model(input_ids=ids).logits
                try:
                    by_embeddings = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
                    gap = (by_embeddings - by_ids).abs().max().item()
                except RuntimeError as error:
                    gap = type(error).__name__
            gaps[f"{family} {str(dtype).removeprefix('torch.')}"] = gap
    return gaps


def flash_attention() -> dict:
    """Gemma-3 under FlashAttention: what building the model raises (no FlashAttention package here: ImportError
    means the model itself let it through), and, through ``testing.flash_attention_stand_in``, an image batch and
    a text batch against sdpa on the same weights."""
    found = {"load": read(lambda: testing.gemma3_image_model("flash_attention_2"))}
    model, image = testing.gemma3_image_model(), testing.gemma3_image_inputs()
    text = {"input_ids": testing.input_ids(batch=2, length=10)}
    for name, inputs in (("image", image), ("text", text)):
        with torch.no_grad():
            sdpa = model(**inputs).logits
            testing.use_attention(model, "flash_attention_2")
            try:
                with testing.flash_attention_stand_in():
                    found[name] = (model(**inputs).logits - sdpa).abs().max().item()
            except ValueError as error:
                found[name] = type(error).__name__
            testing.use_attention(model, "sdpa")
    return found


def processor_bos() -> dict:
    """How many ``<bos>`` the processors put before a prompt that ``apply_chat_template(tokenize=False)`` rendered."""
    found = {}
    for family in ("gemma3", "gemma3n"):
        processor = testing.processor(family)
        messages = [{"role": "user", "content": [{"type": "text", "text": "w1 w2"}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = processor(text=prompt)["input_ids"][0]
        found[family] = next(i for i, token in enumerate(ids) if token != processor.tokenizer.bos_token_id)
    return found


def checks() -> dict:
    return {
        "output_properties": output_properties(),
        "forward": multimodal_forward(),
        "inputs_embeds": inputs_embeds_gaps(),
        "flash_attention": flash_attention(),
        "processor_bos": processor_bos(),
    }


def main(cache_dir: str) -> dict:
    import transformers

    result = {"transformers": transformers.__version__, "unpatched": checks()}
    reports = {family: rewriter.compile(family, cache_dir=cache_dir, strict=True) for family in FAMILIES}
    result["patched"] = checks()
    result["origin"] = {family: report.origin for family, report in reports.items()}
    result["outcomes"] = {
        family: {outcome.rule: [outcome.status, outcome.sites] for outcome in report.outcomes}
        for family, report in reports.items()
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
