"""Rules for bugs of Gemma-4's own code in transformers 5.5.x (their files: ``rewriter.families``)."""

from __future__ import annotations

from textwrap import dedent

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.kv_sharing import SharedKVStatesRule, wrappers

SELF = m.Name("self")
NONE = m.Name("None")

# ---- kv-shared-slice ------------------------------------------------------------------------------------------------

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


# ---- kv-sharing-without-cache ---------------------------------------------------------------------------------------

PAST_KEY_VALUES = m.Name("past_key_values")
CACHE_GIVEN = m.Comparison(left=PAST_KEY_VALUES, comparisons=[m.ComparisonTarget(m.IsNot(), NONE)])
IS_KV_SHARED_LAYER = m.Attribute(value=SELF, attr=m.Name("is_kv_shared_layer"))
SHARED_LAYERS_ENTRY = m.Subscript(value=m.Attribute(value=PAST_KEY_VALUES, attr=m.Name("shared_layers")))
READ_SHARED_IF_CACHED = m.If(test=m.BooleanOperation(left=IS_KV_SHARED_LAYER, operator=m.And(), right=CACHE_GIVEN))
STORE_SHARED_IN_CACHE = m.If(
    test=CACHE_GIVEN,
    body=m.IndentedBlock(
        body=[
            m.If(
                test=m.UnaryOperation(operator=m.Not(), expression=IS_KV_SHARED_LAYER),
                body=m.IndentedBlock(
                    body=[
                        m.SimpleStatementLine(
                            body=[m.Assign(value=m.Call(func=m.Attribute(value=PAST_KEY_VALUES, attr=m.Name("update"))))]
                        )
                    ]
                ),
                orelse=None,
            ),
            m.If(
                test=m.Attribute(value=SELF, attr=m.Name("store_full_length_kv")),
                body=m.IndentedBlock(
                    body=[
                        m.ZeroOrMore(),
                        m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target=SHARED_LAYERS_ENTRY)])]),
                    ]
                ),
                orelse=None,
            ),
        ]
    ),
    orelse=None,
)
IN_ATTENTION = m.ClassDef(name=m.Name("Gemma4TextAttention"))
IN_TEXT_MODEL = m.ClassDef(name=m.Name("Gemma4TextModel"))

STORE_SHARED_TEMPLATE = """\
if past_key_values is not None and not self.is_kv_shared_layer:
    {update}
if self.store_full_length_kv:
    shared_kv_states[self.layer_idx] = key_states, value_states
"""


class KVSharingWithoutCacheRule(SharedKVStatesRule):
    """Gemma-4's KV-shared layers find their K/V on the cache; without one (``use_cache=False``) they recompute it.

    The fix hands the shared K/V from layer to layer in a dict made by ``Gemma4TextModel.forward`` for each call,
    as transformers 5.5.2 does, so a cache no longer decides what the shared layers attend to.
    """

    scope = IN_ATTENTION | IN_TEXT_MODEL | wrappers("Gemma4")
    expected = "Gemma4TextAttention.forward reading `past_key_values.shared_layers[...]` only when a cache is given"

    BUGGY = '''
        class Gemma4TextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.is_kv_shared_layer = layer_idx >= config.num_hidden_layers - config.num_kv_shared_layers > 0
                self.q_norm = Gemma4RMSNorm(dim=self.head_dim)
                self.k_norm = Gemma4RMSNorm(dim=self.head_dim)
                self.v_norm = Gemma4RMSNorm(self.head_dim, with_scale=False)

                self.k_proj = nn.Linear(config.hidden_size, self.head_dim)
                self.q_proj = nn.Linear(config.hidden_size, self.head_dim)
                self.v_proj = nn.Linear(config.hidden_size, self.head_dim) if not self.use_alternative_attention else None
                self.o_proj = nn.Linear(self.head_dim, config.hidden_size)

            def forward(self, hidden_states, past_key_values: Cache | None = None, **kwargs):
                if self.is_kv_shared_layer and past_key_values is not None:
                    key_states, value_states = past_key_values.shared_layers[self.kv_shared_layer_index]
                else:
                    key_states, value_states = self.project(hidden_states)
                if past_key_values is not None:
                    if not self.is_kv_shared_layer:
                        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
                    if self.store_full_length_kv:
                        if not hasattr(past_key_values, "shared_layers"):
                            past_key_values.shared_layers = {}
                        past_key_values.shared_layers[self.layer_idx] = key_states, value_states
                return attend(key_states, value_states)


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

                # Initialize weights and apply final processing
                self.post_init()

            def forward(self, hidden_states, past_key_values=None, **kwargs):
                for i, decoder_layer in enumerate(self.layers):
                    hidden_states = decoder_layer(
                        hidden_states,
                        past_key_values=past_key_values,
                        **kwargs,
                    )
                for i, layer in enumerate(self.other_layers):
                    hidden_states = layer(hidden_states, **kwargs)
                return hidden_states


        class Gemma4ForCausalLM(Gemma4PreTrainedModel, GenerationMixin):
            def __init__(self, config):
                super().__init__(config)
                self.model = Gemma4TextModel(config)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

                # Initialize weights and apply final processing
                self.post_init()
    '''
    PATCHED = '''
        class Gemma4TextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.is_kv_shared_layer = layer_idx >= config.num_hidden_layers - config.num_kv_shared_layers > 0
                self.q_norm = Gemma4RMSNorm(dim=self.head_dim)
                self.q_proj = nn.Linear(config.hidden_size, self.head_dim)

                # Layers sharing kv states don't need any weight matrices
                if not self.is_kv_shared_layer:
                    self.k_norm = Gemma4RMSNorm(dim=self.head_dim)
                    self.v_norm = Gemma4RMSNorm(self.head_dim, with_scale=False)

                    self.k_proj = nn.Linear(config.hidden_size, self.head_dim)
                    self.v_proj = nn.Linear(config.hidden_size, self.head_dim) if not self.use_alternative_attention else None
                self.o_proj = nn.Linear(self.head_dim, config.hidden_size)

            def forward(self, hidden_states, past_key_values: Cache | None = None, shared_kv_states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
                if self.is_kv_shared_layer:
                    key_states, value_states = shared_kv_states[self.kv_shared_layer_index]
                else:
                    key_states, value_states = self.project(hidden_states)
                if past_key_values is not None and not self.is_kv_shared_layer:
                    key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
                if self.store_full_length_kv:
                    shared_kv_states[self.layer_idx] = key_states, value_states
                return attend(key_states, value_states)


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

                # Update `_keys_to_ignore_on_load_unexpected` to drop all k/v proj and norms for the shared layers
                self._keys_to_ignore_on_load_unexpected = []
                for i, layer in enumerate(self.layers):
                    if layer.self_attn.is_kv_shared_layer:
                        self._keys_to_ignore_on_load_unexpected.extend(
                            [f"layers.{i}.self_attn.{name}" for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
                        )

                # Initialize weights and apply final processing
                self.post_init()

            def forward(self, hidden_states, past_key_values=None, **kwargs):
                shared_kv_states = {}
                for i, decoder_layer in enumerate(self.layers):
                    hidden_states = decoder_layer(
                        hidden_states,
                        past_key_values=past_key_values,
                        shared_kv_states=shared_kv_states,
                        **kwargs,
                    )
                for i, layer in enumerate(self.other_layers):
                    hidden_states = layer(hidden_states, **kwargs)
                return hidden_states


        class Gemma4ForCausalLM(Gemma4PreTrainedModel, GenerationMixin):
            def __init__(self, config):
                super().__init__(config)
                self.model = Gemma4TextModel(config)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

                # Grab the ones from the child
                self._keys_to_ignore_on_load_unexpected = [
                    f"model.{name}" for name in self.model._keys_to_ignore_on_load_unexpected
                ]

                # Initialize weights and apply final processing
                self.post_init()
    '''
    FIXED = (
        '''
        class Gemma4TextAttention(nn.Module):
            def forward(self, hidden_states, shared_kv_states: dict, past_key_values=None, **kwargs):
                if self.is_kv_shared_layer:
                    key_states, value_states = shared_kv_states[self.kv_shared_layer_index]
                return key_states


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def forward(self, hidden_states, **kwargs):
                shared_kv_states = {}
                for i, decoder_layer in enumerate(self.layers):
                    hidden_states = decoder_layer(hidden_states, shared_kv_states, **kwargs)
        ''',
    )
    DRIFTED = (
        # the attention class was renamed
        BUGGY.replace("class Gemma4TextAttention(", "class Gemma4Attention("),
        # the shared K/V is stored some third way
        BUGGY.replace("past_key_values.shared_layers[self.layer_idx] = ", "past_key_values.share(self.layer_idx, ")
        .replace("value_states\n                return", "value_states)\n                return"),
        # the model no longer loops over `decoder_layer`
        BUGGY.replace("for i, decoder_layer in enumerate(self.layers):", "for i, block in enumerate(self.layers):")
        .replace("decoder_layer(\n", "block(\n"),
        # the attention builds its value norm under another name
        BUGGY.replace("self.v_norm = Gemma4RMSNorm(", "self.value_norm = Gemma4RMSNorm("),
        # the text model no longer initialises its weights with `self.post_init()`
        BUGGY.replace("self.post_init()", "self.init_weights()"),
    )

    @m.call_if_inside(IN_ATTENTION)
    @m.leave(READ_SHARED_IF_CACHED)
    def read_shared_without_cache(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        self.parts["read guard"] += 1
        return updated_node.with_changes(test=updated_node.test.left)

    @m.call_if_inside(READ_SHARED_IF_CACHED)
    @m.leave(SHARED_LAYERS_ENTRY)
    def read_from_shared_kv_states(self, original_node: cst.Subscript, updated_node: cst.Subscript) -> cst.Subscript:
        self.parts["read"] += 1
        return updated_node.with_changes(value=cst.Name("shared_kv_states"))

    @m.call_if_inside(IN_ATTENTION)
    @m.leave(STORE_SHARED_IN_CACHE)
    def store_in_shared_kv_states(self, original_node: cst.If, updated_node: cst.If) -> cst.FlattenSentinel:
        self.parts["store"] += 1
        update = self.module.code_for_node(updated_node.body.body[0].body.body[0]).strip()
        code = STORE_SHARED_TEMPLATE.format(update=update)
        statements = cst.parse_module(code, config=self.module.config_for_parsing).body
        first = statements[0].with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([first, *statements[1:]])


# ---- input-proj-dequant ---------------------------------------------------------------------------------------------

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


# ---- loss-accumulation ----------------------------------------------------------------------------------------------

IN_CONDITIONAL_GENERATION = m.ClassDef(name=m.Name("Gemma4ForConditionalGeneration"))
IN_INIT = m.FunctionDef(name=m.Name("__init__"))
IN_FORWARD = m.FunctionDef(name=m.Name("forward"))
ACCEPTS_LOSS_KWARGS = m.Name("accepts_loss_kwargs")
ACCEPTS_NO_LOSS_KWARGS = m.Assign(
    targets=[m.AssignTarget(ACCEPTS_LOSS_KWARGS | m.Attribute(value=SELF, attr=ACCEPTS_LOSS_KWARGS))],
    value=m.Name("False"),
)
SUPER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))))]
)
CROSS_ENTROPY = m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("CrossEntropyLoss")))
LABELS_GIVEN = m.Comparison(left=m.Name("labels"), comparisons=[m.ComparisonTarget(m.IsNot(), NONE)])
OWN_LOSS = m.If(test=LABELS_GIVEN)  # with `nn.CrossEntropyLoss()` somewhere in its body
LOSS_FUNCTION_CALL = m.Call(func=m.Attribute(value=SELF, attr=m.Name("loss_function")))
LOSS_FUNCTION = "loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **{kwargs})\n"
NO_LOSS_KWARGS = "self.accepts_loss_kwargs = False\n"


class LossAccumulationRule(Rule):
    """``Gemma4ForConditionalGeneration`` computes a per-batch mean loss that ignores ``num_items_in_batch``, yet
    does not say so (``accepts_loss_kwargs = False``): ``Trainer`` then neither divides the loss by the
    accumulation steps nor lets the model normalise it, and the loss and gradients grow with the steps.

    The fix is transformers 5.6.0's: the loss is ``self.loss_function(...)`` and ``accepts_loss_kwargs`` is
    ``False``. A class attribute cannot be installed into a live class, so the constructor sets it on each model,
    where ``Trainer`` (``hasattr(model, "accepts_loss_kwargs")``) reads it the same.
    """

    id = "loss-accumulation"
    marker = "class Gemma4ForConditionalGeneration"
    scope = IN_CONDITIONAL_GENERATION
    expected = "Gemma4ForConditionalGeneration.forward computing `nn.CrossEntropyLoss()` under `if labels is not None`"

    BUGGY = '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            base_model_prefix = "model"

            def __init__(self, config: Gemma4Config):
                super().__init__(config)
                self.model = Gemma4Model(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                logits = self.lm_head(self.model(input_ids, **kwargs).last_hidden_state)
                loss = None
                if labels is not None:
                    # Upcast to float
                    logits = logits.float()
                    loss_fct = nn.CrossEntropyLoss()
                    loss = loss_fct(logits[..., :-1, :].flatten(0, 1), labels[..., 1:].flatten())
                return loss, logits
    '''
    PATCHED = '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            base_model_prefix = "model"

            def __init__(self, config: Gemma4Config):
                super().__init__(config)
                self.accepts_loss_kwargs = False
                self.model = Gemma4Model(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                logits = self.lm_head(self.model(input_ids, **kwargs).last_hidden_state)
                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **kwargs)
                return loss, logits
    '''
    FIXED = (
        '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            accepts_loss_kwargs = False

            def __init__(self, config: Gemma4Config):
                super().__init__(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **kwargs)
        ''',
    )
    DRIFTED = (
        # the class was renamed
        BUGGY.replace("class Gemma4ForConditionalGeneration(", "class Gemma4ForMultimodalLM("),
        # the loss normalises some third way
        BUGGY.replace("loss_fct = nn.CrossEntropyLoss()", "loss_fct = nn.NLLLoss()"),
        # it says it takes no loss kwargs but keeps its own loss
        BUGGY.replace('base_model_prefix = "model"', "accepts_loss_kwargs = False"),
    )

    @m.visit(ACCEPTS_NO_LOSS_KWARGS)
    def note_no_loss_kwargs(self, node: cst.Assign) -> None:
        self.parts["declared"] += 1

    @m.call_if_inside(IN_FORWARD)
    @m.visit(LOSS_FUNCTION_CALL)
    def note_loss_function(self, node: cst.Call) -> None:
        self.parts["loss function"] += 1

    @m.leave(IN_FORWARD)
    def use_loss_function(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        own_losses = [
            node for node in updated_node.body.body if m.matches(node, OWN_LOSS) and m.findall(node, CROSS_ENTROPY)
        ]
        if not own_losses or self.parts["declared"]:
            return updated_node
        kwargs = updated_node.params.star_kwarg
        if len(own_losses) > 1 or kwargs is None:
            self.drift("forward must compute its own loss once and take `**kwargs`")
            return updated_node
        self.parts["own loss"] += 1
        self.rewrote()
        own = own_losses[0]
        code = LOSS_FUNCTION.format(kwargs=kwargs.name.value)
        loss = cst.parse_statement(code, config=self.module.config_for_parsing)
        return updated_node.deep_replace(own, own.with_changes(body=own.body.with_changes(body=[loss])))

    @m.leave(IN_CONDITIONAL_GENERATION)
    def declare_no_loss_kwargs(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        init = next((node for node in updated_node.body.body if m.matches(node, IN_INIT)), None)
        if not self.parts["own loss"]:
            return updated_node
        at = next((i for i, line in enumerate(init.body.body) if m.matches(line, SUPER_INIT)), None) if init else None
        if at is None:
            self.drift("Gemma4ForConditionalGeneration.__init__ must call `super().__init__(...)`")
            return updated_node
        self.rewrote()
        lines = list(init.body.body)
        lines.insert(at + 1, cst.parse_statement(NO_LOSS_KWARGS, config=self.module.config_for_parsing))
        return updated_node.deep_replace(init, init.with_deep_changes(init.body, body=lines))

    def check(self) -> None:
        if self.parts["declared"] and not self.parts["loss function"]:
            self.drift("`accepts_loss_kwargs = False` with a loss of its own")
        elif self.parts["declared"]:
            self.found_fixed()


# ---- fp16-vision-pooler ---------------------------------------------------------------------------------------------

IN_POOLER = m.ClassDef(name=m.Name("Gemma4VisionPooler"))
IN_VISION_MODEL = m.ClassDef(name=m.Name("Gemma4VisionModel"))
HIDDEN_STATES = m.Name("hidden_states")
ROOT_HIDDEN_SIZE = m.Attribute(value=SELF, attr=m.Name("root_hidden_size"))
SCALE_IN_PLACE = m.AugAssign(target=HIDDEN_STATES, operator=m.MultiplyAssign(), value=ROOT_HIDDEN_SIZE)
SCALE_IN_FLOAT32 = m.BinaryOperation(
    left=m.Call(func=m.Attribute(value=HIDDEN_STATES, attr=m.Name("float"))),
    operator=m.Multiply(),
    right=ROOT_HIDDEN_SIZE,
)
STD_BUFFER = m.Attribute(value=SELF, attr=m.Name("std_bias") | m.Name("std_scale"))
STANDARDIZE = m.If(
    test=m.Attribute(value=m.Attribute(value=SELF, attr=m.Name("config")), attr=m.Name("standardize")),
    body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(HIDDEN_STATES)])])]),
    orelse=None,
)
BACK_TO_WORKING_DTYPE = "hidden_states = hidden_states.to(inputs_embeds.dtype)\n"


class VisionPoolerFloat16Rule(Rule):
    """``Gemma4VisionPooler`` scales by ``sqrt(hidden_size)`` in place, in the working dtype: in float16 large
    activations overflow to inf, and the image features become NaN.

    The fix is transformers 5.10.1's: the pooler scales in float32 and returns float32,
    ``Gemma4VisionModel.forward`` standardizes in float32 (the bias subtraction cancels the large values) and casts
    back to the dtype of the patch embeddings.
    """

    id = "fp16-vision-pooler"
    marker = "hidden_states *= self.root_hidden_size"
    scope = IN_POOLER | IN_VISION_MODEL
    expected = "`hidden_states *= self.root_hidden_size` in Gemma4VisionPooler.forward"

    BUGGY = '''
        class Gemma4VisionPooler(nn.Module):
            def forward(self, hidden_states, padding_positions):
                hidden_states = hidden_states.masked_fill(padding_positions.unsqueeze(-1), 0.0)
                hidden_states *= self.root_hidden_size
                return hidden_states, padding_positions


        class Gemma4VisionModel(Gemma4PreTrainedModel):
            def forward(self, pixel_values, pixel_position_ids, **kwargs):
                inputs_embeds = self.patch_embedder(pixel_values, pixel_position_ids)
                hidden_states, pooler_mask = self.pooler(self.encoder(inputs_embeds))
                hidden_states = hidden_states[pooler_mask]

                if self.config.standardize:
                    hidden_states = (hidden_states - self.std_bias) * self.std_scale

                return BaseModelOutputWithPast(last_hidden_state=hidden_states)
    '''
    PATCHED = '''
        class Gemma4VisionPooler(nn.Module):
            def forward(self, hidden_states, padding_positions):
                hidden_states = hidden_states.masked_fill(padding_positions.unsqueeze(-1), 0.0)
                hidden_states = hidden_states.float() * self.root_hidden_size
                return hidden_states, padding_positions


        class Gemma4VisionModel(Gemma4PreTrainedModel):
            def forward(self, pixel_values, pixel_position_ids, **kwargs):
                inputs_embeds = self.patch_embedder(pixel_values, pixel_position_ids)
                hidden_states, pooler_mask = self.pooler(self.encoder(inputs_embeds))
                hidden_states = hidden_states[pooler_mask]

                if self.config.standardize:
                    hidden_states = (hidden_states - self.std_bias.float()) * self.std_scale.float()
                hidden_states = hidden_states.to(inputs_embeds.dtype)

                return BaseModelOutputWithPast(last_hidden_state=hidden_states)
    '''
    FIXED = (PATCHED,)
    DRIFTED = (
        # the pooler scales some third way
        BUGGY.replace("hidden_states *= self.root_hidden_size", "hidden_states = hidden_states * self.scale"),
        # the vision model no longer standardizes where the pooler's output arrives
        BUGGY.replace("if self.config.standardize:", "if self.standardize:"),
    )

    @m.call_if_inside(IN_POOLER)
    @m.leave(SCALE_IN_PLACE)
    def scale_in_float32(self, original_node: cst.AugAssign, updated_node: cst.AugAssign) -> cst.Assign:
        self.parts["scale"] += 1
        self.rewrote()
        return cst.Assign(
            targets=[cst.AssignTarget(updated_node.target)],
            value=cst.parse_expression("hidden_states.float() * self.root_hidden_size"),
        )

    @m.call_if_inside(IN_POOLER)
    @m.visit(SCALE_IN_FLOAT32)
    def note_float32_scale(self, node: cst.BinaryOperation) -> None:
        self.found_fixed()

    @m.call_if_inside(IN_VISION_MODEL)
    @m.leave(STANDARDIZE)
    def standardize_in_float32(self, original_node: cst.If, updated_node: cst.If):  # an If or a FlattenSentinel
        if not self.parts["scale"]:
            return updated_node
        self.parts["standardize"] += 1
        self.rewrote()
        in_float32 = m.replace(
            updated_node, STD_BUFFER, lambda node, _: cst.parse_expression(f"self.{node.attr.value}.float()")
        )
        cast = cst.parse_statement(BACK_TO_WORKING_DTYPE, config=self.module.config_for_parsing)
        return cst.FlattenSentinel([in_float32, cast])

    def check(self) -> None:
        if self.parts and set(self.parts) != {"scale", "standardize"}:
            self.drift("the pooler's scale and Gemma4VisionModel's `if self.config.standardize:` must both be found")

