"""sdpa-gqa-head-dim: SDPA is asked for grouped-query attention at head dims its fused CUDA kernels do not take."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

USE_GQA = m.FunctionDef(name=m.Name("use_gqa_in_sdpa"))
SDPA_FORWARD = m.FunctionDef(name=m.Name("sdpa_attention_forward"))
ATTENTION_MASK, KEY, VALUE, MODULE = m.Name("attention_mask"), m.Name("key"), m.Name("value"), m.Name("module")
NO_MASK = m.Comparison(left=ATTENTION_MASK, comparisons=[m.ComparisonTarget(m.Is(), m.Name("None"))])
# ``return ... and attention_mask is None``: the CUDA (and NPU) condition, the function's last statement
RETURNS_WITHOUT_MASK = m.SimpleStatementLine(body=[m.Return(m.BooleanOperation(operator=m.And(), right=NO_MASK))])
# ``key.shape[-1] == value.shape[-1] <= 256``, anywhere in the function: the fixed condition
HEAD_DIM_LIMIT = m.Comparison(
    comparisons=[m.ComparisonTarget(m.Equal()), m.ComparisonTarget(m.LessThanEqual(), m.Integer("256"))]
)
HAS_KV_GROUPS = m.Call(
    func=m.Name("hasattr"),
    args=[m.Arg(MODULE), m.Arg(m.SimpleString(m.MatchRegex(r"""(["'])num_key_value_groups\1""")))],
)
# the call site: ``use_gqa_in_sdpa(...)`` under ``if hasattr(module, "num_key_value_groups"):``
ASKS_GQA = m.Call(func=m.Name("use_gqa_in_sdpa"))
MORE_THAN_ONE_GROUP = "module.num_key_value_groups > 1"
HEAD_DIM_LIMIT_TEXT = "key.shape[-1] == value.shape[-1] <= 256"
HEAD_DIM_COMMENT = "#   - key head_dim == value head_dim <= 256 (otherwise it will fall back to the math kernel)"
MASK_COMMENT = m.EmptyLine(comment=m.Comment(m.MatchRegex(r"#\s+- attention_mask is None .*math kernel.*")))


class SdpaGqaHeadDimRule(Rule):
    """``use_gqa_in_sdpa`` (``integrations/sdpa_attention.py``) lets ``sdpa_attention_forward`` pass
    ``enable_gqa=True`` to ``torch.nn.functional.scaled_dot_product_attention`` whenever there is no mask, whatever
    the head dim. On CUDA the flash kernel takes head dims up to 256 only and the memory-efficient kernel does not take
    ``enable_gqa``, so at Gemma-4's head dim 512 (its full-attention layers, in a prefill or training step without
    padding) SDPA falls back to the math kernel, which materialises every head's full score matrix; repeating the
    key/value heads instead keeps the memory-efficient kernel (PR #46960's account: on a CPU SDPA runs one kernel
    either way). Transformers 5.0.0 to 5.12.x have the bug (one text); the gemma4 family meets it from 5.5.0.

    Upstream's fix (transformers 5.13.0, PR #46960) gives ``use_gqa_in_sdpa`` a ``value`` parameter and the condition
    ``key.shape[-1] == value.shape[-1] <= 256`` (with a comment saying why), and asks it only for modules with more
    than one query head per key/value head. The rewrite is that fix, statement for statement. It changes which
    kernel SDPA runs, not its result: the logits are the same. It is bound in the gemma4 family but, as upstream's
    fix does, applies to every model that runs SDPA.
    """

    id = "sdpa-gqa-head-dim"
    marker = "def use_gqa_in_sdpa("
    scope = USE_GQA | SDPA_FORWARD
    expected = (
        "`use_gqa_in_sdpa(attention_mask, key)` returning `... and attention_mask is None`, called in"
        " sdpa_attention_forward under `if hasattr(module, \"num_key_value_groups\"):`"
    )

    BUGGY = '''
        def use_gqa_in_sdpa(attention_mask: torch.Tensor | None, key: torch.Tensor) -> bool:
            # GQA can only be used under the following conditions
            # 1.cuda or Ascend NPU
            #   - torch version >= 2.5
            #   - attention_mask is None (otherwise it will fall back to the math kernel)
            # 2.xpu
            #   - torch version >= 2.8
            if _is_torch_xpu_available:
                return _is_torch_greater_or_equal_than_2_8
            return _is_torch_greater_or_equal_than_2_5 and attention_mask is None


        def sdpa_attention_forward(
            module: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            **kwargs,
        ) -> tuple[torch.Tensor, None]:
            sdpa_kwargs = {}
            if hasattr(module, "num_key_value_groups"):
                if not use_gqa_in_sdpa(attention_mask, key):
                    key = repeat_kv(key, module.num_key_value_groups)
                    value = repeat_kv(value, module.num_key_value_groups)
                else:
                    sdpa_kwargs = {"enable_gqa": True}
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, **sdpa_kwargs), None
    '''
    PATCHED = '''
        def use_gqa_in_sdpa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
            # GQA can only be used under the following conditions
            # 1.cuda or Ascend NPU
            #   - torch version >= 2.5
            #   - attention_mask is None (otherwise it will fall back to the math kernel)
            #   - key head_dim == value head_dim <= 256 (otherwise it will fall back to the math kernel)
            # 2.xpu
            #   - torch version >= 2.8
            if _is_torch_xpu_available:
                return _is_torch_greater_or_equal_than_2_8
            return _is_torch_greater_or_equal_than_2_5 and attention_mask is None and key.shape[-1] == value.shape[-1] <= 256


        def sdpa_attention_forward(
            module: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            **kwargs,
        ) -> tuple[torch.Tensor, None]:
            sdpa_kwargs = {}
            if hasattr(module, "num_key_value_groups") and module.num_key_value_groups > 1:
                if not use_gqa_in_sdpa(attention_mask, key, value):
                    key = repeat_kv(key, module.num_key_value_groups)
                    value = repeat_kv(value, module.num_key_value_groups)
                else:
                    sdpa_kwargs = {"enable_gqa": True}
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, **sdpa_kwargs), None
    '''
    FIXED = (
        # 5.13.0 to 5.22.x: the same (5.15.0 drops the torch 2.5 test, 5.18.0 adds an MPS branch)
        PATCHED,
        # 5.23.0 on: a switch to force GQA, and the call site asks use_gqa_in_sdpa first
        '''
        def use_gqa_in_sdpa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
            if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
                return True
            # XPU and MPS support masked GQA under more recent torch versions
            if _is_torch_xpu_available:
                return _is_torch_greater_or_equal_than_2_8
            elif _is_torch_mps_available:
                return _is_torch_greater_or_equal_than_2_13
            # CUDA and Ascend NPU require no mask and supported head dims to avoid falling back to the math kernel.
            return attention_mask is None and key.shape[-1] == value.shape[-1] <= 256


        def sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
            sdpa_kwargs = {}
            q_length = query.shape[2]
            if hasattr(module, "num_key_value_groups") and module.num_key_value_groups > 1:
                if use_gqa_in_sdpa(attention_mask, key, value):
                    sdpa_kwargs["enable_gqa"] = True
                elif q_length == 1 and not is_torchdynamo_compiling():
                    query = pack_gqa(query, module.num_key_value_groups)
                else:
                    key = repeat_kv(key, module.num_key_value_groups)
                    value = repeat_kv(value, module.num_key_value_groups)
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, **sdpa_kwargs), None
        ''',
    )
    DRIFTED = (
        # 4.54 to 4.57: a further condition after the mask's (not a shape the gemma4 family meets)
        BUGGY.replace("attention_mask is None\n", "attention_mask is None and not isinstance(key, torch.fx.Proxy)\n"),
        # the call site no longer under `hasattr(module, "num_key_value_groups")`
        BUGGY.replace('if hasattr(module, "num_key_value_groups"):', "if module.is_causal:"),
        # use_gqa_in_sdpa buggy but already called with the value states
        BUGGY.replace("use_gqa_in_sdpa(attention_mask, key):", "use_gqa_in_sdpa(attention_mask, key, value):"),
        # use_gqa_in_sdpa fixed but called without the value states
        PATCHED.replace("use_gqa_in_sdpa(attention_mask, key, value):", "use_gqa_in_sdpa(attention_mask, key):"),
        # no sdpa_attention_forward to call it
        BUGGY[: BUGGY.index("def sdpa_attention_forward(")],
    )

    @m.leave(USE_GQA)
    def limit_head_dim(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        params = updated_node.params.params
        if any(m.matches(param.name, VALUE) for param in params):
            if not m.findall(updated_node.body, HEAD_DIM_LIMIT):
                self.drift("`use_gqa_in_sdpa` takes `value` but has no `key.shape[-1] == value.shape[-1] <= 256`")
                return updated_node
            self.parts["use_gqa_in_sdpa fixed"] += 1
            self.found_fixed()
            return updated_node
        lines = list(updated_node.body.body)
        names = [param.name.value for param in params]
        if names != ["attention_mask", "key"] or not m.matches(lines[-1], RETURNS_WITHOUT_MASK):
            self.drift("`use_gqa_in_sdpa` is neither `(attention_mask, key)` ending in that return nor fixed")
            return updated_node
        self.parts["use_gqa_in_sdpa buggy"] += 1
        self.rewrote()
        key = params[-1]
        value = key.with_changes(name=cst.Name("value"), comma=cst.MaybeSentinel.DEFAULT)
        signature = updated_node.params.with_changes(
            params=[*params[:-1], key.with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))), value]
        )
        (returns,) = lines[-1].body
        limit = cst.BooleanOperation(
            left=returns.value, operator=cst.And(), right=cst.parse_expression(HEAD_DIM_LIMIT_TEXT)
        )
        lines[-1] = lines[-1].with_changes(body=[returns.with_changes(value=limit)])
        lines = [_comment_head_dim(line) for line in lines]
        return updated_node.with_changes(params=signature, body=updated_node.body.with_changes(body=lines))

    @m.leave(SDPA_FORWARD)
    def pass_value(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        calls = m.findall(updated_node, ASKS_GQA)
        if len(calls) != 1:
            self.drift(f"`sdpa_attention_forward` calls `use_gqa_in_sdpa` {len(calls)} times")
            return updated_node
        (call,) = calls
        if m.matches(call, m.Call(args=[m.Arg(ATTENTION_MASK), m.Arg(KEY), m.Arg(VALUE)])):
            self.parts["sdpa_attention_forward fixed"] += 1
            self.found_fixed()
            return updated_node
        sites = m.findall(updated_node, m.If(test=HAS_KV_GROUPS))
        site = next((site for site in sites if any(found is call for found in m.findall(site.body, ASKS_GQA))), None)
        if not m.matches(call, m.Call(args=[m.Arg(ATTENTION_MASK), m.Arg(KEY)])) or site is None:
            self.drift(
                "`sdpa_attention_forward` calls `use_gqa_in_sdpa` neither as `(attention_mask, key)` under"
                " `if hasattr(module, \"num_key_value_groups\"):` nor with the value states"
            )
            return updated_node
        self.parts["sdpa_attention_forward buggy"] += 1
        self.rewrote()
        with_value = call.with_changes(
            args=[
                *call.args[:-1],
                call.args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))),
                cst.Arg(cst.Name("value")),
            ]
        )
        guarded = site.with_changes(
            test=cst.BooleanOperation(
                left=site.test, operator=cst.And(), right=cst.parse_expression(MORE_THAN_ONE_GROUP)
            ),
            body=site.body.deep_replace(call, with_value),
        )
        return updated_node.deep_replace(site, guarded)

    def check(self) -> None:
        if not self.parts:
            return
        states = {part.partition(" ")[0]: part.partition(" ")[2] for part in self.parts}
        if len(states) != 2 or len(set(states.values())) != 1:
            self.drift(
                "`use_gqa_in_sdpa` and its call in `sdpa_attention_forward` must both be found, both buggy or both"
                f" fixed; found {', '.join(sorted(self.parts))}"
            )


def _comment_head_dim(line: cst.BaseStatement) -> cst.BaseStatement:
    """``line`` with upstream's head-dim comment after the mask's, where its leading comments have that one."""
    leading = list(line.leading_lines)
    at = next((index for index, empty in enumerate(leading) if m.matches(empty, MASK_COMMENT)), None)
    if at is None:
        return line
    leading.insert(at + 1, cst.EmptyLine(comment=cst.Comment(HEAD_DIM_COMMENT)))
    return line.with_changes(leading_lines=leading)
