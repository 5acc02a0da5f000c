"""Rules that fix Gemma-3n in transformers 4.53.0 to 5.5.4."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rules.kv_sharing import SharedKVStatesRule, wrappers

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
IN_ATTENTION = m.ClassDef(name=m.Name("Gemma3nTextAttention"))
IN_TEXT_MODEL = m.ClassDef(name=m.Name("Gemma3nTextModel"))

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


def in_shared_kv_states(entry: cst.Subscript, _) -> cst.Subscript:
    """``past_key_values.shared_layers[i]`` -> ``shared_kv_states[i]``."""
    return entry.with_changes(value=cst.Name("shared_kv_states"))


class KVSharingWithoutCacheRule(SharedKVStatesRule):
    """Gemma-3n's KV-shared layers find their K/V on the cache; without one they compute their own: garbage.

    As transformers 5.6.0 does, ``Gemma3nTextModel.forward`` makes a ``shared_kv_states`` dict for each call and the
    attention reads and writes the shared K/V there, cache or not; shared layers no longer update the cache. Two
    shapes are known: 4.56.0 to 5.5.4 keep the shared K/V in ``cache.shared_layers`` (the patch keys the dict by
    layer index, as 5.6.0 does), 4.53.0 to 4.55.4 slice the cache of the layer shared from (the patch keys the dict
    by layer type, as 5.24.0 does: each non-shared layer overwrites its type's entry, so the shared layers read the
    last one before them and at most two entries are alive).
    """

    scope = IN_ATTENTION | IN_TEXT_MODEL | wrappers("Gemma3n")
    expected = (
        "Gemma3nTextAttention.forward reading the shared K/V from `past_key_values.shared_layers[...]` or from a "
        "cache slot only when a cache is given"
    )

    BUGGY = '''
        class Gemma3nTextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.q_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.k_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.v_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.o_proj = nn.Linear(config.head_dim, config.hidden_size)

                self.q_norm = Gemma3nRMSNorm(dim=config.head_dim)
                self.k_norm = Gemma3nRMSNorm(dim=config.head_dim)
                self.v_norm = Gemma3nRMSNorm(dim=config.head_dim, with_scale=False)

                first_kv_shared_layer_idx = self.config.num_hidden_layers - self.config.num_kv_shared_layers
                self.is_kv_shared_layer = layer_idx >= first_kv_shared_layer_idx
                self.kv_shared_layer_index = first_kv_shared_layer_idx - 1 if self.is_kv_shared_layer else None

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
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma3nTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
                self.post_init()

            def forward(self, hidden_states, past_key_values=None, **kwargs):
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    hidden_states = decoder_layer(
                        hidden_states,
                        past_key_values=past_key_values,
                        **kwargs,
                    )
                return hidden_states


        class Gemma3nModel(Gemma3nPreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                language_model = AutoModel.from_config(config=config.text_config)
                self.language_model = language_model
                self.post_init()

            def set_decoder(self, decoder):
                self.language_model = decoder
    '''
    PATCHED = '''
        class Gemma3nTextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.q_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.o_proj = nn.Linear(config.head_dim, config.hidden_size)

                self.q_norm = Gemma3nRMSNorm(dim=config.head_dim)

                first_kv_shared_layer_idx = self.config.num_hidden_layers - self.config.num_kv_shared_layers
                self.is_kv_shared_layer = layer_idx >= first_kv_shared_layer_idx

                # Layers sharing kv states don't need any weight matrices
                if not self.is_kv_shared_layer:
                    self.k_proj = nn.Linear(config.hidden_size, config.head_dim)
                    self.v_proj = nn.Linear(config.hidden_size, config.head_dim)
                    self.k_norm = Gemma3nRMSNorm(dim=config.head_dim)
                    self.v_norm = Gemma3nRMSNorm(dim=config.head_dim, with_scale=False)
                self.kv_shared_layer_index = first_kv_shared_layer_idx - 1 if self.is_kv_shared_layer else None

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
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma3nTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

                # Update `_keys_to_ignore_on_load_unexpected` to drop all k/v proj and norms for the shared layers
                self._keys_to_ignore_on_load_unexpected = []
                for i, layer in enumerate(self.layers):
                    if layer.self_attn.is_kv_shared_layer:
                        self._keys_to_ignore_on_load_unexpected.extend(
                            [f"layers.{i}.self_attn.{name}" for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
                        )
                self.post_init()

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


        class Gemma3nModel(Gemma3nPreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                language_model = AutoModel.from_config(config=config.text_config)
                self.language_model = language_model

                # Grab the ones from the child
                self._keys_to_ignore_on_load_unexpected = [
                    f"language_model.{name}" for name in self.language_model._keys_to_ignore_on_load_unexpected
                ]
                self.post_init()

            def set_decoder(self, decoder):
                self.language_model = decoder
    '''
    # The shape of 4.53.0 to 4.55.4, which ``BUGGY`` cannot hold next to the other.
    BUGGY_SLICING = '''
        class Gemma3nTextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.q_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.k_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.v_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.o_proj = nn.Linear(config.head_dim, config.hidden_size)

                self.q_norm = Gemma3nRMSNorm(dim=config.head_dim)
                self.k_norm = Gemma3nRMSNorm(dim=config.head_dim)
                self.v_norm = Gemma3nRMSNorm(dim=config.head_dim, with_scale=False)

                first_kv_shared_layer_idx = self.config.num_hidden_layers - self.config.num_kv_shared_layers
                self.is_kv_shared_layer = layer_idx >= first_kv_shared_layer_idx
                self.kv_shared_layer_index = first_kv_shared_layer_idx - 1 if self.is_kv_shared_layer else None

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
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma3nTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
                self.post_init()

            def forward(self, hidden_states, past_key_values=None, **flash_attn_kwargs):
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    layer_outputs = decoder_layer(hidden_states, past_key_value=past_key_values, **flash_attn_kwargs)
                    hidden_states = layer_outputs[0]
                return hidden_states


        class Gemma3nModel(Gemma3nPreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                language_model = AutoModel.from_config(config=config.text_config)
                self.language_model = language_model
                self.post_init()

            def set_decoder(self, decoder):
                self.language_model = decoder
    '''
    PATCHED_SLICING = '''
        class Gemma3nTextAttention(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.q_proj = nn.Linear(config.hidden_size, config.head_dim)
                self.o_proj = nn.Linear(config.head_dim, config.hidden_size)

                self.q_norm = Gemma3nRMSNorm(dim=config.head_dim)

                first_kv_shared_layer_idx = self.config.num_hidden_layers - self.config.num_kv_shared_layers
                self.is_kv_shared_layer = layer_idx >= first_kv_shared_layer_idx

                # Layers sharing kv states don't need any weight matrices
                if not self.is_kv_shared_layer:
                    self.k_proj = nn.Linear(config.hidden_size, config.head_dim)
                    self.v_proj = nn.Linear(config.hidden_size, config.head_dim)
                    self.k_norm = Gemma3nRMSNorm(dim=config.head_dim)
                    self.v_norm = Gemma3nRMSNorm(dim=config.head_dim, with_scale=False)
                self.kv_shared_layer_index = first_kv_shared_layer_idx - 1 if self.is_kv_shared_layer else None

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
            def __init__(self, config):
                super().__init__(config)
                self.layers = nn.ModuleList([Gemma3nTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

                # Update `_keys_to_ignore_on_load_unexpected` to drop all k/v proj and norms for the shared layers
                self._keys_to_ignore_on_load_unexpected = []
                for i, layer in enumerate(self.layers):
                    if layer.self_attn.is_kv_shared_layer:
                        self._keys_to_ignore_on_load_unexpected.extend(
                            [f"layers.{i}.self_attn.{name}" for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
                        )
                self.post_init()

            def forward(self, hidden_states, past_key_values=None, **flash_attn_kwargs):
                shared_kv_states = {}
                for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                    layer_outputs = decoder_layer(hidden_states, past_key_value=past_key_values, shared_kv_states=shared_kv_states, **flash_attn_kwargs)
                    hidden_states = layer_outputs[0]
                return hidden_states


        class Gemma3nModel(Gemma3nPreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                language_model = AutoModel.from_config(config=config.text_config)
                self.language_model = language_model

                # Grab the ones from the child
                self._keys_to_ignore_on_load_unexpected = [
                    f"language_model.{name}" for name in self.language_model._keys_to_ignore_on_load_unexpected
                ]
                self.post_init()

            def set_decoder(self, decoder):
                self.language_model = decoder
    '''
    EXAMPLES = ((BUGGY_SLICING, PATCHED_SLICING),)
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
        # the attention builds its value norm under another name
        BUGGY.replace("self.v_norm = Gemma3nRMSNorm(", "self.value_norm = Gemma3nRMSNorm("),
        # the wrapping model no longer initialises its weights with `self.post_init()`
        BUGGY.replace("self.post_init()\n\n            def set_decoder", "self.init_weights()\n\n            def set_decoder"),
    )

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[str] = set()

    def key_type(self) -> str | None:
        return KEY_TYPE[next(iter(self.shapes))] if len(self.shapes) == 1 else None

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
    def store_in_shared_kv_states(self, original_node: cst.If, updated_node: cst.If) -> cst.FlattenSentinel:
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

    def check(self) -> None:
        super().check()
        if len(self.shapes) > 1:
            self.drift("the shared K/V is read from a cache slot but stored in `shared_layers`, or the other way round")

