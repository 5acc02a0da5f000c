"""audio-eager-mask: under eager attention the Gemma-4 audio tower attends exactly where its mask says not to."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, assigns

AUDIO_MODEL = m.ClassDef(name=m.Name("Gemma4AudioModel"))
AUDIO_ATTENTION = m.ClassDef(name=m.Name("Gemma4AudioAttention"))
CONVERTER = m.FunctionDef(name=m.Name("_convert_4d_mask_to_blocked_5d"))
MASK_4D = m.Name("mask_4d")
F_PAD = m.Attribute(value=m.Name("F"), attr=m.Name("pad"))


def pads(name: str, value: m.BaseExpression) -> m.SimpleStatementLine:
    """``NAME = F.pad(NAME, ..., value=VALUE)`` alone on a line."""
    call = m.Call(func=F_PAD, args=[m.Arg(m.Name(name)), m.ZeroOrMore(), m.Arg(value, keyword=m.Name("value"))])
    return assigns(m.Name(name), call)


# 5.5.0 to 5.19.0: the blocked mask is boolean (True = attend), padded with False
PADS_FALSE = (pads("mask_4d", m.Name("False")), pads("mask_5d", m.Name("False")))
# 5.20.0 on: the blocked mask is eager's additive float mask, padded with its minimum
PADS_MIN = (pads("mask_4d", m.Name("min_dtype")), pads("mask_5d", m.Name("min_dtype")))
# the attention fills where the boolean mask is False (5.5.0 to 5.19.0) or where the float mask is not 0 (5.20.0 on)
FILLS_WHERE_FALSE = m.Call(func=m.Attribute(value=m.Name("attention_mask"), attr=m.Name("logical_not")), args=[])
FILLS_WHERE_NOT_ZERO = m.Comparison(
    left=m.Name("attention_mask"), comparisons=[m.ComparisonTarget(m.NotEqual(), m.Integer("0"))]
)
FILLS = m.Call(
    func=m.Attribute(attr=m.Name("masked_fill")), args=[m.Arg(FILLS_WHERE_FALSE | FILLS_WHERE_NOT_ZERO), m.ZeroOrMore()]
)
TO_BOOLEAN = (
    "if mask_4d.is_floating_point():\n"
    "    mask_4d = mask_4d == 0  # eager's additive mask (0.0 = attend) as a boolean one (True = attend)\n"
)
# the rewrite's statement, however it is commented
CONVERTS_FLOAT = m.If(
    test=m.Call(func=m.Attribute(value=MASK_4D, attr=m.Name("is_floating_point")), args=[]),
    body=m.IndentedBlock(
        body=[
            m.SimpleStatementLine(
                body=[
                    m.Assign(
                        targets=[m.AssignTarget(MASK_4D)],
                        value=m.Comparison(left=MASK_4D, comparisons=[m.ComparisonTarget(m.Equal(), m.Integer("0"))]),
                    )
                ]
            )
        ]
    ),
    orelse=None,
)
DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])


class AudioEagerMaskRule(Rule):
    """``create_bidirectional_mask`` gives the audio tower a boolean mask under sdpa and flex (True = attend) but an
    additive float mask under eager (0.0 = attend, the dtype's minimum = masked). Both of its consumers assume
    boolean: ``Gemma4AudioModel._convert_4d_mask_to_blocked_5d`` pads with ``False`` and
    ``Gemma4AudioAttention.forward`` fills ``attention_mask.logical_not()``. Under eager every allowed position is
    filled with the invalid logit and the masked ones (padding, other chunks, the future) are attended: transformers
    5.5.0 to 5.19.x, with ``attn_implementation="eager"`` (the default, sdpa, is right).

    Upstream (5.20.0, for issue #48818) made both consumers take the float mask (pads with ``finfo.min``, fills
    ``attention_mask != 0``) and the tower eager-only (``_supports_sdpa = False``). Before 5.20.0 the tower declares no
    such flag and the installer adds no class attribute, so a buggy release keeps taking sdpa's boolean mask; the
    rewrite converts eager's float mask to that boolean one first thing in the converter, and the rest runs the
    boolean path unchanged. Padding and gathering commute with ``x == 0``, so the filled positions are exactly
    5.20.0's: eager equals sdpa, and both equal 5.20.0's eager, bit for bit.
    """

    id = "audio-eager-mask"
    marker = "mask_4d = F.pad(mask_4d, (0, pad_amount, 0, pad_amount), value=False)"
    scope = AUDIO_MODEL | AUDIO_ATTENTION
    expected = (
        "`_convert_4d_mask_to_blocked_5d` of Gemma4AudioModel padding `mask_4d` and `mask_5d` with `value=False`, "
        "and `masked_fill(attention_mask.logical_not(), ...)` in Gemma4AudioAttention.forward"
    )

    BUGGY = '''
        class Gemma4AudioAttention(nn.Module):
            def forward(self, hidden_states, position_embeddings, attention_mask=None):
                attn_weights = self.scores(hidden_states, position_embeddings)
                if attention_mask is not None:
                    attn_weights = attn_weights.masked_fill(
                        attention_mask.logical_not(), self.config.attention_invalid_logits_value
                    )
                return self.post(attn_weights), attn_weights


        class Gemma4AudioModel(Gemma4PreTrainedModel):
            def _convert_4d_mask_to_blocked_5d(self, mask_4d: torch.Tensor) -> torch.Tensor:
                """
                Convert a standard 4D attention mask to the 5D blocked format.
                """
                batch_size, _, seq_len, _ = mask_4d.shape

                mask_4d = F.pad(mask_4d, (0, pad_amount, 0, pad_amount), value=False)
                mask_5d = mask_4d.reshape(batch_size, 1, num_blocks, chunk_size, padded_seq_len)
                mask_5d = F.pad(mask_5d, (max_past_horizon, max_future_horizon), value=False)
                return mask_5d.gather(-1, kv_indices)
    '''
    PATCHED = '''
        class Gemma4AudioAttention(nn.Module):
            def forward(self, hidden_states, position_embeddings, attention_mask=None):
                attn_weights = self.scores(hidden_states, position_embeddings)
                if attention_mask is not None:
                    attn_weights = attn_weights.masked_fill(
                        attention_mask.logical_not(), self.config.attention_invalid_logits_value
                    )
                return self.post(attn_weights), attn_weights


        class Gemma4AudioModel(Gemma4PreTrainedModel):
            def _convert_4d_mask_to_blocked_5d(self, mask_4d: torch.Tensor) -> torch.Tensor:
                """
                Convert a standard 4D attention mask to the 5D blocked format.
                """
                if mask_4d.is_floating_point():
                    mask_4d = mask_4d == 0  # eager's additive mask (0.0 = attend) as a boolean one (True = attend)
                batch_size, _, seq_len, _ = mask_4d.shape

                mask_4d = F.pad(mask_4d, (0, pad_amount, 0, pad_amount), value=False)
                mask_5d = mask_4d.reshape(batch_size, 1, num_blocks, chunk_size, padded_seq_len)
                mask_5d = F.pad(mask_5d, (max_past_horizon, max_future_horizon), value=False)
                return mask_5d.gather(-1, kv_indices)
    '''
    FIXED = (
        # 5.20.0 on: both consumers take eager's float mask
        '''
        class Gemma4AudioAttention(nn.Module):
            def forward(self, hidden_states, position_embeddings, attention_mask=None):
                attn_weights = self.scores(hidden_states, position_embeddings)
                if attention_mask is not None:
                    attn_weights = attn_weights.masked_fill(attention_mask != 0, self.invalid_logits_value)
                return self.post(attn_weights), attn_weights


        class Gemma4AudioModel(Gemma4PreTrainedModel):
            _supports_sdpa = False

            def _convert_4d_mask_to_blocked_5d(self, mask_4d: torch.Tensor) -> torch.Tensor:
                batch_size, _, seq_len, _ = mask_4d.shape

                min_dtype = torch.finfo(mask_4d.dtype).min
                mask_4d = F.pad(mask_4d, (0, pad_amount, 0, pad_amount), value=min_dtype)
                mask_5d = mask_4d.reshape(batch_size, 1, num_blocks, chunk_size, padded_seq_len)
                mask_5d = F.pad(mask_5d, (max_past_horizon, max_future_horizon), value=min_dtype)
                return mask_5d.gather(-1, kv_indices)
        ''',
    )
    DRIFTED = (
        # the converter pads with something else
        BUGGY.replace("value=False)\n                return", "value=0.0)\n                return"),
        # the attention no longer fills where the boolean mask is False
        BUGGY.replace("attention_mask.logical_not()", "~attention_mask"),
        # no converter
        BUGGY.replace("_convert_4d_mask_to_blocked_5d", "_blocked_mask"),
        # the attention takes the float mask, the converter still pads with False
        BUGGY.replace("attention_mask.logical_not()", "attention_mask != 0"),
    )

    @m.call_if_inside(AUDIO_MODEL)
    @m.leave(CONVERTER)
    def convert_float_masks(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        lines = list(updated_node.body.body)
        start = 1 if lines and m.matches(lines[0], DOCSTRING) else 0
        if start < len(lines) and m.matches(lines[start], CONVERTS_FLOAT):
            self.found_fixed()  # rewritten already
            return updated_node
        if all(any(m.matches(line, pad) for line in lines) for pad in PADS_MIN):
            self.parts["float converter"] += 1
            self.found_fixed()
            return updated_node
        if not all(any(m.matches(line, pad) for line in lines) for pad in PADS_FALSE):
            self.drift("the converter pads `mask_4d` and `mask_5d` neither with `value=False` nor with `min_dtype`")
            return updated_node
        self.parts["boolean converter"] += 1
        self.rewrote()
        lines.insert(start, cst.parse_statement(TO_BOOLEAN, config=self.module.config_for_parsing))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=lines))

    @m.call_if_inside(AUDIO_ATTENTION)
    @m.call_if_inside(IN_FORWARD)
    @m.visit(FILLS)
    def note_the_fill(self, node: cst.Call) -> None:
        boolean = m.matches(node.args[0].value, FILLS_WHERE_FALSE)
        self.parts["boolean attention" if boolean else "float attention"] += 1

    def check(self) -> None:
        if self.parts["boolean converter"] and set(self.parts) != {"boolean converter", "boolean attention"}:
            self.drift("the attention must fill `attention_mask.logical_not()`, as the converter's boolean mask needs")
        if self.parts["float converter"] and set(self.parts) != {"float converter", "float attention"}:
            self.drift("the attention must fill `attention_mask != 0`, as the converter's float mask needs")
