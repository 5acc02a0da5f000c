"""flash-attention-image-mask: under FlashAttention, Gemma-3 silently drops the bidirectional mask over image tokens,
and from 5.24.0 refuses FlashAttention for text-only inputs too."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, IN_INIT, SUPER_INIT, assigns_self

IN_MODEL = m.ClassDef(name=m.Name("Gemma3Model"))
IN_MULTIMODAL = m.ClassDef(name=m.Name("Gemma3Model") | m.Name("Gemma3ForConditionalGeneration"))
REFUSES_FLASH = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Name("_supports_flash_attn"))], value=m.Name("False"))]
)
ALLOWS_FLASH = assigns_self(m.Name("_supports_flash_attn"))
# `if not isinstance(causal_mask_mapping := attention_mask, dict):`, where the forward builds its masks
BUILDS_MASKS = m.If(
    test=m.UnaryOperation(
        operator=m.Not(),
        expression=m.Call(
            func=m.Name("isinstance"), args=[m.Arg(m.NamedExpr(target=m.Name("causal_mask_mapping"))), m.ZeroOrMore()]
        ),
    )
)
FLASH_TEST = m.Comparison(left=m.SimpleString('"flash"'), comparisons=[m.ComparisonTarget(m.In())])

REFUSE_IMAGES = """\
# Flash Attention takes a 2D padding mask only: it would drop the bidirectional mask over image tokens
if "flash" in (self.config.get_text_config()._attn_implementation or "") and inputs_embeds.shape[1] > 1:
    if {images}:
        raise ValueError(
            "Gemma-3 attends bidirectionally within each image, which Flash Attention cannot: run inputs with images "
            "with attn_implementation='sdpa', 'eager' or 'flex_attention' (text-only inputs run with Flash Attention)"
        )
"""
IMAGES = "pixel_values is not None or (token_type_ids is not None and bool((token_type_ids == 1).any()))"
ENCODED_IMAGES = ' or (mm_encoder_outputs or {}).get("image") is not None'  # 5.18.0 on: features may be passed in
ALLOW_FLASH = "self._supports_flash_attn = True  # text-only inputs run with Flash Attention; forward refuses images\n"


class FlashAttentionImageMaskRule(Rule):
    """Gemma-3 attends bidirectionally within each image: the multimodal model adds that block to the causal mask.
    FlashAttention takes only a 2D padding mask, so transformers' flash mask builder drops the block and image tokens
    attend causally, with no warning (4.53.0 to 5.23.0). From 5.24.0 ``Gemma3Model`` and
    ``Gemma3ForConditionalGeneration`` set ``_supports_flash_attn = False``: loading with FlashAttention fails, text
    included. Upstream has no fix.

    The fix refuses only what FlashAttention cannot run: ``Gemma3Model.forward`` raises before building masks when
    FlashAttention is asked for and a prefill has images (pixel values, encoded images, or image token types). Decode
    steps (one token) and text-only inputs run. Where a class refuses FlashAttention, its ``__init__`` sets
    ``_supports_flash_attn`` back on the instance first, so the load check lets it through.
    """

    id = "flash-attention-image-mask"
    marker = "class Gemma3Model("
    scope = IN_MULTIMODAL
    expected = "Gemma3Model.forward building its masks under `if not isinstance(causal_mask_mapping := attention_mask, dict)`"

    BUGGY = '''
        class Gemma3Model(Gemma3PreTrainedModel):
            def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None, **kwargs):
                inputs_embeds = self.get_input_embeddings()(input_ids)

                # It may already have been prepared by e.g. `generate`
                if not isinstance(causal_mask_mapping := attention_mask, dict):
                    causal_mask_mapping = create_causal_mask_mapping(self.config, inputs_embeds, token_type_ids)
                return self.language_model(inputs_embeds=inputs_embeds, attention_mask=causal_mask_mapping)
    '''
    PATCHED = '''
        class Gemma3Model(Gemma3PreTrainedModel):
            def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None, **kwargs):
                inputs_embeds = self.get_input_embeddings()(input_ids)

                # Flash Attention takes a 2D padding mask only: it would drop the bidirectional mask over image tokens
                if "flash" in (self.config.get_text_config()._attn_implementation or "") and inputs_embeds.shape[1] > 1:
                    if pixel_values is not None or (token_type_ids is not None and bool((token_type_ids == 1).any())):
                        raise ValueError(
                            "Gemma-3 attends bidirectionally within each image, which Flash Attention cannot: run inputs with images "
                            "with attn_implementation='sdpa', 'eager' or 'flex_attention' (text-only inputs run with Flash Attention)"
                        )

                # It may already have been prepared by e.g. `generate`
                if not isinstance(causal_mask_mapping := attention_mask, dict):
                    causal_mask_mapping = create_causal_mask_mapping(self.config, inputs_embeds, token_type_ids)
                return self.language_model(inputs_embeds=inputs_embeds, attention_mask=causal_mask_mapping)
    '''
    EXAMPLES = (
        # 5.24.0 on: both classes refuse FlashAttention at load; image features may be passed in encoded
        (
            '''
            class Gemma3Model(Gemma3PreTrainedModel):
                _supports_flash_attn = False  # Flash Attention drops the bidirectional mask over image tokens

                def __init__(self, config):
                    super().__init__(config)
                    self.post_init()

                def forward(self, pixel_values=None, attention_mask=None, token_type_ids=None, mm_encoder_outputs=None):
                    if not isinstance(causal_mask_mapping := attention_mask, dict):
                        causal_mask_mapping = create_masks(self.config, inputs_embeds, token_type_ids)


            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                _supports_flash_attn = False  # Flash Attention drops the bidirectional mask over image tokens

                def __init__(self, config):
                    super().__init__(config)
                    self.model = Gemma3Model(config)
            ''',
            '''
            class Gemma3Model(Gemma3PreTrainedModel):
                _supports_flash_attn = False  # Flash Attention drops the bidirectional mask over image tokens

                def __init__(self, config):
                    self._supports_flash_attn = True  # text-only inputs run with Flash Attention; forward refuses images
                    super().__init__(config)
                    self.post_init()

                def forward(self, pixel_values=None, attention_mask=None, token_type_ids=None, mm_encoder_outputs=None):
                    # Flash Attention takes a 2D padding mask only: it would drop the bidirectional mask over image tokens
                    if "flash" in (self.config.get_text_config()._attn_implementation or "") and inputs_embeds.shape[1] > 1:
                        if pixel_values is not None or (token_type_ids is not None and bool((token_type_ids == 1).any())) or (mm_encoder_outputs or {}).get("image") is not None:
                            raise ValueError(
                                "Gemma-3 attends bidirectionally within each image, which Flash Attention cannot: run inputs with images "
                                "with attn_implementation='sdpa', 'eager' or 'flex_attention' (text-only inputs run with Flash Attention)"
                            )

                    if not isinstance(causal_mask_mapping := attention_mask, dict):
                        causal_mask_mapping = create_masks(self.config, inputs_embeds, token_type_ids)


            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                _supports_flash_attn = False  # Flash Attention drops the bidirectional mask over image tokens

                def __init__(self, config):
                    self._supports_flash_attn = True  # text-only inputs run with Flash Attention; forward refuses images
                    super().__init__(config)
                    self.model = Gemma3Model(config)
            ''',
        ),
    )
    FIXED = (PATCHED,)
    DRIFTED = (
        # the masks are built some other way
        BUGGY.replace("if not isinstance(causal_mask_mapping := attention_mask, dict):", "if attention_mask is None:"),
        # images come in some other way
        BUGGY.replace("pixel_values=None, ", ""),
    )

    def __init__(self) -> None:
        super().__init__()
        self.refusing: set[str] = set()  # the classes that refuse FlashAttention at load

    @m.visit(IN_MULTIMODAL)
    def note_refusal(self, node: cst.ClassDef) -> None:
        if any(m.matches(statement, REFUSES_FLASH) for statement in node.body.body):
            self.refusing.add(node.name.value)

    @m.call_if_inside(IN_MULTIMODAL)
    @m.leave(IN_INIT)
    def allow_flash_on_the_instance(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        owner, body = self.inside[IN_MULTIMODAL].name.value, list(updated_node.body.body)
        if owner not in self.refusing:
            return updated_node
        if body and m.matches(body[0], ALLOWS_FLASH):
            self.found_fixed()
            return updated_node
        if not body or not m.matches(body[0], SUPER_INIT):
            self.drift(f"{owner}.__init__ does not start with `super().__init__(...)`")
            return updated_node
        self.rewrote()
        allow = cst.parse_statement(ALLOW_FLASH, config=self.module.config_for_parsing)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=[allow, *body]))

    @m.call_if_inside(IN_MODEL)
    @m.leave(IN_FORWARD)
    def refuse_images(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if any(m.findall(node.test, FLASH_TEST) and m.findall(node.body, m.Raise()) for node in m.findall(updated_node, m.If())):
            self.found_fixed()  # a forward that already refuses something under FlashAttention
            return updated_node
        body = list(updated_node.body.body)
        at = next((i for i, statement in enumerate(body) if m.matches(statement, BUILDS_MASKS)), None)
        parameters = {parameter.name.value for parameter in updated_node.params.params}
        if at is None or not {"pixel_values", "token_type_ids"} <= parameters:
            self.drift("Gemma3Model.forward takes no `pixel_values` or `token_type_ids`, or builds its masks elsewhere")
            return updated_node
        images = IMAGES + (ENCODED_IMAGES if "mm_encoder_outputs" in parameters else "")
        guard = cst.parse_statement(REFUSE_IMAGES.format(images=images), config=self.module.config_for_parsing)
        blank = [cst.EmptyLine(indent=False)] if at > 0 else []
        anchor = body[at]
        if anchor.leading_lines and anchor.leading_lines[0].comment is None:  # a blank line goes after the guard too
            guard = guard.with_changes(leading_lines=[*anchor.leading_lines[:1], *guard.leading_lines])
        else:
            guard = guard.with_changes(leading_lines=[*blank, *guard.leading_lines])
            anchor = anchor.with_changes(leading_lines=[cst.EmptyLine(indent=False), *anchor.leading_lines])
        self.rewrote()
        return updated_node.with_changes(body=updated_node.body.with_changes(body=[*body[:at], guard, anchor, *body[at + 1 :]]))
