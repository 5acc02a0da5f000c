"""softcap-sdpa: Gemma-2 runs SDPA by default, and SDPA ignores ``attn_logit_softcapping``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import assigns

PRETRAINED_MODEL = m.ClassDef(name=m.Name("Gemma2PreTrainedModel"))
SUPPORTS_SDPA = assigns(m.Name("_supports_sdpa"))
REFUSES_SDPA = m.SimpleStatementLine(body=[m.Assign(value=m.Name("False"))])
NO_SOFTCAPPING = cst.TrailingWhitespace(
    whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment("# sdpa does not support softcapping")
)


class SoftcapSdpaRule(Rule):
    """Gemma-2 caps its attention logits (``attn_logit_softcapping``, 50.0 by default): ``Gemma2Attention`` passes
    ``softcap`` to every attention function, and ``sdpa_attention_forward`` drops it. SDPA is the default, so from
    4.53.0 to 5.20.2 every Gemma-2 model built without an ``attn_implementation`` computes attention without the cap:
    silently wrong logits (eager is right; flex attention applies the cap too).

    The fix is transformers 5.21.0's: ``Gemma2PreTrainedModel`` declares ``_supports_sdpa = False``, so a model built
    with no implementation falls back to eager, and an explicit ``"sdpa"`` raises ``ValueError``. (5.21.0 also makes
    ``sdpa_attention_forward`` refuse a ``softcap``, which only a config changed after the model was built reaches.)
    """

    id = "softcap-sdpa"
    marker = "class Gemma2PreTrainedModel("
    scope = PRETRAINED_MODEL
    expected = "`_supports_sdpa = True` in the body of Gemma2PreTrainedModel"

    BUGGY = """
        class Gemma2PreTrainedModel(PreTrainedModel):
            config: Gemma2Config
            base_model_prefix = "model"
            _supports_flash_attn = True
            _supports_sdpa = True
            _supports_flex_attn = True

            def _init_weights(self, module):
                super()._init_weights(module)
    """
    PATCHED = """
        class Gemma2PreTrainedModel(PreTrainedModel):
            config: Gemma2Config
            base_model_prefix = "model"
            _supports_flash_attn = True
            _supports_sdpa = False  # sdpa does not support softcapping
            _supports_flex_attn = True

            def _init_weights(self, module):
                super()._init_weights(module)
    """
    FIXED = (BUGGY.replace("_supports_sdpa = True", "_supports_sdpa = False  # sdpa does not support softcapping"),)
    DRIFTED = (
        # no declaration: PreTrainedModel's default decides
        BUGGY.replace("            _supports_sdpa = True\n", ""),
        # declared some other way
        BUGGY.replace("_supports_sdpa = True", "_supports_sdpa = is_torch_sdpa_available()"),
        # the class was renamed
        BUGGY.replace("class Gemma2PreTrainedModel(", "class Gemma2Model("),
    )

    @m.leave(SUPPORTS_SDPA)
    def refuse_sdpa(self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine):
        if m.matches(updated_node, REFUSES_SDPA):
            self.found_fixed()
            return updated_node
        if not m.matches(updated_node.body[0].value, m.Name("True")):
            return updated_node  # not a shape this rule knows: check() reports the drift
        self.rewrote()
        assignment = updated_node.body[0].with_changes(value=cst.Name("False"))
        return updated_node.with_changes(body=[assignment], trailing_whitespace=NO_SOFTCAPPING)
