"""The half of the KV-sharing fix that every model shares: the text model makes a ``shared_kv_states`` dict for
each forward call and hands it to every decoder layer, and the attention takes it as a parameter."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

IN_ATTENTION = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextAttention"))))
IN_TEXT_MODEL = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextModel"))))
IN_FORWARD = m.FunctionDef(name=m.Name("forward"))
DECODER_LAYER_CALL = m.Call(func=m.Name("decoder_layer"))
DECODER_LAYER_LOOP = m.For(
    target=m.Name("decoder_layer") | m.Tuple(elements=[m.ZeroOrMore(), m.Element(m.Name("decoder_layer"))])
)
SHARED_KV_STATES_ARG = m.Arg(value=m.Name("shared_kv_states")) | m.Arg(keyword=m.Name("shared_kv_states"))
PASSES_SHARED_KV_STATES = m.Call(args=[m.ZeroOrMore(), SHARED_KV_STATES_ARG, m.ZeroOrMore()])
ATTENTION_PARTS = {"read guard", "read", "store", "parameter"}
MODEL_PARTS = {"state", "argument"}


class SharedKVStatesRule(Rule):
    """KV-shared layers find their K/V on the cache; without one (``use_cache=False``) they compute their own.

    A model's rule rewrites how its attention reads and stores the shared K/V (counting the parts ``read guard``,
    ``read`` and ``store`` in ``self.parts``) and says which key the dict has (``key_type``); this class adds the
    dict, passes it down and checks that every part was found exactly once. Only ``forward`` methods are visited.
    """

    id = "kv-sharing-without-cache"
    marker = "is_kv_shared_layer"

    def key_type(self) -> str | None:
        """The type of the dict's keys (``int``: layer index), or ``None`` while the shape is not known."""
        return "int"

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return m.matches(node, IN_FORWARD)

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

    def check(self) -> None:
        missing = sorted((ATTENTION_PARTS | MODEL_PARTS) - set(self.parts)) if self.parts else []
        repeated = sorted(part for part, count in self.parts.items() if count > 1)
        if missing:
            self.drift(f"only part of the shape was found; missing: {', '.join(missing)}")
        if repeated:
            self.drift(f"found more than once: {', '.join(repeated)}")
