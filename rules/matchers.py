"""LibCST matchers of transformers' code that rules share, and the builders of such matchers."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

SELF = m.Name("self")
NONE = m.Name("None")
IN_INIT = m.FunctionDef(name=m.Name("__init__"))
IN_FORWARD = m.FunctionDef(name=m.Name("forward"))
IN_TEXT_ATTENTION = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextAttention"))))
IN_TEXT_MODEL = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextModel"))))
IS_KV_SHARED_LAYER = m.Attribute(value=SELF, attr=m.Name("is_kv_shared_layer"))
# ``super().__init__(...)`` alone on a line
SUPER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))))]
)
LAYER_TYPES = m.Attribute(attr=m.Name("layer_types"))
SET_OF_LAYER_TYPES = m.Call(func=m.Name("set"), args=[m.Arg(LAYER_TYPES)])
SORTED_LAYER_TYPES = m.Call(func=m.Name("sorted"), args=[m.Arg(SET_OF_LAYER_TYPES | LAYER_TYPES)])


def is_none(value: m.BaseExpression) -> m.Comparison:
    """``VALUE is None``, for a VALUE that ``value`` matches."""
    return m.Comparison(left=value, comparisons=[m.ComparisonTarget(m.Is(), NONE)])


def is_not_none(value: m.BaseExpression) -> m.Comparison:
    """``VALUE is not None``, for a VALUE that ``value`` matches."""
    return m.Comparison(left=value, comparisons=[m.ComparisonTarget(m.IsNot(), NONE)])


def assigns(target: m.BaseMatcherNode, value: m.BaseMatcherNode = m.DoNotCare()) -> m.SimpleStatementLine:
    """``TARGET = VALUE`` alone on a line, for a TARGET and a VALUE that ``target`` and ``value`` match."""
    return m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target)], value=value)])


def assigns_self(names: m.BaseMatcherNode) -> m.SimpleStatementLine:
    """``self.NAME = ...`` alone on a line, for a NAME that ``names`` matches."""
    return assigns(m.Attribute(value=SELF, attr=names))


def wrappers(prefix: str) -> m.ClassDef:
    """The models of a family that hold its text model: ``{prefix}ForCausalLM``, ``{prefix}Model`` and
    ``{prefix}ForConditionalGeneration``."""
    return m.ClassDef(name=m.OneOf(*(m.Name(f"{prefix}{kind}") for kind in ("ForCausalLM", "Model", "ForConditionalGeneration"))))


def sorted_call(layer_types: cst.BaseExpression) -> cst.Call:
    """``sorted(LAYER_TYPES)``: the layer types in an order no hash seed changes."""
    return cst.Call(func=cst.Name("sorted"), args=[cst.Arg(layer_types)])
