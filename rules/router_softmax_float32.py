"""router-softmax-float32: the Gemma-4 MoE router takes its softmax, top-k and weight normalisation in bfloat16."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD

IN_ROUTER = m.ClassDef(name=m.Name("Gemma4TextRouter"))
# ``nn.functional.softmax(expert_scores, ...)``: the router's softmax over the experts' scores
SOFTMAX_OF_SCORES = m.Call(
    func=m.Attribute(value=m.Attribute(value=m.Name("nn"), attr=m.Name("functional")), attr=m.Name("softmax")),
    args=[m.Arg(m.Name("expert_scores"), keyword=None), m.ZeroOrMore()],
)
HAS_DTYPE = m.Call(args=[m.ZeroOrMore(), m.Arg(keyword=m.Name("dtype")), m.ZeroOrMore()])
IN_FLOAT32 = "# fp32 for numerical stability"


class RouterSoftmaxFloat32Rule(Rule):
    """``Gemma4TextRouter.forward`` (the MoE Gemma-4 models, 26B-A4B) takes
    ``nn.functional.softmax(expert_scores, dim=-1)`` in the model's dtype: in bfloat16 the probabilities, the top-k
    over them, the renormalisation of the top-k weights and their per-expert scale all round to 8 bits of mantissa,
    so the routing weights err by about 0.4% and rounding ties among small probabilities change which experts a token
    picks. Transformers 5.5.0 to 5.12.x have the bug (one text).

    Upstream's fix (transformers 5.13.0) adds ``dtype=torch.float32`` to the softmax, under the comment
    ``# fp32 for numerical stability``: everything after it runs in float32, and the experts cast their sum back to
    the model's dtype themselves. The rewrite is that fix: the same keyword, the same comment.
    A softmax that already names a ``dtype`` is the fixed shape (5.13.0 on).
    """

    id = "router-softmax-float32"
    marker = "class Gemma4TextRouter("
    scope = IN_ROUTER
    expected = "`nn.functional.softmax(expert_scores, ...)` in Gemma4TextRouter.forward"

    BUGGY = '''
        class Gemma4TextRouter(nn.Module):
            def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                hidden_states = self.norm(hidden_states)
                hidden_states = hidden_states * self.scale * self.scalar_root_size

                expert_scores = self.proj(hidden_states)  # [B*S, E]
                router_probabilities = nn.functional.softmax(expert_scores, dim=-1)

                # topk returns both values (probabilities) and indices directly
                top_k_weights, top_k_index = torch.topk(
                    router_probabilities,
                    k=self.config.top_k_experts,
                    dim=-1,
                )  # both [B*S, K]

                # Normalize the top-k weights so they sum to 1 per token
                top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)

                # Apply per-expert scale directly to the weights
                top_k_weights = top_k_weights * self.per_expert_scale[top_k_index]

                return router_probabilities, top_k_weights, top_k_index
    '''
    PATCHED = '''
        class Gemma4TextRouter(nn.Module):
            def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                hidden_states = self.norm(hidden_states)
                hidden_states = hidden_states * self.scale * self.scalar_root_size

                expert_scores = self.proj(hidden_states)  # [B*S, E]
                # fp32 for numerical stability
                router_probabilities = nn.functional.softmax(expert_scores, dim=-1, dtype=torch.float32)

                # topk returns both values (probabilities) and indices directly
                top_k_weights, top_k_index = torch.topk(
                    router_probabilities,
                    k=self.config.top_k_experts,
                    dim=-1,
                )  # both [B*S, K]

                # Normalize the top-k weights so they sum to 1 per token
                top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)

                # Apply per-expert scale directly to the weights
                top_k_weights = top_k_weights * self.per_expert_scale[top_k_index]

                return router_probabilities, top_k_weights, top_k_index
    '''
    FIXED = (
        # 5.13.0 on
        PATCHED,
        # a softmax in some other explicit dtype is the author's choice, not this bug
        BUGGY.replace("softmax(expert_scores, dim=-1)", "softmax(expert_scores, dim=-1, dtype=torch.float64)"),
    )
    DRIFTED = (
        # the router scores its experts some other way
        BUGGY.replace("nn.functional.softmax(expert_scores, dim=-1)", "torch.sigmoid(expert_scores)"),
        # the scores are no longer called expert_scores
        BUGGY.replace("expert_scores", "router_logits"),
        # no forward in the router
        '''
        class Gemma4TextRouter(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        ''',
    )

    @m.call_if_inside(IN_ROUTER)
    @m.call_if_inside(IN_FORWARD)
    @m.leave(m.SimpleStatementLine(body=[m.Assign(value=SOFTMAX_OF_SCORES)]))
    def softmax_in_float32(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        softmax = updated_node.body[0].value
        if m.matches(softmax, HAS_DTYPE):
            self.found_fixed()
            return updated_node
        self.rewrote()
        last = softmax.args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        (dtype,) = cst.parse_expression("softmax(dtype=torch.float32)").args
        in_float32 = softmax.with_changes(args=[*softmax.args[:-1], last, dtype])
        comment = cst.EmptyLine(comment=cst.Comment(IN_FLOAT32))
        return updated_node.with_changes(
            body=[updated_node.body[0].with_changes(value=in_float32)],
            leading_lines=[*updated_node.leading_lines, comment],
        )
