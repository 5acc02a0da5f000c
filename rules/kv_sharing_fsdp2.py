"""kv-sharing-fsdp2: FSDP2's mixed precision and accelerate's device hooks copy the plain dict that carries the
shared K/V between layers."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, IN_TEXT_MODEL

SHARED_KV_STATES = m.Name("shared_kv_states")
PLAIN_DICT = m.Dict(elements=[])
MAKES_PLAIN_DICT = PLAIN_DICT | m.Call(
    func=m.Attribute(value=m.Name("kwargs"), attr=m.Name("pop")),
    args=[m.Arg(m.SimpleString('"shared_kv_states"')), m.Arg(PLAIN_DICT)],
)
MAKES_CARRIER = m.Call(func=m.Name("UserDict") | m.Name("KVSharingDict"))
MAKES_SHARED_KV_STATES = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(SHARED_KV_STATES)])])
IMPORT_CARRIER = "from rewriter.kv_sharing import KVSharingDict\n"


class KVSharingFSDP2Rule(Rule):
    """FSDP2's mixed precision casts each sharded layer's inputs with ``torch.distributed.utils._apply_to_tensors``,
    which rebuilds every plain dict it meets: what a layer stores in ``shared_kv_states`` lands in a copy, and the
    KV-shared layers after it find nothing (``KeyError``). accelerate's device hooks (a ``device_map`` over several
    devices, or offloading) do the same to every mapping without a ``to()`` that they are handed, unless its keyword
    is in ``_skip_keys_device_placement``: Gemma-4 5.5.2 passes the dict positionally and crashes so.

    The fix is transformers 5.23.0's carrier (``rewriter.kv_sharing.KVSharingDict``): a ``UserDict``, which FSDP2
    leaves alone, whose ``to()`` moves the tensors in place and returns itself. It applies as well to the plain dict
    that ``kv-sharing-without-cache`` inserts, which runs before it. Upstream's ``UserDict`` (5.9.0), passed by keyword
    with the skip key (5.5.3 on), is fixed. The import is local to ``forward``: a patch changes definitions, never a
    module's imports.
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
                from rewriter.kv_sharing import KVSharingDict
                shared_kv_states = kwargs.pop("shared_kv_states", KVSharingDict())
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
                    from rewriter.kv_sharing import KVSharingDict
                    shared_kv_states = KVSharingDict()
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
    def carry_in_kv_sharing_dict(self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine):
        value = updated_node.body[0].value
        if m.findall(value, MAKES_CARRIER):
            self.found_fixed()
            return updated_node
        if not m.matches(value, MAKES_PLAIN_DICT):
            self.parts["other"] += 1
            return updated_node
        self.rewrote()
        carrier = m.replace(updated_node, PLAIN_DICT, lambda *_: cst.parse_expression("KVSharingDict()"))
        imports = cst.parse_statement(IMPORT_CARRIER, config=self.module.config_for_parsing)
        return cst.FlattenSentinel([imports.with_changes(leading_lines=updated_node.leading_lines), carrier.with_changes(leading_lines=())])

    def check(self) -> None:
        if self.parts["other"] and not (self.sites or self.has_fixed_shape):
            self.drift("`shared_kv_states` is made some other way")
