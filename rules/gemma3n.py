"""Rules that fix Gemma-3n in transformers 4.53.0 to 5.5.4."""

from __future__ import annotations

from collections import Counter

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

SELF = m.Name("self")
NONE = m.Name("None")

# ---- kv-sharing-without-cache ---------------------------------------------------------------------------------------

CACHE = m.Name("past_key_value") | m.Name("past_key_values")  # renamed in 4.56.0
CACHE_GIVEN = m.Comparison(left=CACHE, comparisons=[m.ComparisonTarget(m.IsNot(), NONE)])
IS_KV_SHARED_LAYER = m.Attribute(value=SELF, attr=m.Name("is_kv_shared_layer"))
KV_SHARED_LAYER_INDEX = m.Attribute(value=SELF, attr=m.Name("kv_shared_layer_index"))
READ_SHARED_IF_CACHED = m.If(
    test=m.BooleanOperation(
        left=IS_KV_SHARED_LAYER | m.BooleanOperation(left=IS_KV_SHARED_LAYER, operator=m.And()),
        operator=m.And(),
        right=CACHE_GIVEN,
    )
)
AT_SHARED_INDEX = [m.SubscriptElement(m.Index(KV_SHARED_LAYER_INDEX))]
# 4.56.0 to 5.5.4: the last non-shared layer of each type leaves its K/V in `cache.shared_layers`.
SHARED_LAYERS_ENTRY = m.Subscript(value=m.Attribute(value=CACHE, attr=m.Name("shared_layers")), slice=AT_SHARED_INDEX)
# 4.53.0 to 4.55.4: shared layers slice that layer's cache, `key_cache[i]` (4.53) or `layers[i]` (4.54, 4.55).
CACHE_SLOT = m.Subscript(
    value=m.Attribute(value=CACHE, attr=m.Name("key_cache") | m.Name("value_cache") | m.Name("layers")),
    slice=AT_SHARED_INDEX,
)
UPDATE_STATEMENT = m.SimpleStatementLine(
    body=[m.Assign(value=m.Call(func=m.Attribute(value=CACHE, attr=m.Name("update"))))]
)
SHARED_LAYERS_STORE = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Subscript(value=m.Attribute(value=CACHE, attr=m.Name("shared_layers"))))])]
)
# 4.56.0 to 5.5.4: `if cache is not None:` updates the cache unless shared, then stores the shared K/V on it.
STORE_SHARED_IN_CACHE = m.If(
    test=CACHE_GIVEN,
    body=m.IndentedBlock(
        body=[
            m.ZeroOrMore(m.SimpleStatementLine()),  # `cache_kwargs = {...}` before 5.4.0
            m.If(
                test=m.UnaryOperation(operator=m.Not(), expression=IS_KV_SHARED_LAYER),
                body=m.IndentedBlock(body=[UPDATE_STATEMENT]),
                orelse=None,
            ),
            m.If(
                test=m.Attribute(value=SELF, attr=m.Name("store_full_length_kv")),
                body=m.IndentedBlock(body=[m.ZeroOrMore(), SHARED_LAYERS_STORE]),
                orelse=None,
            ),
        ]
    ),
    orelse=None,
)
# 4.53.0 to 4.55.4: `if cache is not None:` updates the cache, shared layers included.
UPDATE_CACHE = m.If(
    test=CACHE_GIVEN,
    body=m.IndentedBlock(body=[m.ZeroOrMore(m.SimpleStatementLine()), UPDATE_STATEMENT]),
    orelse=None,
)
DECODER_LAYER_CALL = m.Call(func=m.Name("decoder_layer"))
DECODER_LAYER_LOOP = m.For(
    target=m.Name("decoder_layer") | m.Tuple(elements=[m.ZeroOrMore(), m.Element(m.Name("decoder_layer"))])
)
SHARED_KV_STATES_ARG = m.Arg(value=m.Name("shared_kv_states")) | m.Arg(keyword=m.Name("shared_kv_states"))
PASSES_SHARED_KV_STATES = m.Call(args=[m.ZeroOrMore(), SHARED_KV_STATES_ARG, m.ZeroOrMore()])
IN_ATTENTION = m.ClassDef(name=m.Name("Gemma3nTextAttention"))
IN_TEXT_MODEL = m.ClassDef(name=m.Name("Gemma3nTextModel"))
IN_FORWARD = m.FunctionDef(name=m.Name("forward"))

# What the shared layers read, and what stores it, in each shape.
SHARED_LAYERS, CACHE_SLOTS = "shared_layers", "cache slots"
READ_BY_TYPE = """\
key_states, value_states = shared_kv_states[self.config.layer_types[self.layer_idx]]
# Device of past layer may be different from current one
key_states = key_states.to(query_states.device)
value_states = value_states.to(query_states.device)
"""
STORE = {
    SHARED_LAYERS: "if self.store_full_length_kv:\n    shared_kv_states[self.layer_idx] = key_states, value_states\n",
    CACHE_SLOTS: (
        "if not self.is_kv_shared_layer:\n"
        "    shared_kv_states[self.config.layer_types[self.layer_idx]] = key_states, value_states\n"
    ),
}
KEY_TYPE = {SHARED_LAYERS: "int", CACHE_SLOTS: "str"}
ATTENTION_PARTS = {"read guard", "read", "store", "parameter"}
MODEL_PARTS = {"state", "argument"}


def in_shared_kv_states(entry: cst.Subscript, _) -> cst.Subscript:
    """``past_key_values.shared_layers[i]`` -> ``shared_kv_states[i]``."""
    return entry.with_changes(value=cst.Name("shared_kv_states"))


class KVSharingWithoutCacheRule(Rule):
    """Gemma-3n's KV-shared layers find their K/V on the cache; without one they compute their own: garbage.

    As transformers 5.6.0 does, ``Gemma3nTextModel.forward`` makes a ``shared_kv_states`` dict for each call and the
    attention reads and writes the shared K/V there, cache or not; shared layers no longer update the cache. Two
    shapes are known: 4.56.0 to 5.5.4 keep the shared K/V in ``cache.shared_layers`` (the patch keys the dict by
    layer index, as 5.6.0 does), 4.53.0 to 4.55.4 slice the cache of the layer shared from (the patch keys the dict
    by layer type, as 5.24.0 does: each non-shared layer overwrites its type's entry, so the shared layers read the
    last one before them and at most two entries are alive).
    """

    id = "kv-sharing-without-cache"
    marker = "is_kv_shared_layer"
    scope = IN_ATTENTION | IN_TEXT_MODEL
    expected = (
        "Gemma3nTextAttention.forward reading the shared K/V from `past_key_values.shared_layers[...]` or from a "
        "cache slot only when a cache is given"
    )

    BUGGY = '''
        class Gemma3nTextAttention(nn.Module):
            def forward(self, hidden_states, past_key_values: Optional[Cache] = None, **kwargs):
                if self.is_kv_shared_layer and past_key_values is not None:
                    key_states, value_states = past_key_values.shared_layers[self.kv_shared_layer_index]
                else:
                    key_states, value_states = self.project(hidden_states)
                if past_key_values is not None:
                    cache_kwargs = {"sliding_window": self.sliding_window}
                    if not self.is_kv_shared_layer:
                        key_states, value_states = past_key_values.update(
                            key_states, value_states, self.layer_idx, cache_kwargs
                        )
                    if self.store_full_length_kv:
                        if not hasattr(past_key_values, "shared_layers"):
                            past_key_values.shared_layers = {}
                        past_key_values.shared_layers[self.layer_idx] = key_states, value_states
                return attend(key_states, value_states)


        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, past_key_values=None, **kwargs):
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    hidden_states = decoder_layer(
                        hidden_states,
                        past_key_values=past_key_values,
                        **kwargs,
                    )
                return hidden_states
    '''
    PATCHED = '''
        class Gemma3nTextAttention(nn.Module):
            def forward(self, hidden_states, past_key_values: Optional[Cache] = None, shared_kv_states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
                if self.is_kv_shared_layer:
                    key_states, value_states = shared_kv_states[self.kv_shared_layer_index]
                else:
                    key_states, value_states = self.project(hidden_states)
                if past_key_values is not None and not self.is_kv_shared_layer:
                    cache_kwargs = {"sliding_window": self.sliding_window}
                    key_states, value_states = past_key_values.update(
                        key_states, value_states, self.layer_idx, cache_kwargs
                    )
                if self.store_full_length_kv:
                    shared_kv_states[self.layer_idx] = key_states, value_states
                return attend(key_states, value_states)


        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, past_key_values=None, **kwargs):
                shared_kv_states = {}
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    hidden_states = decoder_layer(
                        hidden_states,
                        past_key_values=past_key_values,
                        shared_kv_states=shared_kv_states,
                        **kwargs,
                    )
                return hidden_states
    '''
    # The shape of 4.53.0 to 4.55.4, which ``BUGGY`` cannot hold next to the other.
    BUGGY_SLICING = '''
        class Gemma3nTextAttention(nn.Module):
            def forward(self, hidden_states, past_key_value: Optional[Cache] = None, cache_position=None, **kwargs):
                if self.is_kv_shared_layer and self.kv_shared_layer_index is not None and past_key_value is not None:
                    layer = past_key_value.layers[self.kv_shared_layer_index]
                    indices = cache_position.to(layer.keys.device)
                    key_states = layer.keys[:, :, indices].to(query_states.device)
                    value_states = layer.values[:, :, indices].to(query_states.device)
                else:
                    key_states, value_states = self.project(hidden_states)

                if past_key_value is not None:
                    cache_kwargs = {"cache_position": cache_position}
                    key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)
                return attend(key_states, value_states)


        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, past_key_values=None, **flash_attn_kwargs):
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    layer_outputs = decoder_layer(hidden_states, past_key_value=past_key_values, **flash_attn_kwargs)
                    hidden_states = layer_outputs[0]
                return hidden_states
    '''
    PATCHED_SLICING = '''
        class Gemma3nTextAttention(nn.Module):
            def forward(self, hidden_states, past_key_value: Optional[Cache] = None, cache_position=None, shared_kv_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
                if self.is_kv_shared_layer and self.kv_shared_layer_index is not None:
                    key_states, value_states = shared_kv_states[self.config.layer_types[self.layer_idx]]
                    # Device of past layer may be different from current one
                    key_states = key_states.to(query_states.device)
                    value_states = value_states.to(query_states.device)
                else:
                    key_states, value_states = self.project(hidden_states)

                if past_key_value is not None and not self.is_kv_shared_layer:
                    cache_kwargs = {"cache_position": cache_position}
                    key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)
                if not self.is_kv_shared_layer:
                    shared_kv_states[self.config.layer_types[self.layer_idx]] = key_states, value_states
                return attend(key_states, value_states)


        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, past_key_values=None, **flash_attn_kwargs):
                shared_kv_states = {}
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    layer_outputs = decoder_layer(hidden_states, past_key_value=past_key_values, shared_kv_states=shared_kv_states, **flash_attn_kwargs)
                    hidden_states = layer_outputs[0]
                return hidden_states
    '''
    FIXED = (
        '''
        class Gemma3nTextAttention(nn.Module):
            def forward(self, hidden_states, past_key_values=None, shared_kv_states: dict | None = None, **kwargs):
                if self.is_kv_shared_layer:
                    key_states, value_states = shared_kv_states[self.kv_shared_layer_index]
                if past_key_values is not None and not self.is_kv_shared_layer:
                    key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
                return key_states


        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, **kwargs):
                shared_kv_states = {}
                for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
                    hidden_states = decoder_layer(hidden_states, shared_kv_states=shared_kv_states, **kwargs)
        ''',
    )
    DRIFTED = (
        # the attention class was renamed
        BUGGY.replace("class Gemma3nTextAttention(", "class Gemma3nAttention("),
        # the shared K/V is stored some third way
        BUGGY.replace("past_key_values.shared_layers[self.layer_idx] = ", "past_key_values.share(self.layer_idx, ")
        .replace("value_states\n                return", "value_states)\n                return"),
        # the shared layers read a cache slot, but the cache is updated in a shape of the later releases
        BUGGY.replace("shared_layers[self.kv_shared_layer_index]", "layers[self.kv_shared_layer_index]"),
        # the model no longer loops over `decoder_layer`
        BUGGY.replace("for decoder_layer in", "for block in").replace("decoder_layer(\n", "block(\n"),
    )

    def __init__(self) -> None:
        super().__init__()
        self.parts: Counter[str] = Counter()
        self.shapes: set[str] = set()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return m.matches(node, IN_FORWARD)

    @m.call_if_inside(IN_ATTENTION)
    @m.leave(READ_SHARED_IF_CACHED)
    def read_shared_without_cache(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        self.parts["read guard"] += 1
        updated_node = updated_node.with_changes(test=updated_node.test.left)
        if m.findall(updated_node.body, SHARED_LAYERS_ENTRY):
            self.shapes.add(SHARED_LAYERS)
            self.parts["read"] += 1
            body = m.replace(updated_node.body, SHARED_LAYERS_ENTRY, in_shared_kv_states)
            return updated_node.with_changes(body=body)
        if m.findall(updated_node.body, CACHE_SLOT):
            self.shapes.add(CACHE_SLOTS)
            self.parts["read"] += 1
            read = cst.parse_module(READ_BY_TYPE, config=self.module.config_for_parsing).body
            return updated_node.with_deep_changes(updated_node.body, body=read)
        return updated_node

    @m.call_if_inside(IN_ATTENTION)
    @m.leave(STORE_SHARED_IN_CACHE | UPDATE_CACHE)
    def store_in_shared_kv_states(self, original_node: cst.If, updated_node: cst.If):  # a FlattenSentinel (unchecked)
        """``if cache is not None and not self.is_kv_shared_layer:`` the update, then the store, cache or not."""
        self.parts["store"] += 1
        *before, last = updated_node.body.body
        if m.matches(last, UPDATE_STATEMENT):
            self.shapes.add(CACHE_SLOTS)
            store, update = STORE[CACHE_SLOTS], [last]
        else:
            self.shapes.add(SHARED_LAYERS)
            store, update = STORE[SHARED_LAYERS], before.pop().body.body
        not_shared = cst.parse_expression("not self.is_kv_shared_layer")
        cached = updated_node.with_changes(
            test=cst.BooleanOperation(left=updated_node.test, operator=cst.And(), right=not_shared),
            body=updated_node.body.with_changes(body=[*before, *update]),
        )
        return cst.FlattenSentinel([cached, cst.parse_statement(store, config=self.module.config_for_parsing)])

    @m.call_if_inside(IN_ATTENTION)
    @m.leave(IN_FORWARD)
    def take_shared_kv_states(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if any(param.name.value == "shared_kv_states" for param in updated_node.params.params):
            self.found_fixed()
            return updated_node
        if not self.parts.keys() & ATTENTION_PARTS or len(self.shapes) != 1:
            return updated_node
        self.parts["parameter"] += 1
        params = updated_node.params.params
        key = KEY_TYPE[next(iter(self.shapes))]
        annotation = f"dict[{key}, tuple[torch.Tensor, torch.Tensor]] | None"
        new = cst.parse_statement(f"def f(shared_kv_states: {annotation} = None): pass").params.params[0]
        new = new.with_changes(comma=params[-1].comma if updated_node.params.star_kwarg else cst.MaybeSentinel.DEFAULT)
        if self.parts.keys() >= ATTENTION_PARTS:
            self.rewrote()
        return updated_node.with_deep_changes(updated_node.params, params=[*params, new])

    @m.call_if_inside(IN_TEXT_MODEL)
    @m.leave(DECODER_LAYER_CALL)
    def pass_shared_kv_states(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        if m.matches(updated_node, PASSES_SHARED_KV_STATES):
            self.found_fixed()
            return updated_node
        self.parts["argument"] += 1
        args = list(updated_node.args)
        at = next((i for i, arg in enumerate(args) if arg.star), len(args))
        argument = cst.Arg(
            value=cst.Name("shared_kv_states"),
            keyword=cst.Name("shared_kv_states"),
            equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")),
            comma=args[at - 1].comma,
        )
        return updated_node.with_changes(args=[*args[:at], argument, *args[at:]])

    @m.call_if_inside(IN_TEXT_MODEL)
    @m.leave(DECODER_LAYER_LOOP)
    def make_shared_kv_states(self, original_node: cst.For, updated_node: cst.For):  # a FlattenSentinel (unchecked)
        if not self.parts["argument"]:
            return updated_node
        self.parts["state"] += 1
        self.rewrote()
        state = cst.parse_statement("shared_kv_states = {}\n", config=self.module.config_for_parsing)
        state = state.with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([state, updated_node.with_changes(leading_lines=())])

    def check(self) -> None:
        missing = sorted((ATTENTION_PARTS | MODEL_PARTS) - set(self.parts)) if self.parts else []
        repeated = sorted(part for part, count in self.parts.items() if count > 1)
        if missing:
            self.drift(f"only part of the shape was found; missing: {', '.join(missing)}")
        if repeated:
            self.drift(f"found more than once: {', '.join(repeated)}")
        if len(self.shapes) > 1:
            self.drift("the shared K/V is read from a cache slot but stored in `shared_layers`, or the other way round")

