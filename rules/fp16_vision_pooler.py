"""fp16-vision-pooler: the Gemma-4 vision pooler overflows float16 when it scales by the root of the width."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import SELF

IN_POOLER = m.ClassDef(name=m.Name("Gemma4VisionPooler"))
IN_VISION_MODEL = m.ClassDef(name=m.Name("Gemma4VisionModel"))
HIDDEN_STATES = m.Name("hidden_states")
ROOT_HIDDEN_SIZE = m.Attribute(value=SELF, attr=m.Name("root_hidden_size"))
SCALE_IN_PLACE = m.AugAssign(target=HIDDEN_STATES, operator=m.MultiplyAssign(), value=ROOT_HIDDEN_SIZE)
SCALE_IN_FLOAT32 = m.BinaryOperation(
    left=m.Call(func=m.Attribute(value=HIDDEN_STATES, attr=m.Name("float"))),
    operator=m.Multiply(),
    right=ROOT_HIDDEN_SIZE,
)
STD_BUFFER = m.Attribute(value=SELF, attr=m.Name("std_bias") | m.Name("std_scale"))
STANDARDIZE = m.If(
    test=m.Attribute(value=m.Attribute(value=SELF, attr=m.Name("config")), attr=m.Name("standardize")),
    body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(HIDDEN_STATES)])])]),
    orelse=None,
)
BACK_TO_WORKING_DTYPE = "hidden_states = hidden_states.to(inputs_embeds.dtype)\n"


class FP16VisionPoolerRule(Rule):
    """``Gemma4VisionPooler`` scales by ``sqrt(hidden_size)`` in place, in the working dtype: in float16 large
    activations overflow to inf, and the image features become NaN.

    The fix is transformers 5.10.1's: the pooler scales in float32 and returns float32,
    ``Gemma4VisionModel.forward`` standardizes in float32 (the bias subtraction cancels the large values) and casts
    back to the dtype of the patch embeddings.
    """

    id = "fp16-vision-pooler"
    marker = "hidden_states *= self.root_hidden_size"
    scope = IN_POOLER | IN_VISION_MODEL
    expected = "`hidden_states *= self.root_hidden_size` in Gemma4VisionPooler.forward"

    BUGGY = '''
        class Gemma4VisionPooler(nn.Module):
            def forward(self, hidden_states, padding_positions):
                hidden_states = hidden_states.masked_fill(padding_positions.unsqueeze(-1), 0.0)
                hidden_states *= self.root_hidden_size
                return hidden_states, padding_positions


        class Gemma4VisionModel(Gemma4PreTrainedModel):
            def forward(self, pixel_values, pixel_position_ids, **kwargs):
                inputs_embeds = self.patch_embedder(pixel_values, pixel_position_ids)
                hidden_states, pooler_mask = self.pooler(self.encoder(inputs_embeds))
                hidden_states = hidden_states[pooler_mask]

                if self.config.standardize:
                    hidden_states = (hidden_states - self.std_bias) * self.std_scale

                return BaseModelOutputWithPast(last_hidden_state=hidden_states)
    '''
    PATCHED = '''
        class Gemma4VisionPooler(nn.Module):
            def forward(self, hidden_states, padding_positions):
                hidden_states = hidden_states.masked_fill(padding_positions.unsqueeze(-1), 0.0)
                hidden_states = hidden_states.float() * self.root_hidden_size
                return hidden_states, padding_positions


        class Gemma4VisionModel(Gemma4PreTrainedModel):
            def forward(self, pixel_values, pixel_position_ids, **kwargs):
                inputs_embeds = self.patch_embedder(pixel_values, pixel_position_ids)
                hidden_states, pooler_mask = self.pooler(self.encoder(inputs_embeds))
                hidden_states = hidden_states[pooler_mask]

                if self.config.standardize:
                    hidden_states = (hidden_states - self.std_bias.float()) * self.std_scale.float()
                hidden_states = hidden_states.to(inputs_embeds.dtype)

                return BaseModelOutputWithPast(last_hidden_state=hidden_states)
    '''
    FIXED = (PATCHED,)
    DRIFTED = (
        # the pooler scales some third way
        BUGGY.replace("hidden_states *= self.root_hidden_size", "hidden_states = hidden_states * self.scale"),
        # the vision model no longer standardizes where the pooler's output arrives
        BUGGY.replace("if self.config.standardize:", "if self.standardize:"),
    )

    @m.call_if_inside(IN_POOLER)
    @m.leave(SCALE_IN_PLACE)
    def scale_in_float32(self, original_node: cst.AugAssign, updated_node: cst.AugAssign) -> cst.Assign:
        self.parts["scale"] += 1
        self.rewrote()
        return cst.Assign(
            targets=[cst.AssignTarget(updated_node.target)],
            value=cst.parse_expression("hidden_states.float() * self.root_hidden_size"),
        )

    @m.call_if_inside(IN_POOLER)
    @m.visit(SCALE_IN_FLOAT32)
    def note_float32_scale(self, node: cst.BinaryOperation) -> None:
        self.found_fixed()

    @m.call_if_inside(IN_VISION_MODEL)
    @m.leave(STANDARDIZE)
    def standardize_in_float32(self, original_node: cst.If, updated_node: cst.If):  # an If or a FlattenSentinel
        if not self.parts["scale"]:
            return updated_node
        self.parts["standardize"] += 1
        self.rewrote()
        in_float32 = m.replace(
            updated_node, STD_BUFFER, lambda node, _: cst.parse_expression(f"self.{node.attr.value}.float()")
        )
        cast = cst.parse_statement(BACK_TO_WORKING_DTYPE, config=self.module.config_for_parsing)
        return cst.FlattenSentinel([in_float32, cast])

    def check(self) -> None:
        if self.parts and set(self.parts) != {"scale", "standardize"}:
            self.drift("the pooler's scale and Gemma4VisionModel's `if self.config.standardize:` must both be found")
