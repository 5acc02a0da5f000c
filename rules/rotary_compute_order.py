"""rotary-compute-order: the text model computes the rotary embeddings of each layer type in set order."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_TEXT_MODEL, SELF, SET_OF_LAYER_TYPES, SORTED_LAYER_TYPES, sorted_call

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
    scope = IN_TEXT_MODEL
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
