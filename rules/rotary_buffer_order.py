"""rotary-buffer-order: rotary embeddings register one buffer per layer type in set order, which a hash seed decides."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import SELF, SET_OF_LAYER_TYPES, SORTED_LAYER_TYPES, sorted_call

ROTARY_CLASS = m.ClassDef(name=m.Name(m.MatchIfTrue(lambda name: name.endswith("RotaryEmbedding"))))
UNORDERED_LAYER_TYPES = SET_OF_LAYER_TYPES | m.Call(func=m.Name("list"), args=[m.Arg(SET_OF_LAYER_TYPES)])
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
