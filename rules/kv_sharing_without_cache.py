"""kv-sharing-without-cache: KV-shared layers of Gemma-4 and Gemma-3n find the K/V they share on the cache, so
without one (``use_cache=False``, training) they compute their own.

The fix, as upstream's: the text model makes a ``shared_kv_states`` dict for each forward call and hands it to every
decoder layer, the attention reads and stores the shared K/V there, and KV-shared layers build no K/V weights of
their own. ``SharedKVStatesRule`` is that common half; each family's class rewrites how its attention reads and
stores the shared K/V.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import (
    IN_FORWARD,
    IN_INIT,
    IN_TEXT_ATTENTION,
    IN_TEXT_MODEL,
    IS_KV_SHARED_LAYER,
    SELF,
    assigns_self,
    is_not_none,
    wrappers,
)

DECODER_LAYER_CALL = m.Call(func=m.Name("decoder_layer"))
DECODER_LAYER_LOOP = m.For(
    target=m.Name("decoder_layer") | m.Tuple(elements=[m.ZeroOrMore(), m.Element(m.Name("decoder_layer"))])
)
SHARED_KV_STATES_ARG = m.Arg(value=m.Name("shared_kv_states")) | m.Arg(keyword=m.Name("shared_kv_states"))
PASSES_SHARED_KV_STATES = m.Call(args=[m.ZeroOrMore(), SHARED_KV_STATES_ARG, m.ZeroOrMore()])
ATTENTION_PARTS = {"read guard", "read", "store", "parameter", "own weights"}
MODEL_PARTS = {"state", "argument", "ignore list"}
REPEATABLE_PARTS = {"ignore list passed up"}  # once per model that wraps the text model

OWN_KV_WEIGHTS = ("k_proj", "v_proj", "k_norm", "v_norm")
BUILDS_OWN_KV_WEIGHT = assigns_self(m.Name(m.MatchIfTrue(lambda name: name in OWN_KV_WEIGHTS)))
SETS_IS_KV_SHARED_LAYER = assigns_self(m.Name("is_kv_shared_layer"))
SETS_INNER_MODEL = assigns_self(m.Name("model") | m.Name("language_model"))
POST_INIT = m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(value=SELF, attr=m.Name("post_init"))))])

# transformers 5.5.2's (Gemma-4) and 5.6.0's (Gemma-3n) own text, so that patched code reads as upstream's fix.
OWN_WEIGHTS_GUARD = "\n# Layers sharing kv states don't need any weight matrices\nif not self.is_kv_shared_layer:\n    pass\n"
IGNORE_SHARED_WEIGHTS = """
# Update `_keys_to_ignore_on_load_unexpected` to drop all k/v proj and norms for the shared layers
self._keys_to_ignore_on_load_unexpected = []
for i, layer in enumerate(self.layers):
    if layer.self_attn.is_kv_shared_layer:
        self._keys_to_ignore_on_load_unexpected.extend(
            [f"layers.{i}.self_attn.{name}" for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
        )
"""
PASS_UP_IGNORED = """
# Grab the ones from the child
self._keys_to_ignore_on_load_unexpected = [
    f"{inner}.{{name}}" for name in self.{inner}._keys_to_ignore_on_load_unexpected
]
"""


class SharedKVStatesRule(Rule):
    """KV-shared layers find their K/V on the cache; without one (``use_cache=False``) they compute their own.

    A model's rule rewrites how its attention reads and stores the shared K/V (counting the parts ``read guard``,
    ``read`` and ``store`` in ``self.parts``) and says which key the dict has (``key_type``); this class adds the
    dict and passes it down. Then, as upstream's fix does, it builds the K/V projections and norms of shared layers
    no more (nothing uses them: they would hold parameters without gradients, which DDP refuses) and lists their
    keys in ``_keys_to_ignore_on_load_unexpected``, of the text model and of each model wrapping it, so checkpoints
    that hold them load without a warning. It checks that every part was found exactly once. Only ``forward`` and
    ``__init__`` methods are visited.
    """

    id = "kv-sharing-without-cache"
    marker = "is_kv_shared_layer"

    def key_type(self) -> str | None:
        """The type of the dict's keys (``int``: layer index), or ``None`` while the shape is not known."""
        return "int"

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return m.matches(node, IN_FORWARD | IN_INIT)

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(IN_FORWARD)
    def take_shared_kv_states(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if any(param.name.value == "shared_kv_states" for param in updated_node.params.params):
            self.found_fixed()
            return updated_node
        key = self.key_type()
        if not self.parts.keys() & ATTENTION_PARTS or key is None:
            return updated_node
        self.parts["parameter"] += 1
        params = updated_node.params.params
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
    def make_shared_kv_states(self, original_node: cst.For, updated_node: cst.For) -> cst.For | cst.FlattenSentinel:
        if not self.parts["argument"]:
            return updated_node
        self.parts["state"] += 1
        self.rewrote()
        state = cst.parse_statement("shared_kv_states = {}\n", config=self.module.config_for_parsing)
        state = state.with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([state, updated_node.with_changes(leading_lines=())])

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(IN_INIT)
    def build_no_weights_when_shared(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        """``self.k_proj = ...`` and the other K/V weights move under ``if not self.is_kv_shared_layer:``, placed
        after the last of them and after ``self.is_kv_shared_layer`` is set."""
        body = list(updated_node.body.body)
        own = [statement for statement in body if m.matches(statement, BUILDS_OWN_KV_WEIGHT)]
        if not own:
            return updated_node
        names = sorted(statement.body[0].targets[0].target.attr.value for statement in own)
        sets_shared = [i for i, statement in enumerate(body) if m.matches(statement, SETS_IS_KV_SHARED_LAYER)]
        if names != sorted(OWN_KV_WEIGHTS) or len(sets_shared) != 1:
            self.drift(f"the attention's __init__ must set {', '.join(OWN_KV_WEIGHTS)} and is_kv_shared_layer once each")
            return updated_node
        self.parts["own weights"] += 1
        self.rewrote()
        (guard,) = self.statements(OWN_WEIGHTS_GUARD)
        weights = [own[0].with_changes(leading_lines=()), *own[1:]]
        guard = guard.with_changes(body=guard.body.with_changes(body=weights))
        anchor, moved = max(body.index(own[-1]), sets_shared[0]), set(map(id, own))
        lines = []
        for i, statement in enumerate(body):
            lines += ([] if id(statement) in moved else [statement]) + ([guard] if i == anchor else [])
        return updated_node.with_deep_changes(updated_node.body, body=lines)

    @m.call_if_inside(IN_TEXT_MODEL)
    @m.leave(IN_INIT)
    def ignore_shared_weights_on_load(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if not self.parts["own weights"]:
            return updated_node
        self.parts["ignore list"] += 1
        return self.before_post_init(updated_node, IGNORE_SHARED_WEIGHTS)

    @m.call_if_not_inside(IN_TEXT_ATTENTION)
    @m.call_if_not_inside(IN_TEXT_MODEL)
    @m.leave(IN_INIT)
    def pass_up_ignored_weights(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        """A model holding the text model as ``self.model`` or ``self.language_model`` ignores the same keys."""
        inner = [line for line in updated_node.body.body if m.matches(line, SETS_INNER_MODEL)]
        if not self.parts["own weights"] or not inner:
            return updated_node
        self.parts["ignore list passed up"] += 1
        name = inner[-1].body[0].targets[0].target.attr.value
        return self.before_post_init(updated_node, PASS_UP_IGNORED.format(inner=name))

    def before_post_init(self, init: cst.FunctionDef, code: str) -> cst.FunctionDef:
        """``init`` with the statements of ``code`` before its ``self.post_init()``."""
        body = list(init.body.body)
        at = next((i for i, statement in enumerate(body) if m.matches(statement, POST_INIT)), None)
        if at is None:
            self.drift("a model's __init__ that builds the text model must call `self.post_init()`")
            return init
        return init.with_deep_changes(init.body, body=[*body[:at], *self.statements(code), *body[at:]])

    def statements(self, code: str) -> list[cst.BaseStatement]:
        """The statements of ``code``, the comment lines above the first one kept with it."""
        module = cst.parse_module(code, config=self.module.config_for_parsing)
        first, *rest = module.body
        header = [line if line.comment else line.with_changes(indent=False) for line in module.header]
        return [first.with_changes(leading_lines=[*header, *first.leading_lines]), *rest]

    def check(self) -> None:
        missing = sorted((ATTENTION_PARTS | MODEL_PARTS) - set(self.parts)) if self.parts else []
        repeated = sorted(part for part, count in self.parts.items() if count > 1 and part not in REPEATABLE_PARTS)
        if missing:
            self.drift(f"only part of the shape was found; missing: {', '.join(missing)}")
        if repeated:
            self.drift(f"found more than once: {', '.join(repeated)}")


# ---- Gemma-4 ---------------------------------------------------------------------------------------------------------

PAST_KEY_VALUES = m.Name("past_key_values")
GEMMA4_CACHE_GIVEN = is_not_none(PAST_KEY_VALUES)
GEMMA4_SHARED_LAYERS_ENTRY = m.Subscript(value=m.Attribute(value=PAST_KEY_VALUES, attr=m.Name("shared_layers")))
GEMMA4_READ_SHARED_IF_CACHED = m.If(test=m.BooleanOperation(left=IS_KV_SHARED_LAYER, operator=m.And(), right=GEMMA4_CACHE_GIVEN))
GEMMA4_STORE_SHARED_IN_CACHE = m.If(
    test=GEMMA4_CACHE_GIVEN,
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
                        m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target=GEMMA4_SHARED_LAYERS_ENTRY)])]),
                    ]
                ),
                orelse=None,
            ),
        ]
    ),
    orelse=None,
)

STORE_SHARED_TEMPLATE = """\
if past_key_values is not None and not self.is_kv_shared_layer:
    {update}
if self.store_full_length_kv:
    shared_kv_states[self.layer_idx] = key_states, value_states
"""


class Gemma4KVSharingWithoutCacheRule(SharedKVStatesRule):
    """Gemma-4's KV-shared layers find their K/V on the cache; without one (``use_cache=False``) they recompute it.

    The fix hands the shared K/V from layer to layer in a dict made by ``Gemma4TextModel.forward`` for each call,
    as transformers 5.5.2 does, so a cache no longer decides what the shared layers attend to.
    """

    scope = IN_TEXT_ATTENTION | IN_TEXT_MODEL | wrappers("Gemma4")
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

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(GEMMA4_READ_SHARED_IF_CACHED)
    def read_shared_without_cache(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        self.parts["read guard"] += 1
        return updated_node.with_changes(test=updated_node.test.left)

    @m.call_if_inside(GEMMA4_READ_SHARED_IF_CACHED)
    @m.leave(GEMMA4_SHARED_LAYERS_ENTRY)
    def read_from_shared_kv_states(self, original_node: cst.Subscript, updated_node: cst.Subscript) -> cst.Subscript:
        self.parts["read"] += 1
        return updated_node.with_changes(value=cst.Name("shared_kv_states"))

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(GEMMA4_STORE_SHARED_IN_CACHE)
    def store_in_shared_kv_states(self, original_node: cst.If, updated_node: cst.If) -> cst.FlattenSentinel:
        self.parts["store"] += 1
        update = self.module.code_for_node(updated_node.body.body[0].body.body[0]).strip()
        code = STORE_SHARED_TEMPLATE.format(update=update)
        statements = cst.parse_module(code, config=self.module.config_for_parsing).body
        first = statements[0].with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([first, *statements[1:]])


# ---- Gemma-3n --------------------------------------------------------------------------------------------------------

CACHE = m.Name("past_key_value") | m.Name("past_key_values")  # renamed in 4.56.0
GEMMA3N_CACHE_GIVEN = is_not_none(CACHE)
KV_SHARED_LAYER_INDEX = m.Attribute(value=SELF, attr=m.Name("kv_shared_layer_index"))
GEMMA3N_READ_SHARED_IF_CACHED = m.If(
    test=m.BooleanOperation(
        left=IS_KV_SHARED_LAYER | m.BooleanOperation(left=IS_KV_SHARED_LAYER, operator=m.And()),
        operator=m.And(),
        right=GEMMA3N_CACHE_GIVEN,
    )
)
AT_SHARED_INDEX = [m.SubscriptElement(m.Index(KV_SHARED_LAYER_INDEX))]
# 4.56.0 to 5.5.4: the last non-shared layer of each type leaves its K/V in `cache.shared_layers`.
GEMMA3N_SHARED_LAYERS_ENTRY = m.Subscript(value=m.Attribute(value=CACHE, attr=m.Name("shared_layers")), slice=AT_SHARED_INDEX)
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
GEMMA3N_STORE_SHARED_IN_CACHE = m.If(
    test=GEMMA3N_CACHE_GIVEN,
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
    test=GEMMA3N_CACHE_GIVEN,
    body=m.IndentedBlock(body=[m.ZeroOrMore(m.SimpleStatementLine()), UPDATE_STATEMENT]),
    orelse=None,
)

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


class Gemma3nKVSharingWithoutCacheRule(SharedKVStatesRule):
    """Gemma-3n's KV-shared layers find their K/V on the cache; without one they compute their own: garbage.

    As transformers 5.6.0 does, ``Gemma3nTextModel.forward`` makes a ``shared_kv_states`` dict for each call and the
    attention reads and writes the shared K/V there, cache or not; shared layers no longer update the cache. Two
    shapes are known: 4.56.0 to 5.5.4 keep the shared K/V in ``cache.shared_layers`` (the patch keys the dict by
    layer index, as 5.6.0 does), 4.53.0 to 4.55.4 slice the cache of the layer shared from (the patch keys the dict
    by layer type, as 5.24.0 does: each non-shared layer overwrites its type's entry, so the shared layers read the
    last one before them and at most two entries are alive).
    """

    scope = IN_TEXT_ATTENTION | IN_TEXT_MODEL | wrappers("Gemma3n")
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

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(GEMMA3N_READ_SHARED_IF_CACHED)
    def read_shared_without_cache(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        self.parts["read guard"] += 1
        updated_node = updated_node.with_changes(test=updated_node.test.left)
        if m.findall(updated_node.body, GEMMA3N_SHARED_LAYERS_ENTRY):
            self.shapes.add(SHARED_LAYERS)
            self.parts["read"] += 1
            body = m.replace(updated_node.body, GEMMA3N_SHARED_LAYERS_ENTRY, in_shared_kv_states)
            return updated_node.with_changes(body=body)
        if m.findall(updated_node.body, CACHE_SLOT):
            self.shapes.add(CACHE_SLOTS)
            self.parts["read"] += 1
            read = cst.parse_module(READ_BY_TYPE, config=self.module.config_for_parsing).body
            return updated_node.with_deep_changes(updated_node.body, body=read)
        return updated_node

    @m.call_if_inside(IN_TEXT_ATTENTION)
    @m.leave(GEMMA3N_STORE_SHARED_IN_CACHE | UPDATE_CACHE)
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

