"""per-layer-inputs-none: a Gemma-4 text model without per-layer inputs crashes slicing them before its KV-shared
layers."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import is_not_none

TEXT_MODEL = m.ClassDef(name=m.Name("Gemma4TextModel"))
SLICES_SHARED_INPUTS = m.FunctionDef(name=m.Name("_maybe_slice_kv_shared_inputs"))
PER_LAYER_INPUTS = m.Name("per_layer_inputs")
# `per_layer_inputs = per_layer_inputs[...]`, alone on a line
SLICE_PER_LAYER_INPUTS = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(PER_LAYER_INPUTS)], value=m.Subscript(value=PER_LAYER_INPUTS))]
)
# 5.25.0: `if per_layer_inputs is not None:` around that line and nothing else
GUARDED_SLICE = m.If(
    test=is_not_none(PER_LAYER_INPUTS), body=m.IndentedBlock(body=[SLICE_PER_LAYER_INPUTS]), orelse=None
)


class PerLayerInputsNoneRule(Rule):
    """From transformers 5.23.0 ``Gemma4TextModel`` slices its inputs to the ``logits_to_keep`` positions before the
    first KV-shared layer (``_maybe_slice_kv_shared_inputs``), per-layer inputs included. A config without per-layer
    inputs (``hidden_size_per_layer_input=0``, so ``per_layer_inputs is None``) but with KV-shared layers, such as
    the Gemma-4 assistant drafter's, raises ``TypeError: 'NoneType' object is not subscriptable`` on any eager or
    SDPA forward of more than one position (5.23.0 and 5.24.0).

    The fix is transformers 5.25.0's: the slice of the per-layer inputs runs under ``if per_layer_inputs is not
    None:``. Before 5.23.0 the method is absent and nothing is sliced: the rule reports ``not_needed``.
    """

    id = "per-layer-inputs-none"
    marker = "def _maybe_slice_kv_shared_inputs"
    scope = TEXT_MODEL
    expected = "`per_layer_inputs = per_layer_inputs[...]` in Gemma4TextModel._maybe_slice_kv_shared_inputs"

    BUGGY = '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def forward(self, input_ids, per_layer_inputs=None, logits_to_keep=0, **kwargs):
                for i, decoder_layer in enumerate(self.layers):
                    if i == self.first_kv_shared_layer_idx:
                        hidden_states, per_layer_inputs = self._maybe_slice_kv_shared_inputs(
                            hidden_states, per_layer_inputs, logits_to_keep
                        )

            def _maybe_slice_kv_shared_inputs(self, hidden_states, per_layer_inputs, logits_to_keep, **kwargs):
                if not can_optimize:
                    return hidden_states, per_layer_inputs

                logits_to_keep = slice(-logits_to_keep, None)
                hidden_states = hidden_states[:, logits_to_keep, :]
                per_layer_inputs = per_layer_inputs[:, logits_to_keep, :, :]

                return hidden_states, per_layer_inputs
    '''
    PATCHED = '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def forward(self, input_ids, per_layer_inputs=None, logits_to_keep=0, **kwargs):
                for i, decoder_layer in enumerate(self.layers):
                    if i == self.first_kv_shared_layer_idx:
                        hidden_states, per_layer_inputs = self._maybe_slice_kv_shared_inputs(
                            hidden_states, per_layer_inputs, logits_to_keep
                        )

            def _maybe_slice_kv_shared_inputs(self, hidden_states, per_layer_inputs, logits_to_keep, **kwargs):
                if not can_optimize:
                    return hidden_states, per_layer_inputs

                logits_to_keep = slice(-logits_to_keep, None)
                hidden_states = hidden_states[:, logits_to_keep, :]
                if per_layer_inputs is not None:
                    per_layer_inputs = per_layer_inputs[:, logits_to_keep, :, :]

                return hidden_states, per_layer_inputs
    '''
    FIXED = (
        PATCHED,
        # 5.5.0 to 5.22.2: nothing is sliced before the KV-shared layers
        '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def forward(self, input_ids, per_layer_inputs=None, **kwargs):
                for i, decoder_layer in enumerate(self.layers):
                    hidden_states = decoder_layer(hidden_states, per_layer_inputs[:, :, i, :])
        ''',
    )
    DRIFTED = (
        # the per-layer inputs are sliced some other way
        BUGGY.replace(
            "per_layer_inputs = per_layer_inputs[:, logits_to_keep, :, :]",
            "per_layer_inputs = per_layer_inputs.narrow(1, start, length)",
        ),
        # the slice sits inside some other block
        BUGGY.replace(
            "                per_layer_inputs = per_layer_inputs[:, logits_to_keep, :, :]",
            "                if self.config.hidden_size_per_layer_input:\n"
            "                    per_layer_inputs = per_layer_inputs[:, logits_to_keep, :, :]",
        ),
    )

    @m.leave(SLICES_SHARED_INPUTS)
    def guard_the_slice(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        self.parts["method"] += 1
        body = list(updated_node.body.body)
        if any(m.matches(statement, GUARDED_SLICE) for statement in body):
            self.found_fixed()
            return updated_node
        at = [index for index, statement in enumerate(body) if m.matches(statement, SLICE_PER_LAYER_INPUTS)]
        if len(at) != 1:
            self.drift(f"found {len(at)} such lines in the method's body, outside `if per_layer_inputs is not None:`")
            return updated_node
        (at,) = at
        slice_line = body[at]
        guarded = cst.If(
            test=cst.parse_expression("per_layer_inputs is not None"),
            body=cst.IndentedBlock(body=[slice_line.with_changes(leading_lines=[])]),
            leading_lines=slice_line.leading_lines,
        )
        self.rewrote()
        body[at] = guarded
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    @m.leave(TEXT_MODEL)
    def note_no_slicing(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        if not self.parts["method"] and not m.findall(original_node, m.Name("_maybe_slice_kv_shared_inputs")):
            self.found_fixed()  # before 5.23.0: the KV-shared layers run on every position, nothing is sliced
        return updated_node
