"""input-proj-dequant: the Gemma-4 vision tower's ``input_proj`` fails on a bitsandbytes packed weight."""

from __future__ import annotations

from textwrap import dedent

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import SELF

DEQUANTIZING_LINEAR = "Gemma4DequantizingLinear"
IN_PATCH_EMBEDDER = m.ClassDef(name=m.Name("Gemma4VisionPatchEmbedder"))
INPUT_PROJ = m.Attribute(value=SELF, attr=m.Name("input_proj"))
BARE_LINEAR_INPUT_PROJ = m.Assign(
    targets=[m.AssignTarget(INPUT_PROJ)], value=m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("Linear")))
)
DEQUANTIZING_INPUT_PROJ = m.Assign(targets=[m.AssignTarget(INPUT_PROJ)], value=m.Call(func=m.Name(DEQUANTIZING_LINEAR)))
INPUT_PROJ_OF_CAST_TO_WEIGHT_DTYPE = m.Call(
    func=INPUT_PROJ,
    args=[
        m.Arg(
            value=m.Call(
                func=m.Attribute(attr=m.Name("to")),
                args=[m.Arg(m.Attribute(value=m.Attribute(value=INPUT_PROJ, attr=m.Name("weight")), attr=m.Name("dtype")))],
            )
        )
    ],
)

DEQUANTIZING_LINEAR_CLASS = dedent(
    '''
    class Gemma4DequantizingLinear(nn.Linear):
        """`nn.Linear` that also runs a bitsandbytes 4-bit packed weight, dequantizing it before the matmul.

        A pre-quantized checkpoint can leave a bare linear holding a packed `Params4bit` weight. The weight stays at
        `.weight`, so state-dict keys do not change. Clipping works as in `Gemma4ClippableLinear`, when asked for.
        Added by rewriter's rule `input-proj-dequant`.
        """

        def __init__(self, in_features, out_features, bias=True, use_clipped_linears=False, device=None, dtype=None):
            super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
            self.use_clipped_linears = use_clipped_linears
            if use_clipped_linears:
                self.register_buffer("input_min", torch.tensor(-float("inf")))
                self.register_buffer("input_max", torch.tensor(float("inf")))
                self.register_buffer("output_min", torch.tensor(-float("inf")))
                self.register_buffer("output_max", torch.tensor(float("inf")))

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            weight = self.weight
            if getattr(weight, "quant_state", None) is not None:
                from bitsandbytes.functional import dequantize_4bit

                weight = dequantize_4bit(weight, weight.quant_state)
            if self.use_clipped_linears:
                hidden_states = torch.clamp(hidden_states, self.input_min, self.input_max)
            hidden_states = F.linear(hidden_states.to(weight.dtype), weight, self.bias)
            if self.use_clipped_linears:
                hidden_states = torch.clamp(hidden_states, self.output_min, self.output_max)
            return hidden_states
    '''
)


class InputProjDequantRule(Rule):
    """``Gemma4VisionPatchEmbedder.input_proj`` is a bare ``nn.Linear``: a packed 4-bit weight crashes its matmul."""

    id = "input-proj-dequant"
    marker = "input_proj"
    scope = IN_PATCH_EMBEDDER
    expected = "`self.input_proj = nn.Linear(...)` in Gemma4VisionPatchEmbedder.__init__"

    BUGGY = '''
        class Gemma4VisionPatchEmbedder(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.input_proj = nn.Linear(3 * self.patch_size**2, self.hidden_size, bias=False)
                self.other_proj = nn.Linear(3, 3)

            def forward(self, pixel_values):
                return self.input_proj(pixel_values.to(self.input_proj.weight.dtype))
    '''
    PATCHED = (
        DEQUANTIZING_LINEAR_CLASS
        + '''

        class Gemma4VisionPatchEmbedder(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.input_proj = Gemma4DequantizingLinear(3 * self.patch_size**2, self.hidden_size, bias=False)
                self.other_proj = nn.Linear(3, 3)

            def forward(self, pixel_values):
                return self.input_proj(pixel_values)
    '''.replace("\n        ", "\n")
    )
    FIXED = (PATCHED,)
    DRIFTED = (
        BUGGY.replace("class Gemma4VisionPatchEmbedder(", "class Gemma4PatchEmbedder("),
        BUGGY.replace("self.input_proj = nn.Linear(", "self.input_proj = Gemma4ClippableLinear(config, "),
    )

    @m.call_if_inside(IN_PATCH_EMBEDDER)
    @m.leave(DEQUANTIZING_INPUT_PROJ)
    def note_dequantizing(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        self.found_fixed()
        return updated_node

    @m.call_if_inside(IN_PATCH_EMBEDDER)
    @m.leave(BARE_LINEAR_INPUT_PROJ)
    def dequantizing_input_proj(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        self.parts["constructor"] += 1
        self.rewrote()
        return updated_node.with_deep_changes(updated_node.value, func=cst.Name(DEQUANTIZING_LINEAR))

    @m.call_if_inside(IN_PATCH_EMBEDDER)
    @m.leave(INPUT_PROJ_OF_CAST_TO_WEIGHT_DTYPE)
    def keep_input_dtype(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        """A packed weight's dtype is uint8: let the linear cast the input to the dequantized weight's dtype."""
        self.parts["input cast"] += 1
        self.rewrote()
        cast = updated_node.args[0].value
        return updated_node.with_changes(args=[updated_node.args[0].with_changes(value=cast.func.value)])

    @m.leave(IN_PATCH_EMBEDDER)
    def define_dequantizing_linear(
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef | cst.FlattenSentinel:
        if not self.parts["constructor"]:
            return updated_node
        definition = cst.parse_statement(DEQUANTIZING_LINEAR_CLASS.lstrip()).with_changes(
            leading_lines=updated_node.leading_lines
        )
        return cst.FlattenSentinel([definition, updated_node.with_changes(leading_lines=[cst.EmptyLine()] * 2)])

    def check(self) -> None:
        if self.parts and self.parts["constructor"] != 1:
            self.drift("Gemma4VisionPatchEmbedder must build `input_proj` exactly once with `nn.Linear(...)`")
