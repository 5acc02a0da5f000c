"""text-only-training: Gemma's multimodal models refuse to train without token types, even on text alone."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import is_none, is_not_none

TOKEN_TYPES = m.Name("token_type_ids") | m.Name("mm_token_type_ids")
NO_TOKEN_TYPES = is_none(TOKEN_TYPES)
TOKEN_TYPES_GIVEN = is_not_none(TOKEN_TYPES)
TRAINING_WITHOUT_TOKEN_TYPES = m.If(
    test=m.BooleanOperation(left=m.Name("is_training"), operator=m.And(), right=NO_TOKEN_TYPES)
)
RAISE_VALUE_ERROR = m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Raise(exc=m.Call(func=m.Name("ValueError")))])])
MASK_MAPPING = m.FunctionDef(name=m.Name("create_causal_mask_mapping"))
MULTIMODAL_MODEL = m.ClassDef(name=m.Name(m.MatchRegex(r"Gemma\d+(Model|ForConditionalGeneration)")))


def requires_token_types(test: cst.BaseExpression) -> bool:
    """Whether an ``if`` test, true, means token types were given (alone or in an ``and``)."""
    if isinstance(test, cst.BooleanOperation) and isinstance(test.operator, cst.And):
        return requires_token_types(test.left) or requires_token_types(test.right)
    return m.matches(test, TOKEN_TYPES_GIVEN)


class TextOnlyTrainingRule(Rule):
    """In training, the multimodal mask builder raises when a batch has no token types: every text-only batch a
    tokenizer makes (SFT, DPO, GRPO). As transformers 5.6.0 does, no token types means all text: the bidirectional
    image blocks are added only when token types are given, so the check goes.

    One rule for every file with the bug: Gemma-3 names the input ``token_type_ids``, Gemma-4 ``mm_token_type_ids``.
    """

    id = "text-only-training"
    marker = "is required as a model input when training"
    scope = MASK_MAPPING | MULTIMODAL_MODEL
    expected = "`if is_training and token_type_ids is None: raise ValueError(...)` in create_causal_mask_mapping"

    BUGGY = '''
        def create_causal_mask_mapping(config, inputs_embeds, token_type_ids=None, is_training=False, **kwargs):
            """Masks for every layer type."""
            if is_training and token_type_ids is None:
                raise ValueError("`token_type_ids` is required as a model input when training")

            mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds}
            if token_type_ids is not None and is_first_iteration:
                mask_kwargs["or_mask_function"] = token_type_ids_mask_function(token_type_ids)
            return create_masks_for_generate(**mask_kwargs)
    '''
    PATCHED = '''
        def create_causal_mask_mapping(config, inputs_embeds, token_type_ids=None, is_training=False, **kwargs):
            """Masks for every layer type."""

            mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds}
            if token_type_ids is not None and is_first_iteration:
                mask_kwargs["or_mask_function"] = token_type_ids_mask_function(token_type_ids)
            return create_masks_for_generate(**mask_kwargs)
    '''
    FIXED = (
        # 5.6.0 to 5.8.1: the check and the `is_training` parameter are gone
        '''
        def create_causal_mask_mapping(config, inputs_embeds, mm_token_type_ids=None, **kwargs):
            mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds}
            if mm_token_type_ids is not None:
                mask_kwargs["or_mask_function"] = token_type_ids_mask_function(mm_token_type_ids)
            return create_masks_for_generate(**mask_kwargs)
        ''',
        # 4.x and 5.9.0 on: the model builds the mask itself, with image blocks only where token types are given
        '''
        class Gemma4Model(Gemma4PreTrainedModel):
            def forward(self, input_ids, mm_token_type_ids=None, **kwargs):
                if use_bidir and mm_token_type_ids is not None:
                    block_sequence_ids = get_block_sequence_ids_for_mask(mm_token_type_ids)
        ''',
    )
    DRIFTED = (
        # the check does something else than raise
        BUGGY.replace(
            'raise ValueError("`token_type_ids` is required as a model input when training")',
            "token_type_ids = default_token_types(inputs_embeds)",
        ),
        # neither the check nor a guard on given token types
        '''
        def create_causal_mask_mapping(config, inputs_embeds, token_type_ids=None, **kwargs):
            mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds}
            mask_kwargs["or_mask_function"] = token_type_ids_mask_function(token_type_ids)
            return create_masks_for_generate(**mask_kwargs)
        ''',
    )

    @m.leave(TRAINING_WITHOUT_TOKEN_TYPES)
    def drop_the_check(self, original_node: cst.If, updated_node: cst.If) -> cst.If | cst.RemovalSentinel:
        if updated_node.orelse is not None or not m.matches(updated_node.body, RAISE_VALUE_ERROR):
            self.drift("the check on missing token types in training does more than raise")
            return updated_node
        self.rewrote()
        return cst.RemovalSentinel.REMOVE

    @m.visit(m.If())
    def note_guard_on_given_token_types(self, node: cst.If) -> None:
        if requires_token_types(node.test):
            self.found_fixed()
