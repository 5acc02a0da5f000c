"""The half of the KV-sharing fix that every model shares: the text model makes a ``shared_kv_states`` dict for
each forward call and hands it to every decoder layer, the attention takes it as a parameter, and KV-shared layers
build no K/V weights of their own; and the carrier of the shared K/V that FSDP2's mixed precision leaves alone."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

IN_ATTENTION = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextAttention"))))
IN_TEXT_MODEL = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextModel"))))
IN_FORWARD = m.FunctionDef(name=m.Name("forward"))
IN_INIT = m.FunctionDef(name=m.Name("__init__"))
SELF = m.Name("self")


def wrappers(prefix: str) -> m.ClassDef:
    """The models of a family that hold its text model: ``{prefix}ForCausalLM``, ``{prefix}Model`` and
    ``{prefix}ForConditionalGeneration``."""
    return m.ClassDef(name=m.OneOf(*(m.Name(f"{prefix}{kind}") for kind in ("ForCausalLM", "Model", "ForConditionalGeneration"))))

DECODER_LAYER_CALL = m.Call(func=m.Name("decoder_layer"))
DECODER_LAYER_LOOP = m.For(
    target=m.Name("decoder_layer") | m.Tuple(elements=[m.ZeroOrMore(), m.Element(m.Name("decoder_layer"))])
)
SHARED_KV_STATES_ARG = m.Arg(value=m.Name("shared_kv_states")) | m.Arg(keyword=m.Name("shared_kv_states"))
PASSES_SHARED_KV_STATES = m.Call(args=[m.ZeroOrMore(), SHARED_KV_STATES_ARG, m.ZeroOrMore()])
ATTENTION_PARTS = {"read guard", "read", "store", "parameter", "own weights"}
MODEL_PARTS = {"state", "argument", "ignore list"}
REPEATABLE_PARTS = {"ignore list passed up"}  # once per model that wraps the text model


def assigns_self(names: m.BaseMatcherNode) -> m.SimpleStatementLine:
    """``self.NAME = ...`` alone on a line, for a NAME that ``names`` matches."""
    return m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=SELF, attr=names))])])


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

    @m.call_if_inside(IN_ATTENTION)
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

    @m.call_if_inside(IN_ATTENTION)
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

    @m.call_if_not_inside(IN_ATTENTION)
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


# ---- kv-sharing-fsdp2 -----------------------------------------------------------------------------------------------

SHARED_KV_STATES = m.Name("shared_kv_states")
PLAIN_DICT = m.Dict(elements=[])
MAKES_PLAIN_DICT = PLAIN_DICT | m.Call(
    func=m.Attribute(value=m.Name("kwargs"), attr=m.Name("pop")),
    args=[m.Arg(m.SimpleString('"shared_kv_states"')), m.Arg(PLAIN_DICT)],
)
MAKES_CARRIER = m.Call(func=m.Name("UserDict") | m.Name("KVSharingDict"))
MAKES_SHARED_KV_STATES = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(SHARED_KV_STATES)])])
IMPORT_CARRIER = "from collections import UserDict\n"


class SharedKVCarrierRule(Rule):
    """FSDP2's mixed precision casts each sharded layer's inputs with ``torch.distributed.utils._apply_to_tensors``,
    which rebuilds every plain dict it meets: what a layer stores in ``shared_kv_states`` lands in a copy, and the
    KV-shared layers after it find nothing (``KeyError``).

    The fix is transformers 5.9.0's: the text model carries the shared K/V in a ``UserDict``, which that helper leaves
    alone (not a ``dict``). It applies as well to the plain dict that ``kv-sharing-without-cache`` inserts, which runs
    before it. The import is local to ``forward``: a patch changes definitions, never a module's imports.
    """

    id = "kv-sharing-fsdp2"
    marker = "shared_kv_states = "
    scope = IN_TEXT_MODEL
    expected = '`shared_kv_states = {}` or `kwargs.pop("shared_kv_states", {})` in the text model\'s forward'

    BUGGY = '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.shared_kv_states = {}

            def forward(self, hidden_states, **kwargs):
                # decoder layers
                shared_kv_states = kwargs.pop("shared_kv_states", {})
                for decoder_layer in self.layers:
                    hidden_states = decoder_layer(hidden_states, shared_kv_states=shared_kv_states)
                return hidden_states
    '''
    PATCHED = '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.shared_kv_states = {}

            def forward(self, hidden_states, **kwargs):
                # decoder layers
                from collections import UserDict
                shared_kv_states = kwargs.pop("shared_kv_states", UserDict())
                for decoder_layer in self.layers:
                    hidden_states = decoder_layer(hidden_states, shared_kv_states=shared_kv_states)
                return hidden_states
    '''
    EXAMPLES = (
        (
            '''
            class Gemma3nTextModel(Gemma3nPreTrainedModel):
                def forward(self, hidden_states, **kwargs):
                    shared_kv_states = {}
                    return hidden_states
            ''',
            '''
            class Gemma3nTextModel(Gemma3nPreTrainedModel):
                def forward(self, hidden_states, **kwargs):
                    from collections import UserDict
                    shared_kv_states = UserDict()
                    return hidden_states
            ''',
        ),
    )
    FIXED = (
        '''
        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, hidden_states, **kwargs):
                shared_kv_states = UserDict()
        ''',
        '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def forward(self, hidden_states, **kwargs):
                shared_kv_states = kwargs.pop("shared_kv_states", None)
                if not isinstance(shared_kv_states, KVSharingDict):
                    shared_kv_states = KVSharingDict(shared_kv_states)
        ''',
    )
    DRIFTED = (
        # the text model makes the carrier some third way
        BUGGY.replace('kwargs.pop("shared_kv_states", {})', "dict()"),
        # the text model was renamed
        BUGGY.replace("class Gemma4TextModel(", "class Gemma4LanguageModel("),
    )

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return m.matches(node, IN_FORWARD)

    @m.leave(MAKES_SHARED_KV_STATES)
    def carry_in_user_dict(self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine):
        value = updated_node.body[0].value
        if m.findall(value, MAKES_CARRIER):
            self.found_fixed()
            return updated_node
        if not m.matches(value, MAKES_PLAIN_DICT):
            self.parts["other"] += 1
            return updated_node
        self.rewrote()
        carrier = m.replace(updated_node, PLAIN_DICT, lambda *_: cst.parse_expression("UserDict()"))
        imports = cst.parse_statement(IMPORT_CARRIER, config=self.module.config_for_parsing)
        return cst.FlattenSentinel([imports.with_changes(leading_lines=updated_node.leading_lines), carrier.with_changes(leading_lines=())])

    def check(self) -> None:
        if self.parts["other"] and not (self.sites or self.has_fixed_shape):
            self.drift("`shared_kv_states` is made some other way")
