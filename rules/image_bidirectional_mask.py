"""image-bidirectional-mask: Gemma-4's bidirectional image mask reaches past the sliding window, and (5.9.0 to
5.12.1) full-attention layers."""

from __future__ import annotations

from textwrap import indent

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import assigns

MASK_MAPPING = m.FunctionDef(name=m.Name("create_causal_mask_mapping"))  # 5.5.0 to 5.8.1
VISION_MASKS = m.FunctionDef(name=m.Name("create_masks_for_vision_model"))  # 5.13.0's fix
MODELS = m.ClassDef(name=m.Name("Gemma4Model") | m.Name("Gemma4ForConditionalGeneration"))


def sets_sliding_mask_kwarg(key: str) -> m.SimpleStatementLine:
    """``sliding_mask_kwargs["KEY"] = ...``"""
    return assigns(m.Subscript(value=m.Name("sliding_mask_kwargs"), slice=[m.SubscriptElement(m.Index(m.SimpleString(f'"{key}"')))]))


SETS_IMAGE_OVERLAY = sets_sliding_mask_kwarg("or_mask_function")
SETS_WINDOW = sets_sliding_mask_kwarg("and_mask_function")
KEEP_IN_WINDOW = """
# Image tokens attend to each other both ways, but within the sliding window only (as 5.13.0's sliding mask)
from ...masking_utils import sliding_window_overlay
sliding_mask_kwargs["and_mask_function"] = sliding_window_overlay(config.get_text_config().sliding_window)
"""

# 5.9.0 to 5.12.1: `if <use_bidirectional_attention> == "vision": ... mask_kwargs["block_sequence_ids"] = ...`, then
# the generic builder, which puts the image overlay on every layer type and after the sliding window
BLOCK_IDS_CALL = m.Call(func=m.Name("get_block_sequence_ids_for_mask"))
SETS_BLOCK_IDS = m.Assign(
    targets=[m.AssignTarget(m.Subscript(value=m.Name("mask_kwargs"), slice=[m.SubscriptElement(m.Index(m.SimpleString('"block_sequence_ids"')))]))]
)
USES_VISION_BIDIRECTIONAL = m.If(
    test=m.Comparison(
        left=m.Attribute(attr=m.Name("use_bidirectional_attention"))
        | m.Call(func=m.Name("getattr"), args=[m.Arg(), m.Arg(m.SimpleString('"use_bidirectional_attention"')), m.ZeroOrMore()]),
        comparisons=[m.ComparisonTarget(m.Equal(), m.SimpleString('"vision"'))],
    )
)
GENERIC_MASKS = m.Call(func=m.Name("create_masks_for_generate"), args=[m.Arg(m.Name("mask_kwargs"), star="**")])
ASSIGNS_GENERIC_MASKS = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Name("causal_mask_mapping"))], value=GENERIC_MASKS)]
)
RETURNS_GENERIC_MASKS = m.SimpleStatementLine(body=[m.Return(GENERIC_MASKS)])
# 5.13.0's call sites, with the test and the block-ids call of the release they replace (USE_BIDIR, BLOCK_IDS)
MODEL_MASKS = """
use_bidir = USE_BIDIR

if use_bidir and mm_token_type_ids is not None:
    block_sequence_ids = BLOCK_IDS
    causal_mask_mapping = create_masks_for_vision_model(
        block_sequence_ids=block_sequence_ids,
        **mask_kwargs,
    )
else:
    # Smaller Gemma models (use_bidirectional_attention=None) or
    # text-only inputs use standard causal masking
    causal_mask_mapping = create_masks_for_generate(**mask_kwargs)
"""
GENERATE_MASKS = """
use_bidir = USE_BIDIR

if use_bidir and mm_token_type_ids is not None:
    block_sequence_ids = BLOCK_IDS
    return create_masks_for_vision_model(
        block_sequence_ids=block_sequence_ids,
        **mask_kwargs,
    )

return create_masks_for_generate(**mask_kwargs)
"""
# 5.13.0's function; the masking helpers it needs are imported where it runs (a patch never changes imports)
CREATE_MASKS_FOR_VISION_MODEL = '''
def create_masks_for_vision_model(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Cache | None,
    position_ids: torch.Tensor | None,
    block_sequence_ids: torch.Tensor,
) -> dict:
    """Create full_attention and sliding_attention masks with correct composition.

    For global (full attention) layers:  causal only (no bidirectional)
    For local (sliding window) layers:  AND(sliding_window, OR(causal, blockwise))

    Unlike Gemma 3 (which applies bidirectional attention on all layers), Gemma 4
    explicitly disables bidirectional attention on global attention layers.
    """
    from ...masking_utils import (
        _preprocess_mask_arguments,
        blockwise_overlay,
        maybe_pad_block_sequence_ids,
        sliding_window_overlay,
    )

    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "past_key_values": past_key_values,
        "position_ids": position_ids,
    }

    # Full attention: causal only — no bidirectional blockwise overlay.
    full_mask = create_causal_mask(**mask_kwargs)

    # We need to manually pad the sequence IDs for the sliding mask
    # as it's passed as an `or_mask_function` which bypasses internal padding.
    early_exit, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(
        **mask_kwargs,
        layer_idx=0,
    )
    if early_exit:
        padded_block_sequence_ids = block_sequence_ids
    else:
        padded_block_sequence_ids = maybe_pad_block_sequence_ids(
            block_sequence_ids, attention_mask, kv_length, kv_offset
        )

    # Sliding attention: AND(sliding_window, OR(causal, blockwise))
    # Pass blockwise as or_mask_function (applied as step 2 in create_causal_mask)
    # Pass sliding_window as and_mask_function (applied as step 3, after OR)
    sliding_mask = create_causal_mask(
        **mask_kwargs,
        or_mask_function=blockwise_overlay(padded_block_sequence_ids),
        and_mask_function=sliding_window_overlay(config.sliding_window),
    )

    return {
        "full_attention": full_mask,
        "sliding_attention": sliding_mask,
    }
'''
PLACEHOLDER = m.Name("USE_BIDIR") | m.Name("BLOCK_IDS")
# what create_masks_for_vision_model takes besides the block ids: the call site's `mask_kwargs` must hold exactly that
VISION_MASK_ARGUMENTS = {"config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids"}


def _dict_keys(elements) -> set[str] | None:
    keys = [element.key.evaluated_value for element in elements if isinstance(element.key, cst.SimpleString)]
    return set(keys) if len(keys) == len(elements) else None


MAKES_MASK_ARGUMENTS = m.Assign(
    targets=[m.AssignTarget(m.Name("mask_kwargs"))],
    value=m.Dict(elements=m.MatchIfTrue(lambda elements: _dict_keys(elements) == VISION_MASK_ARGUMENTS)),
)


class ImageBidirectionalMaskRule(Rule):
    """Gemma-4 models with ``use_bidirectional_attention="vision"`` (31B, 26B-A4B) let the tokens of one image attend
    to each other both ways. Two mistakes in how that overlay is combined with the causal masks:

    - 5.5.0 to 5.12.1: on sliding-window layers the overlay is OR-ed in after the window, so image tokens further
      apart than the window see each other (an image longer than the window: 1,120 soft tokens at the highest
      resolution, windows of 512 and 1,024);
    - 5.9.0 to 5.12.1: the generic ``create_masks_for_generate`` also puts it on full-attention layers, which 5.13.0
      and earlier releases keep causal.

    The fix is 5.13.0's (PR #46850): ``create_masks_for_vision_model`` builds full layers' mask causal and sliding
    layers' as AND(window, OR(causal, image)), called from ``Gemma4Model.forward`` and
    ``Gemma4ForConditionalGeneration.create_masks_for_generate`` when there are token types (2 sites; 5.9.0 to
    5.12.1). 5.5.0 to 5.8.1 build the masks in ``create_causal_mask_mapping``, whose full mask is already causal:
    there the window is AND-ed after the overlay (1 site), which gives 5.13.0's sliding mask.
    """

    id = "image-bidirectional-mask"
    marker = "mask_kwargs"
    scope = MASK_MAPPING | VISION_MASKS | MODELS
    expected = (
        '`sliding_mask_kwargs["or_mask_function"] = ...` in create_causal_mask_mapping, or an `if ... '
        'use_bidirectional_attention == "vision":` block setting `mask_kwargs["block_sequence_ids"]` before '
        "`create_masks_for_generate(**mask_kwargs)` in Gemma4Model.forward and create_masks_for_generate"
    )

    BUGGY = '''
        def create_causal_mask_mapping(config, inputs_embeds, attention_mask, past_key_values, position_ids, mm_token_type_ids=None):
            sliding_mask_kwargs = mask_kwargs.copy()
            if mm_token_type_ids is not None and is_first_iteration:
                sliding_mask_kwargs["or_mask_function"] = token_type_ids_mask_function(mm_token_type_ids, vision_group_ids)

            return {
                "full_attention": create_causal_mask(**mask_kwargs),
                "sliding_attention": create_sliding_window_causal_mask(**sliding_mask_kwargs),
            }
    '''
    PATCHED = '''
        def create_causal_mask_mapping(config, inputs_embeds, attention_mask, past_key_values, position_ids, mm_token_type_ids=None):
            sliding_mask_kwargs = mask_kwargs.copy()
            if mm_token_type_ids is not None and is_first_iteration:
                sliding_mask_kwargs["or_mask_function"] = token_type_ids_mask_function(mm_token_type_ids, vision_group_ids)

                # Image tokens attend to each other both ways, but within the sliding window only (as 5.13.0's sliding mask)
                from ...masking_utils import sliding_window_overlay
                sliding_mask_kwargs["and_mask_function"] = sliding_window_overlay(config.get_text_config().sliding_window)

            return {
                "full_attention": create_causal_mask(**mask_kwargs),
                "sliding_attention": create_sliding_window_causal_mask(**sliding_mask_kwargs),
            }
    '''
    EXAMPLES = (
        (
            '''
            class Gemma4Model(Gemma4PreTrainedModel):
                def forward(self, input_ids, mm_token_type_ids=None, **kwargs):
                    mask_kwargs = {
                        "config": self.config.get_text_config(),
                        "inputs_embeds": inputs_embeds,
                        "attention_mask": attention_mask,
                        "past_key_values": past_key_values,
                        "position_ids": position_ids,
                    }
                    if not isinstance(causal_mask_mapping := attention_mask, dict):
                        # Larger Gemma 4 models use Gemma 3's bidirectional attention mask for vision inputs
                        if self.config.get_text_config().use_bidirectional_attention == "vision":
                            block_sequence_ids = torch.full([*inputs_embeds.size()[:-1]], -1, device=inputs_embeds.device)
                            if mm_token_type_ids is not None:
                                block_sequence_ids = get_block_sequence_ids_for_mask(mm_token_type_ids)

                            mask_kwargs["block_sequence_ids"] = block_sequence_ids

                        # Create the masks
                        causal_mask_mapping = create_masks_for_generate(**mask_kwargs)
                    return self.language_model(attention_mask=causal_mask_mapping)


            class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel):
                @staticmethod
                def create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, position_ids, mm_token_type_ids=None):
                    mask_kwargs = {
                        "config": config.get_text_config(),
                        "inputs_embeds": inputs_embeds,
                        "attention_mask": attention_mask,
                        "past_key_values": past_key_values,
                        "position_ids": position_ids,
                    }
                    if getattr(config.get_text_config(), "use_bidirectional_attention", None) == "vision":
                        block_sequence_ids = torch.full([*inputs_embeds.size()[:-1]], -1, device=inputs_embeds.device)
                        if mm_token_type_ids is not None:
                            block_sequence_ids = get_block_sequence_ids_for_mask(mm_token_type_ids, device=inputs_embeds.device)

                        mask_kwargs["block_sequence_ids"] = block_sequence_ids

                    return create_masks_for_generate(**mask_kwargs)
            ''',
            "\n"
            + indent(CREATE_MASKS_FOR_VISION_MODEL.strip("\n"), " " * 12, lambda line: bool(line.strip()))
            + '''


            class Gemma4Model(Gemma4PreTrainedModel):
                def forward(self, input_ids, mm_token_type_ids=None, **kwargs):
                    mask_kwargs = {
                        "config": self.config.get_text_config(),
                        "inputs_embeds": inputs_embeds,
                        "attention_mask": attention_mask,
                        "past_key_values": past_key_values,
                        "position_ids": position_ids,
                    }
                    if not isinstance(causal_mask_mapping := attention_mask, dict):
                        # Larger Gemma 4 models use Gemma 3's bidirectional attention mask for vision inputs
                        use_bidir = self.config.get_text_config().use_bidirectional_attention == "vision"

                        if use_bidir and mm_token_type_ids is not None:
                            block_sequence_ids = get_block_sequence_ids_for_mask(mm_token_type_ids)
                            causal_mask_mapping = create_masks_for_vision_model(
                                block_sequence_ids=block_sequence_ids,
                                **mask_kwargs,
                            )
                        else:
                            # Smaller Gemma models (use_bidirectional_attention=None) or
                            # text-only inputs use standard causal masking
                            causal_mask_mapping = create_masks_for_generate(**mask_kwargs)
                    return self.language_model(attention_mask=causal_mask_mapping)


            class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel):
                @staticmethod
                def create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, position_ids, mm_token_type_ids=None):
                    mask_kwargs = {
                        "config": config.get_text_config(),
                        "inputs_embeds": inputs_embeds,
                        "attention_mask": attention_mask,
                        "past_key_values": past_key_values,
                        "position_ids": position_ids,
                    }
                    use_bidir = getattr(config.get_text_config(), "use_bidirectional_attention", None) == "vision"

                    if use_bidir and mm_token_type_ids is not None:
                        block_sequence_ids = get_block_sequence_ids_for_mask(mm_token_type_ids, device=inputs_embeds.device)
                        return create_masks_for_vision_model(
                            block_sequence_ids=block_sequence_ids,
                            **mask_kwargs,
                        )

                    return create_masks_for_generate(**mask_kwargs)
            ''',
        ),
    )
    FIXED = (
        # 5.13.0 on
        CREATE_MASKS_FOR_VISION_MODEL,
        # a window already AND-ed in create_causal_mask_mapping
        PATCHED,
    )
    DRIFTED = (
        # the image overlay set some other way
        BUGGY.replace('sliding_mask_kwargs["or_mask_function"] = ', 'sliding_mask_kwargs["image_mask"] = '),
        # only one of the two 5.9.0-5.12.1 call sites
        EXAMPLES[0][0].split("\n\n\n")[0],
        # mask_kwargs holds what create_masks_for_vision_model does not take
        EXAMPLES[0][0].replace('"position_ids": position_ids,\n', '"position_ids": position_ids,\n' + " " * 24 + '"token_type_ids": 0,\n'),
    )

    def __init__(self) -> None:
        super().__init__()
        self.functions: list[cst.FunctionDef] = []  # the functions the visit is inside, innermost last

    @m.leave(m.IndentedBlock())
    def fix_block(self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated_node.body)
        for index, statement in enumerate(body):
            if m.matches(statement, SETS_IMAGE_OVERLAY):
                self.keep_in_window(body, index)
                break
            if m.matches(statement, USES_VISION_BIDIRECTIONAL) and index + 1 < len(body):
                self.vision_masks(body, index)
                break
        return updated_node.with_changes(body=body)

    def keep_in_window(self, body: list, index: int) -> None:
        """5.5.0 to 5.8.1: AND the window after the image overlay in ``create_causal_mask_mapping``."""
        self.parts["mask mapping"] += 1
        if any(m.matches(statement, SETS_WINDOW) for statement in body):
            self.found_fixed()
            return
        self.rewrote()
        body[index + 1 : index + 1] = self.statements(KEEP_IN_WINDOW)

    def vision_masks(self, body: list, index: int) -> None:
        """5.9.0 to 5.12.1: replace the block ids and the generic builder with 5.13.0's call of
        ``create_masks_for_vision_model``."""
        condition, builder = body[index], body[index + 1]
        calls = m.findall(condition, BLOCK_IDS_CALL)
        if not (m.findall(condition, SETS_BLOCK_IDS) and len(calls) == 1):
            return
        if not m.findall(self.functions[-1], MAKES_MASK_ARGUMENTS):
            self.drift("`mask_kwargs` is not the dict of the five arguments create_masks_for_vision_model takes")
            return
        if m.matches(builder, ASSIGNS_GENERIC_MASKS):
            template, site = MODEL_MASKS, "model"
        elif m.matches(builder, RETURNS_GENERIC_MASKS):
            template, site = GENERATE_MASKS, "generate"
        else:
            return
        self.parts[site] += 1
        self.rewrote()
        replacement = {"USE_BIDIR": condition.test, "BLOCK_IDS": calls[0]}
        statements = [m.replace(s, PLACEHOLDER, lambda node, _: replacement[node.value]) for s in self.statements(template)]
        statements[0] = statements[0].with_changes(leading_lines=condition.leading_lines)
        statements[-1] = statements[-1].with_changes(leading_lines=builder.leading_lines) if site == "generate" else statements[-1]
        body[index : index + 2] = statements

    @m.visit(m.FunctionDef())
    def enter_function(self, node: cst.FunctionDef) -> None:
        self.functions.append(node)

    @m.leave(m.FunctionDef())
    def leave_function(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        self.functions.pop()
        return updated_node

    def statements(self, text: str) -> list[cst.BaseStatement]:
        """The statements of ``text``, a comment or blank line before the first kept as its leading lines."""
        statements = cst.parse_module("pass\n" + text, config=self.module.config_for_parsing).body[1:]
        blank = cst.EmptyLine(indent=False)
        return [s.with_changes(leading_lines=[line if line.comment else blank for line in s.leading_lines]) for s in statements]

    @m.visit(VISION_MASKS)
    def note_fixed(self, node: cst.FunctionDef) -> None:
        self.found_fixed()

    @m.leave(m.ClassDef(name=m.Name("Gemma4Model")))
    def define_vision_masks(self, original_node: cst.ClassDef, updated_node: cst.ClassDef):
        if not self.parts["model"]:
            return updated_node
        definition = cst.parse_statement(CREATE_MASKS_FOR_VISION_MODEL.lstrip(), config=self.module.config_for_parsing)
        definition = definition.with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([definition, updated_node.with_changes(leading_lines=[cst.EmptyLine()] * 2)])

    def check(self) -> None:
        if (self.parts["model"] or self.parts["generate"]) and not self.parts["model"] == self.parts["generate"] == 1:
            self.drift("the 5.9.0-5.12.1 shape must be in both Gemma4Model.forward and create_masks_for_generate")
