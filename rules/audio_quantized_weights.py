"""audio-quantized-weights: the Gemma-4 audio tower reads its dtype from weights that bitsandbytes packs as integers."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, SELF

FEED_FORWARD = m.ClassDef(name=m.Name("Gemma4AudioFeedForward"))
LIGHT_CONV = m.ClassDef(name=m.Name("Gemma4AudioLightConv1d"))
ATTENTION = m.ClassDef(name=m.Name("Gemma4AudioAttention"))
HIDDEN_DTYPE = m.Attribute(value=m.Name("hidden_states"), attr=m.Name("dtype"))


def weight_dtype(linear: str) -> m.Attribute:
    """``self.LINEAR.linear.weight.dtype``: the dtype of a Gemma4ClippableLinear's weight."""
    clippable = m.Attribute(value=SELF, attr=m.Name(linear))
    weight = m.Attribute(value=m.Attribute(value=clippable, attr=m.Name("linear")), attr=m.Name("weight"))
    return m.Attribute(value=weight, attr=m.Name("dtype"))


def finfo(dtype: m.BaseExpression) -> m.Call:
    """``torch.finfo(DTYPE)``."""
    return m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("finfo")), args=[m.Arg(dtype, keyword=None)])


# the bounds of the clamps (5.5.0 to 5.10.x: of the weight's dtype, 5.11.0 on: of the activations')
FEED_FORWARD_FINFO = finfo(weight_dtype("ffw_layer_1"))
LIGHT_CONV_FINFO = finfo(weight_dtype("linear_start"))
FINFO_OF_HIDDEN = finfo(HIDDEN_DTYPE)
# the attention's input to `post` (5.5.0 to 5.10.x: cast to the weight's dtype, 5.11.0 on: to the activations')
ATTN_OUTPUT_TO = m.Attribute(value=m.Name("attn_output"), attr=m.Name("to"))
TO_POST_WEIGHT = m.Call(func=ATTN_OUTPUT_TO, args=[m.Arg(weight_dtype("post"), keyword=m.Name("dtype"))])
TO_HIDDEN = m.Call(func=ATTN_OUTPUT_TO, args=[m.Arg(HIDDEN_DTYPE, keyword=None)])
POST = m.Call(func=m.Attribute(value=SELF, attr=m.Name("post")), args=[m.Arg(TO_POST_WEIGHT | TO_HIDDEN)])
PARTS = {"feed-forward", "light conv", "attention"}


class AudioQuantizedWeightsRule(Rule):
    """Three places of the Gemma-4 audio tower take the activations' dtype from a ``Gemma4ClippableLinear``'s
    weight: the clamps of ``Gemma4AudioFeedForward`` and ``Gemma4AudioLightConv1d``
    (``torch.finfo(self.<linear>.linear.weight.dtype)``) and the cast before ``Gemma4AudioAttention``'s ``post``.
    With bitsandbytes 4-bit or 8-bit those weights are packed ``uint8``/``int8``: ``torch.finfo`` raises
    ``TypeError`` in the first feed-forward, and were it not to, the attention output would be cast to integers
    before ``post``. Transformers 5.5.0 to 5.10.x (issue #45672).

    Upstream's fix (5.11.0) takes the dtype from the activations in all three: ``torch.finfo(hidden_states.dtype)``
    twice and ``self.post(attn_output.to(hidden_states.dtype))``; the rewrite writes those. The three go together:
    the clamps alone turn the crash into silently wrong features. With float weights nothing changes.
    """

    id = "audio-quantized-weights"
    marker = "torch.finfo(self.ffw_layer_1.linear.weight.dtype)"
    scope = FEED_FORWARD | LIGHT_CONV | ATTENTION
    expected = (
        "`torch.finfo(self.ffw_layer_1.linear.weight.dtype)` in Gemma4AudioFeedForward, "
        "`torch.finfo(self.linear_start.linear.weight.dtype)` in Gemma4AudioLightConv1d and "
        "`self.post(attn_output.to(dtype=self.post.linear.weight.dtype))` in Gemma4AudioAttention"
    )

    BUGGY = '''
        class Gemma4AudioAttention(nn.Module):
            def forward(self, hidden_states, position_embeddings, attention_mask=None):
                attn_output = self.attend(hidden_states, position_embeddings, attention_mask)
                attn_output = self.post(attn_output.to(dtype=self.post.linear.weight.dtype))
                return attn_output, None


        class Gemma4AudioFeedForward(nn.Module):
            def forward(self, hidden_states):
                # This is needed to avoid any underflow/overflow issues when clipping
                gradient_clipping = min(self.gradient_clipping, torch.finfo(self.ffw_layer_1.linear.weight.dtype).max)
                hidden_states = torch.clamp(hidden_states, -gradient_clipping, gradient_clipping)
                return self.ffw_layer_2(self.ffw_layer_1(hidden_states))


        class Gemma4AudioLightConv1d(nn.Module):
            def forward(self, hidden_states):
                hidden_states = self.linear_start(hidden_states)
                # This is needed to avoid any underflow/overflow issues when clipping
                gradient_clipping = min(self.gradient_clipping, torch.finfo(self.linear_start.linear.weight.dtype).max)
                return torch.clamp(hidden_states, -gradient_clipping, gradient_clipping)
    '''
    PATCHED = (
        BUGGY.replace("attn_output.to(dtype=self.post.linear.weight.dtype)", "attn_output.to(hidden_states.dtype)")
        .replace("torch.finfo(self.ffw_layer_1.linear.weight.dtype)", "torch.finfo(hidden_states.dtype)")
        .replace("torch.finfo(self.linear_start.linear.weight.dtype)", "torch.finfo(hidden_states.dtype)")
    )
    FIXED = (PATCHED,)
    DRIFTED = (
        # only the clamps: the cast before `post` is some other shape
        BUGGY.replace("attn_output.to(dtype=self.post.linear.weight.dtype)", "attn_output.to(self.post_dtype)"),
        # the feed-forward's clamp reads another weight
        BUGGY.replace(
            "torch.finfo(self.ffw_layer_1.linear.weight.dtype)", "torch.finfo(self.ffw_layer_1.weight.dtype)"
        ),
        # half fixed: the clamps read the activations, the cast still the weight
        PATCHED.replace("attn_output.to(hidden_states.dtype)", "attn_output.to(dtype=self.post.linear.weight.dtype)"),
    )

    @m.call_if_inside(FEED_FORWARD)
    @m.call_if_inside(IN_FORWARD)
    @m.leave(FEED_FORWARD_FINFO | FINFO_OF_HIDDEN)
    def feed_forward_bounds(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        return self.replace(updated_node, "feed-forward", FINFO_OF_HIDDEN, "torch.finfo(hidden_states.dtype)")

    @m.call_if_inside(LIGHT_CONV)
    @m.call_if_inside(IN_FORWARD)
    @m.leave(LIGHT_CONV_FINFO | FINFO_OF_HIDDEN)
    def light_conv_bounds(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        return self.replace(updated_node, "light conv", FINFO_OF_HIDDEN, "torch.finfo(hidden_states.dtype)")

    @m.call_if_inside(ATTENTION)
    @m.call_if_inside(IN_FORWARD)
    @m.leave(POST)
    def post_input(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        (arg,) = updated_node.args
        cast = self.replace(arg.value, "attention", TO_HIDDEN, "attn_output.to(hidden_states.dtype)")
        return updated_node.with_changes(args=[arg.with_changes(value=cast)])

    def replace(self, node: cst.Call, part: str, fixed: m.Call, code: str) -> cst.Call:
        """``node``, upstream's ``fixed`` shape or a buggy one, as ``code`` (upstream's); notes which it was."""
        if m.matches(node, fixed):
            self.parts[f"{part} fixed"] += 1
            self.found_fixed()
            return node
        self.parts[part] += 1
        self.rewrote()
        return cst.parse_expression(code)

    def check(self) -> None:
        buggy, fixed = PARTS & set(self.parts), {part for part in PARTS if self.parts[f"{part} fixed"]}
        if (buggy or fixed) and (buggy, fixed) not in ((PARTS, set()), (set(), PARTS)):
            self.drift(f"all three places buggy or all fixed; found buggy {sorted(buggy)}, fixed {sorted(fixed)}")
