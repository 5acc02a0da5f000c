"""Drift: the real transformers 5.5.0 sources, mutated the ways upstream could change them.

Each mutation leaves one rule facing a shape it does not know: that rule reports ``drift`` with a message naming
the rule, the file and the expected shape, installs nothing, and the other rules still apply; ``strict=True``
raises ``RuleDriftError`` before anything at all is installed.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import transformers
from transformers import trainer
from transformers.integrations import sdpa_attention
from transformers.models.gemma4 import modeling_gemma4

import rewriter
from rewriter.families import FAMILIES
from rewriter.install import _live_function
from tests.conftest import mutated_transformers

CACHE_UTILS, MODELING, TRAINER = "cache_utils.py", "models/gemma4/modeling_gemma4.py", "trainer.py"
FAMILY_OF = {CACHE_UTILS: "gemma4", MODELING: "gemma4", TRAINER: "trainer"}
EXPECTED = {rule.id: rule.expected for family in FAMILIES.values() for _, rule in family.rules()}


def rules_of(family: str) -> list[str]:
    return [rule.id for _, rule in FAMILIES[family].rules()]

MUTATIONS = {
    "slice rewritten a third way": (
        "kv-shared-slice",
        CACHE_UTILS,
        "layer_types[: -",
        "layer_types[: -1 * ",
    ),
    "attention class renamed": (
        "kv-sharing-without-cache",
        MODELING,
        "class Gemma4TextAttention(nn.Module):",
        "class Gemma4SelfAttention(nn.Module):",
    ),
    "attention forward restructured": (
        "kv-sharing-without-cache",
        MODELING,
        "                past_key_values.shared_layers[self.layer_idx] = key_states, value_states",
        "                past_key_values.shared_layers.update({self.layer_idx: (key_states, value_states)})",
    ),
    "patch embedder renamed": (
        "input-proj-dequant",
        MODELING,
        "class Gemma4VisionPatchEmbedder(nn.Module):",
        "class Gemma4PatchEmbed(nn.Module):",
    ),
    "rotary layer types kept in a frozenset": (
        "rotary-buffer-order",
        MODELING,
        "self.layer_types = set(config.layer_types)",
        "self.layer_types = frozenset(config.layer_types)",
    ),
    "model's layer types kept in a frozenset": (
        "rotary-compute-order",
        MODELING,
        "self.unique_layer_types = set(self.config.layer_types)",
        "self.unique_layer_types = frozenset(self.config.layer_types)",
    ),
    "training check warns instead of raising": (
        "text-only-training",
        MODELING,
        'raise ValueError("`mm_token_type_ids` is required as a model input when training")',
        'logger.warning("`mm_token_type_ids` is missing: the batch is all text")',
    ),
    "loss normalised some third way": (
        "loss-accumulation",
        MODELING,
        "loss_fct = nn.CrossEntropyLoss()",
        "loss_fct = nn.NLLLoss()",
    ),
    "pooler scales out of place": (
        "fp16-vision-pooler",
        MODELING,
        "hidden_states *= self.root_hidden_size",
        "hidden_states = hidden_states * self.root_hidden_size",
    ),
    "accumulation steps handed over another way": (
        "accumulation-double-division",
        TRAINER,
        'grad_acc_kwargs["num_steps"] = self.args.gradient_accumulation_steps',
        "grad_acc_kwargs.update(num_steps=self.args.gradient_accumulation_steps)",
    ),
}


def functions():
    """The code of every function some rule patches on 5.5.0."""
    return {
        "DynamicCache.__init__": transformers.DynamicCache.__init__.__code__,
        "StaticCache.__init__": transformers.StaticCache.__init__.__code__,
        # transformers wraps this constructor at import (hub kernels): the function patched is the one it wraps
        "Gemma4TextAttention.__init__": _live_function(modeling_gemma4, "Gemma4TextAttention.__init__").__code__,
        "Gemma4TextAttention.forward": modeling_gemma4.Gemma4TextAttention.forward.__code__,
        "Gemma4ForCausalLM.__init__": modeling_gemma4.Gemma4ForCausalLM.__init__.__code__,
        "Gemma4Model.__init__": modeling_gemma4.Gemma4Model.__init__.__code__,
        "Gemma4TextModel.__init__": modeling_gemma4.Gemma4TextModel.__init__.__code__,
        "Gemma4TextModel.forward": inspect.unwrap(modeling_gemma4.Gemma4TextModel.forward).__code__,
        "Gemma4TextModel.get_per_layer_inputs": modeling_gemma4.Gemma4TextModel.get_per_layer_inputs.__code__,
        "Gemma4VisionPatchEmbedder.__init__": modeling_gemma4.Gemma4VisionPatchEmbedder.__init__.__code__,
        "Gemma4VisionPatchEmbedder.forward": modeling_gemma4.Gemma4VisionPatchEmbedder.forward.__code__,
        "Gemma4TextRotaryEmbedding.__init__": modeling_gemma4.Gemma4TextRotaryEmbedding.__init__.__code__,
        "create_causal_mask_mapping": modeling_gemma4.create_causal_mask_mapping.__code__,
        "Gemma4ForConditionalGeneration.__init__": modeling_gemma4.Gemma4ForConditionalGeneration.__init__.__code__,
        "Gemma4ForConditionalGeneration.forward": inspect.unwrap(
            modeling_gemma4.Gemma4ForConditionalGeneration.forward
        ).__code__,
        "Gemma4VisionPooler.forward": modeling_gemma4.Gemma4VisionPooler.forward.__code__,
        "Gemma4VisionModel.forward": inspect.unwrap(modeling_gemma4.Gemma4VisionModel.forward).__code__,
        "Trainer.create_accelerator_and_postprocess": trainer.Trainer.create_accelerator_and_postprocess.__code__,
        "use_gqa_in_sdpa": sdpa_attention.use_gqa_in_sdpa.__code__,
        "sdpa_attention_forward": sdpa_attention.sdpa_attention_forward.__code__,
        "Gemma4AudioAttention.forward": modeling_gemma4.Gemma4AudioAttention.forward.__code__,
        "Gemma4AudioModel._convert_4d_mask_to_blocked_5d": modeling_gemma4.Gemma4AudioModel._convert_4d_mask_to_blocked_5d.__code__,
        "Gemma4AudioFeedForward.forward": modeling_gemma4.Gemma4AudioFeedForward.forward.__code__,
        "Gemma4AudioLightConv1d.forward": modeling_gemma4.Gemma4AudioLightConv1d.forward.__code__,
        "Gemma4TextRouter.forward": modeling_gemma4.Gemma4TextRouter.forward.__code__,
        "Gemma4Model.forward": inspect.unwrap(modeling_gemma4.Gemma4Model.forward).__code__,
    }


NOT_NEEDED = {  # on 5.5.0
    "text-only-output-properties",
    "audio-sdpa-fallback",
    "per-layer-inputs-none",
    "video-features-tuple",
}
# kv-sharing-fsdp2 rewrites the shared K/V dict that kv-sharing-without-cache inserts.
DRIFTS_WITH = {"kv-sharing-without-cache": ("kv-sharing-fsdp2",)}
TOUCHED_BY = {
    "kv-shared-slice": {"DynamicCache.__init__", "StaticCache.__init__"},
    "kv-sharing-without-cache": {
        "Gemma4TextAttention.__init__",
        "Gemma4TextAttention.forward",
        "Gemma4TextModel.__init__",
        "Gemma4TextModel.forward",
        "Gemma4ForCausalLM.__init__",
        "Gemma4Model.__init__",
        "Gemma4ForConditionalGeneration.__init__",
    },
    "kv-sharing-fsdp2": {"Gemma4TextModel.forward"},
    "per-layer-inputs-from-embeds": {"Gemma4TextModel.get_per_layer_inputs"},
    "text-only-output-properties": set(),  # not needed on 5.5.0
    "audio-sdpa-fallback": set(),  # not needed on 5.5.0
    "per-layer-inputs-none": set(),  # not needed on 5.5.0
    "video-features-tuple": set(),  # not needed on 5.5.0
    "sdpa-gqa-head-dim": {"use_gqa_in_sdpa", "sdpa_attention_forward"},
    "audio-eager-mask": {"Gemma4AudioModel._convert_4d_mask_to_blocked_5d"},
    "audio-features-dtype": {"Gemma4Model.forward"},
    "audio-quantized-weights": {
        "Gemma4AudioAttention.forward",
        "Gemma4AudioFeedForward.forward",
        "Gemma4AudioLightConv1d.forward",
    },
    "router-softmax-float32": {"Gemma4TextRouter.forward"},
    "image-bidirectional-mask": {"create_causal_mask_mapping"},
    "input-proj-dequant": {"Gemma4VisionPatchEmbedder.__init__", "Gemma4VisionPatchEmbedder.forward"},
    "rotary-buffer-order": {"Gemma4TextRotaryEmbedding.__init__"},
    "rotary-compute-order": {"Gemma4TextModel.__init__"},
    "text-only-training": {"create_causal_mask_mapping"},
    "loss-accumulation": {"Gemma4ForConditionalGeneration.__init__", "Gemma4ForConditionalGeneration.forward"},
    "fp16-vision-pooler": {"Gemma4VisionPooler.forward", "Gemma4VisionModel.forward"},
    "accumulation-double-division": {"Trainer.create_accelerator_and_postprocess"},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_drift_is_reported_and_only_that_rule_is_left_out(mutation, tmp_path, monkeypatch, caplog):
    rule, target, old, new = MUTATIONS[mutation]
    mutated_transformers(tmp_path / "src", monkeypatch, target, old, new)
    originals = functions()
    family = FAMILY_OF[target]
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = rewriter.compile(family, cache_dir=tmp_path / "cache")
    drifted = {rule, *DRIFTS_WITH.get(rule, ())}
    assert {o.rule: o.status for o in report.outcomes} == {
        other: "drift" if other in drifted else "not_needed" if other in NOT_NEEDED else "applied"
        for other in rules_of(family)
    }
    assert f"rule {rule!r} drifted in {target}: expected {EXPECTED[rule]}" in caplog.text
    changed = {name for name, code in functions().items() if code is not originals[name]}
    installed = [other for name in (family, *FAMILIES[family].requires) for other in rules_of(name) if other not in drifted]
    assert changed == set().union(*(TOUCHED_BY[other] for other in installed))


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_strict_drift_installs_nothing(mutation, tmp_path, monkeypatch):
    rule, target, old, new = MUTATIONS[mutation]
    mutated_transformers(tmp_path / "src", monkeypatch, target, old, new)
    originals = functions()
    with pytest.raises(rewriter.RuleDriftError, match=f"rule '{rule}' drifted in {target}: expected"):
        rewriter.compile(FAMILY_OF[target], cache_dir=tmp_path / "cache", strict=True)
    assert functions() == originals
    assert not hasattr(modeling_gemma4, "Gemma4DequantizingLinear")
