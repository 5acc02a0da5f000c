"""Rules for bugs that rotary embeddings of several model families share, bound to each file by the families."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

SELF = m.Name("self")
ROTARY_CLASS = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("RotaryEmbedding"))))
LAYER_TYPES = m.Attribute(attr=m.Name("layer_types"))
SET_OF_LAYER_TYPES = m.Call(func=m.Name("set"), args=[m.Arg(LAYER_TYPES)])
UNORDERED_LAYER_TYPES = SET_OF_LAYER_TYPES | m.Call(func=m.Name("list"), args=[m.Arg(SET_OF_LAYER_TYPES)])
SORTED_LAYER_TYPES = m.Call(func=m.Name("sorted"), args=[m.Arg(SET_OF_LAYER_TYPES | LAYER_TYPES)])
KEEP_LAYER_TYPES = m.Assign(targets=[m.AssignTarget(m.Attribute(value=SELF, attr=m.Name("layer_types")))])
BUFFER_CALL = m.Attribute(attr=m.Name("register_buffer")) | m.Name("setattr")
BUFFER_PER_LAYER_TYPE = m.Call(func=BUFFER_CALL, args=[m.ZeroOrMore(), m.Arg(m.FormattedString()), m.ZeroOrMore()])
BUFFER_OF_ITS_OWN = m.Call(
    func=m.Attribute(value=SELF, attr=m.Name("register_buffer")), args=[m.Arg(m.SimpleString()), m.ZeroOrMore()]
)


class RotaryBufferOrderRule(Rule):
    """Buffers registered while iterating ``set(config.layer_types)`` come in an order set by the hash seed.

    Two processes of one job can then hold ``sliding_attention_inv_freq`` and ``full_attention_inv_freq`` in
    different positions, and DDP's start-up broadcast, which sends buffers by position, swaps them on some ranks.
    The fix iterates the layer types sorted, as transformers 5.16.0 does. A rotary embedding that registers only
    buffers of its own name (one embedding per layer type, as in 4.x) has no order to lose.
    """

    id = "rotary-buffer-order"
    marker = "layer_types"
    scope = ROTARY_CLASS
    expected = "a RotaryEmbedding registering `{layer_type}_...` buffers while iterating `set(config.layer_types)`"

    BUGGY = '''
        class Gemma3RotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                super().__init__()
                self.layer_types = list(set(config.layer_types))
                for layer_type in self.layer_types:
                    inv_freq = compute(config, layer_type)
                    self.register_buffer(f"{layer_type}_inv_freq", inv_freq, persistent=False)


        class Gemma4TextRotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                self.layer_types = set(config.layer_types)
                for layer_type in self.layer_types:
                    setattr(self, f"{layer_type}_inv_freq", nn.Buffer(compute(config, layer_type), persistent=False))


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.unique_layer_types = set(self.config.layer_types)
    '''
    PATCHED = '''
        class Gemma3RotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                super().__init__()
                self.layer_types = sorted(set(config.layer_types))
                for layer_type in self.layer_types:
                    inv_freq = compute(config, layer_type)
                    self.register_buffer(f"{layer_type}_inv_freq", inv_freq, persistent=False)


        class Gemma4TextRotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                self.layer_types = sorted(set(config.layer_types))
                for layer_type in self.layer_types:
                    setattr(self, f"{layer_type}_inv_freq", nn.Buffer(compute(config, layer_type), persistent=False))


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.unique_layer_types = set(self.config.layer_types)
    '''
    FIXED = (
        '''
        class Gemma3RotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                self.layer_types = sorted(set(config.layer_types))
                for layer_type in self.layer_types:
                    setattr(self, f"{layer_type}_inv_freq", nn.Buffer(compute(config, layer_type), persistent=False))
        ''',
        '''
        class Gemma3nTextRotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                inv_freq, self.attention_scaling = self.rope_init_fn(self.config, device)
                self.register_buffer("inv_freq", inv_freq, persistent=False)
        ''',
    )
    DRIFTED = (
        '''
        class Gemma3RotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                for layer_type in config.unique_layer_types:
                    self.register_buffer(f"{layer_type}_inv_freq", compute(config, layer_type), persistent=False)
        ''',
        '''
        class Gemma3RotaryEmbedding(nn.Module):
            def __init__(self, config, device=None):
                self.layer_types = frozenset(config.layer_types)
                for layer_type in self.layer_types:
                    self.register_buffer(f"{layer_type}_inv_freq", compute(config, layer_type), persistent=False)
        ''',
    )

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.per_layer_type = self.ordered = self.own_buffers = False

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        if self.per_layer_type and not self.ordered:
            self.drift(f"{updated_node.name.value} names buffers per layer type, but not iterating `set(...)` or `sorted(...)`")
        elif self.own_buffers and not self.per_layer_type:
            self.found_fixed()
        return updated_node

    @m.leave(KEEP_LAYER_TYPES)
    def sort_layer_types(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        if m.matches(updated_node.value, SORTED_LAYER_TYPES):
            self.ordered = True
            self.found_fixed()
        elif m.matches(updated_node.value, UNORDERED_LAYER_TYPES):
            unordered = updated_node.value
            layer_types = unordered if m.matches(unordered, SET_OF_LAYER_TYPES) else unordered.args[0].value
            self.ordered = True
            self.rewrote()
            return updated_node.with_changes(value=sorted_call(layer_types))
        return updated_node

    @m.visit(BUFFER_PER_LAYER_TYPE)
    def note_buffer_per_layer_type(self, node: cst.Call) -> None:
        self.per_layer_type = True

    @m.visit(BUFFER_OF_ITS_OWN)
    def note_buffer_of_its_own(self, node: cst.Call) -> None:
        self.own_buffers = True


TEXT_MODEL_CLASS = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("TextModel"))))
CONFIG_LAYER_TYPES = m.Attribute(value=m.Attribute(attr=m.Name("config")), attr=m.Name("layer_types"))
LAYER_TYPE_LOOP = m.For(target=m.Name("layer_type"))
KEEP_ON_SELF = m.Assign(targets=[m.AssignTarget(m.Attribute(value=SELF))])
ROTARY_WITHOUT_LAYER_TYPE = m.Call(
    func=m.Attribute(value=SELF, attr=m.Name(m.MatchRegex(r"rotary_emb\w*"))), args=[m.Arg(), m.Arg()]
)


class RotaryComputeOrderRule(Rule):
    """Position embeddings computed per layer type while iterating ``set(config.layer_types)`` come in an order set
    by the hash seed.

    The numbers are right, but the forward's operations, and so the graph ``torch.compile`` traces, differ between
    processes: inductor's cache keys on the graph, so a process whose seed gives the other order misses the cache
    an earlier one filled and compiles again (and the ranks of one job compile different graphs). The fix iterates
    the layer types sorted. A model that calls one rotary embedding per layer type (4.x) or iterates
    ``config.layer_types`` itself (5.0 to 5.5) has a fixed order.
    """

    id = "rotary-compute-order"
    marker = "layer_types"
    scope = TEXT_MODEL_CLASS
    expected = "a TextModel computing position embeddings per layer type while iterating `set(config.layer_types)`"

    BUGGY = '''
        class Gemma3TextModel(Gemma3PreTrainedModel):
            def forward(self, input_ids, position_ids):
                position_embeddings = {}
                for layer_type in set(self.config.layer_types):
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.unique_layer_types = set(self.config.layer_types)

            def forward(self, input_ids, position_ids):
                for layer_type in self.unique_layer_types:
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
    '''
    PATCHED = '''
        class Gemma3TextModel(Gemma3PreTrainedModel):
            def forward(self, input_ids, position_ids):
                position_embeddings = {}
                for layer_type in sorted(set(self.config.layer_types)):
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)


        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.unique_layer_types = sorted(set(self.config.layer_types))

            def forward(self, input_ids, position_ids):
                for layer_type in self.unique_layer_types:
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
    '''
    FIXED = (
        '''
        class Gemma3TextModel(Gemma3PreTrainedModel):
            def forward(self, input_ids, position_ids):
                for layer_type in self.config.layer_types:
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
        ''',
        '''
        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids, position_ids):
                for layer_type in sorted(self.config.layer_types):
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
        ''',
        '''
        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids, position_ids):
                position_embeddings_global = self.rotary_emb(hidden_states_0, position_ids)
                position_embeddings_local = self.rotary_emb_local(hidden_states_0, position_ids)
        ''',
    )
    DRIFTED = (
        '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def __init__(self, config):
                self.unique_layer_types = frozenset(self.config.layer_types)

            def forward(self, input_ids, position_ids):
                for layer_type in self.unique_layer_types:
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
        ''',
        '''
        class Gemma3TextModel(Gemma3PreTrainedModel):
            def forward(self, input_ids, position_ids):
                for layer_type in {*self.config.layer_types}:
                    position_embeddings[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type)
        ''',
    )

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.ordered_attributes: set[str] = set()  # attributes of the instance holding layer types in a fixed order

    @m.leave(KEEP_ON_SELF)
    def sort_kept_layer_types(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        kept = updated_node.targets[0].target.attr.value
        if m.matches(updated_node.value, SORTED_LAYER_TYPES):
            self.ordered_attributes.add(kept)
            self.found_fixed()
        elif m.matches(updated_node.value, SET_OF_LAYER_TYPES):
            self.ordered_attributes.add(kept)
            self.rewrote()
            return updated_node.with_changes(value=sorted_call(updated_node.value))
        return updated_node

    @m.leave(LAYER_TYPE_LOOP)
    def sort_loop(self, original_node: cst.For, updated_node: cst.For) -> cst.For:
        layer_types = updated_node.iter
        if m.matches(layer_types, SET_OF_LAYER_TYPES):
            self.rewrote()
            return updated_node.with_changes(iter=sorted_call(layer_types))
        kept_in_order = m.Attribute(value=SELF, attr=m.Name(m.MatchIfTrue(self.ordered_attributes.__contains__)))
        if m.matches(layer_types, SORTED_LAYER_TYPES | CONFIG_LAYER_TYPES):
            self.found_fixed()
        elif not m.matches(layer_types, kept_in_order):
            self.drift(f"a loop over layer types iterates `{self.module.code_for_node(layer_types)}`")
        return updated_node

    @m.visit(ROTARY_WITHOUT_LAYER_TYPE)
    def note_rotary_without_layer_type(self, node: cst.Call) -> None:
        self.found_fixed()


def sorted_call(layer_types: cst.BaseExpression) -> cst.Call:
    return cst.Call(func=cst.Name("sorted"), args=[cst.Arg(layer_types)])
