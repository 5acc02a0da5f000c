"""text-only-output-properties: a multimodal output's ``image_hidden_states`` raises on a text-only batch."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import SELF

MODALITY_HIDDEN_STATES = m.Name(m.MatchRegex(r"(image|video|audio)_hidden_states"))
IN_OUTPUT = m.ClassDef(name=m.Name(m.MatchRegex(r"\w+OutputWithPast")))
PROPERTY = m.FunctionDef(name=MODALITY_HIDDEN_STATES, decorators=[m.Decorator(m.Name("property"))])
MODALITY_OUTPUTS = m.Attribute(value=SELF, attr=m.Name(m.MatchRegex(r"(image|video|audio)_outputs")))
RETURNS_POOLED = m.Return(value=m.Attribute(value=MODALITY_OUTPUTS, attr=m.Name("pooler_output")))
RETURNS_POOLED_IF_ANY = m.Return(value=m.IfExp(test=m.Comparison(left=MODALITY_OUTPUTS)))
FIELD = m.AnnAssign(target=MODALITY_HIDDEN_STATES)


class TextOnlyOutputPropertiesRule(Rule):
    """From transformers 5.24.0 a multimodal output's ``image_hidden_states`` (``audio_hidden_states``) is a
    deprecated property returning ``self.image_outputs.pooler_output``; a batch without images has no
    ``image_outputs``, and reading the property raises ``AttributeError`` where 5.23.0 returned ``None``.

    The fix returns ``None`` when there are no outputs of that modality, as the field did. Not fixed upstream as
    of 5.25.0.
    """

    id = "text-only-output-properties"
    marker = "_hidden_states(self)"
    scope = IN_OUTPUT
    expected = "`return self.image_outputs.pooler_output` in a `@property` `image_hidden_states` of a model output"

    BUGGY = '''
        @dataclass
        class Gemma4ModelOutputWithPast(MultimodalBaseModelOutputWithPast):
            router_logits: tuple[torch.Tensor] | None = None

            @property
            def image_hidden_states(self):
                logger.warning_once("`image_hidden_states` is deprecated")
                return self.image_outputs.pooler_output

            @property
            def audio_hidden_states(self):
                return self.audio_outputs.pooler_output

            def pooled(self):
                return self.image_outputs.pooler_output
    '''
    PATCHED = '''
        @dataclass
        class Gemma4ModelOutputWithPast(MultimodalBaseModelOutputWithPast):
            router_logits: tuple[torch.Tensor] | None = None

            @property
            def image_hidden_states(self):
                logger.warning_once("`image_hidden_states` is deprecated")
                return self.image_outputs.pooler_output if self.image_outputs is not None else None

            @property
            def audio_hidden_states(self):
                return self.audio_outputs.pooler_output if self.audio_outputs is not None else None

            def pooled(self):
                return self.image_outputs.pooler_output
    '''
    FIXED = (
        # 5.23.0 and before: plain fields, None when the batch has no images
        '''
        @dataclass
        class Gemma4ModelOutputWithPast(BaseModelOutputWithPast):
            image_hidden_states: torch.FloatTensor | None = None
            audio_hidden_states: torch.FloatTensor | None = None
        ''',
    )
    DRIFTED = (
        # the property computes its value some third way
        BUGGY.replace("return self.audio_outputs.pooler_output", "return self.audio_outputs.last_hidden_state"),
    )

    @m.visit(FIELD)
    def note_field(self, node: cst.AnnAssign) -> None:
        self.found_fixed()

    @m.call_if_inside(PROPERTY)
    @m.visit(RETURNS_POOLED_IF_ANY)
    def note_guarded(self, node: cst.Return) -> None:
        self.found_fixed()

    @m.leave(PROPERTY)
    def return_none_without_outputs(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef):
        returns = m.findall(updated_node, m.Return())
        if all(m.matches(node, RETURNS_POOLED_IF_ANY) for node in returns):
            return updated_node
        if len(returns) != 1 or not m.matches(returns[0], RETURNS_POOLED):
            self.drift(f"`{updated_node.name.value}` returns something else")
            return updated_node
        self.rewrote()
        outputs = cst.Module([]).code_for_node(returns[0].value.value)
        guarded = cst.parse_expression(f"{outputs}.pooler_output if {outputs} is not None else None")
        return updated_node.deep_replace(returns[0], returns[0].with_changes(value=guarded))
