"""kv-shared-slice: Gemma-4's caches slice away every layer when ``num_kv_shared_layers`` is 0."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

KV_SHARED_COUNT = m.Name("num_kv_shared_layers") | m.Attribute(attr=m.Name("num_kv_shared_layers"))
SLICE_BY_NEGATIVE_COUNT = m.Subscript(
    slice=[
        m.SubscriptElement(
            slice=m.Slice(
                lower=None, upper=m.UnaryOperation(operator=m.Minus(), expression=KV_SHARED_COUNT), step=None
            )
        )
    ]
)
SLICE_BY_REMAINING_LENGTH = m.Subscript(
    slice=[
        m.SubscriptElement(
            slice=m.Slice(
                lower=None,
                upper=m.BinaryOperation(left=m.Call(func=m.Name("len")), operator=m.Subtract(), right=KV_SHARED_COUNT),
                step=None,
            )
        )
    ]
)
POSITIVE_COUNT = (
    KV_SHARED_COUNT
    | m.Comparison(left=KV_SHARED_COUNT, comparisons=[m.ComparisonTarget(m.GreaterThan(), m.Integer("0"))])
    | m.Comparison(left=KV_SHARED_COUNT, comparisons=[m.ComparisonTarget(m.GreaterThanEqual(), m.Integer("1"))])
    | m.Comparison(left=m.Integer("0"), comparisons=[m.ComparisonTarget(m.LessThan(), KV_SHARED_COUNT)])
)
PLAIN_REFERENCE = m.Name() | m.Attribute(value=m.Name())
# Later releases stop trimming: layers that reuse another layer's K/V get a dummy cache layer instead.
READS_KV_SHARING_MODES = m.Call(
    func=m.Name("getattr"), args=[m.Arg(), m.Arg(m.SimpleString('"kv_sharing_modes"')), m.ZeroOrMore()]
)
CACHE_CLASS = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("Cache"))))


def ensures_positive_count(test: cst.BaseExpression) -> bool:
    """Whether an ``if`` test, true, guarantees ``num_kv_shared_layers`` is non-zero."""
    if isinstance(test, cst.BooleanOperation) and isinstance(test.operator, cst.And):
        return ensures_positive_count(test.left) or ensures_positive_count(test.right)
    return m.matches(test, POSITIVE_COUNT)


class KVSharedSliceRule(Rule):
    """``seq[: -n]`` is ``seq[:0] == []`` when ``n == 0``: caches for Gemma-4 31B and 26B-A4B get no layers."""

    id = "kv-shared-slice"
    marker = "num_kv_shared_layers"
    scope = CACHE_CLASS | m.FunctionDef()  # cache constructors and helpers build the layer list, layers never do
    expected = "`seq[: -config.num_kv_shared_layers]` outside a guard that the count is positive"

    BUGGY = '''
        def cache_layer_types(config, layer_types):
            if hasattr(config, "num_kv_shared_layers"):
                layer_types = layer_types[: -config.num_kv_shared_layers]
            return layer_types[:-1], layer_types[: -config.num_sliding]
    '''
    PATCHED = '''
        def cache_layer_types(config, layer_types):
            if hasattr(config, "num_kv_shared_layers"):
                layer_types = layer_types[: len(layer_types) - config.num_kv_shared_layers]
            return layer_types[:-1], layer_types[: -config.num_sliding]
    '''
    FIXED = (
        '''
        def cache_layer_types(config, layer_types):
            num_kv_shared_layers = getattr(config, "num_kv_shared_layers", 0)
            if num_kv_shared_layers > 0:
                layer_types = layer_types[:-num_kv_shared_layers]
        ''',
        '''
        class StaticCache(Cache):
            def __init__(self, config, layer_types):
                num_kv_shared_layers = getattr(config, "num_kv_shared_layers", None)
                if num_kv_shared_layers is not None and num_kv_shared_layers > 0:
                    layer_types = layer_types[: -config.num_kv_shared_layers]
        ''',
        '''
        def get_layer_types(config, layer_types):
            kv_sharing_modes = getattr(config, "kv_sharing_modes", None)
            if kv_sharing_modes is not None:
                layer_types = ["dummy" if mode == "reuse" else kind for kind, mode in zip(layer_types, kv_sharing_modes)]
        ''',
    )
    DRIFTED = (
        '''
        def cache_layer_types(config, layer_types):
            if hasattr(config, "num_kv_shared_layers"):
                del layer_types[-config.num_kv_shared_layers :]
        ''',
        '''
        class DynamicCache(Cache):
            def __init__(self, config):
                if hasattr(config, "num_kv_shared_layers"):
                    layer_types = get_types(config)[: -config.num_kv_shared_layers]
        ''',
        '''
        class DynamicLayer(CacheLayerMixin):
            def __init__(self, config, layer_types):
                layer_types = layer_types[: -config.num_kv_shared_layers]
        ''',
    )

    def __init__(self) -> None:
        super().__init__()
        self.guards: list[bool] = []
        self.in_class = False

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.in_class = True

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        self.in_class = False
        return updated_node

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        """In a cache class only the constructor builds the layer list."""
        return not self.in_class or node.name.value == "__init__"


    def visit_If_body(self, node: cst.If) -> None:
        self.guards.append(ensures_positive_count(node.test))

    def leave_If_body(self, node: cst.If) -> None:
        self.guards.pop()

    @m.leave(SLICE_BY_REMAINING_LENGTH | READS_KV_SHARING_MODES)
    def note_fixed_shape(self, original_node: cst.BaseExpression, updated_node: cst.BaseExpression) -> cst.BaseExpression:
        self.found_fixed()
        return updated_node

    @m.leave(SLICE_BY_NEGATIVE_COUNT)
    def slice_by_remaining_length(self, original_node: cst.Subscript, updated_node: cst.Subscript) -> cst.Subscript:
        if any(self.guards):
            self.found_fixed()
            return updated_node
        if not m.matches(updated_node.value, PLAIN_REFERENCE):
            self.drift(f"the sliced sequence `{cst.Module([]).code_for_node(updated_node.value)}` is not a plain name")
            return updated_node
        element = updated_node.slice[0]
        count = element.slice.upper.expression
        remaining = cst.BinaryOperation(
            left=cst.Call(func=cst.Name("len"), args=[cst.Arg(updated_node.value)]), operator=cst.Subtract(), right=count
        )
        self.rewrote()
        return updated_node.with_changes(slice=[element.with_changes(slice=element.slice.with_changes(upper=remaining))])
