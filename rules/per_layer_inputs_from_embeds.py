"""per-layer-inputs-from-embeds: given ``inputs_embeds`` alone, Gemma-4 and Gemma-3n lose their per-layer token
embeddings, or all memory."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, SELF, is_none, is_not_none

INPUT_IDS = m.Name("input_ids")
IN_PER_LAYER_TEXT_MODEL = m.ClassDef(name=m.Name(m.MatchRegex(r"Gemma(3n|4)TextModel")))
IN_GET_PER_LAYER_INPUTS = m.FunctionDef(name=m.Name("get_per_layer_inputs"))
NO_INPUT_IDS = m.If(test=is_none(INPUT_IDS))
INPUT_IDS_GIVEN = m.If(test=is_not_none(INPUT_IDS))
EMBEDDING_TABLE = m.Attribute(value=m.Attribute(value=SELF, attr=m.Name("embed_tokens")), attr=m.Name("weight"))
PER_LAYER_INPUTS_OF_IDS = m.Assign(
    targets=[m.AssignTarget(m.Name("per_layer_inputs"))],
    value=m.Call(func=m.Attribute(value=SELF, attr=m.Name("get_per_layer_inputs")), args=[m.Arg(INPUT_IDS)]),
)
USES_LOOKUP = m.Call(func=m.Name("token_ids_of_embeddings"))

LOOKUP = '''
def token_ids_of_embeddings(inputs_embeds: torch.Tensor, embed_tokens: nn.Embedding) -> torch.Tensor:
    """The id of the token whose scaled embedding each vector of `inputs_embeds` is, bit for bit, or -1 if none.

    Vectors and the rows of `embed_tokens`' table, scaled as its `forward` scales them, are matched by an integer
    hash of the bits of 64 of their elements, a chunk of the vocabulary at a time, and each match is then checked
    element by element: memory grows with the chunk, not with the vocabulary. Added by rewriter's rule
    `per-layer-inputs-from-embeds`.
    """
    weight = embed_tokens.weight
    integers = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    columns = torch.linspace(0, weight.shape[-1] - 1, min(64, weight.shape[-1]), dtype=torch.float64).long()
    columns = columns.to(weight.device)
    generator = torch.Generator().manual_seed(0)
    multipliers = (torch.randint(1, 2**62, (len(columns),), generator=generator) | 1).to(weight.device)

    def hashes(rows):  # `+ 0.0` makes -0.0 into 0.0: equal values, equal bits; int64 sums wrap around exactly
        return ((rows[:, columns] + 0.0).view(integers).long() * multipliers).sum(-1)

    with torch.no_grad():
        vectors = inputs_embeds.reshape(-1, weight.shape[-1]).to(weight.device, weight.dtype)
        wanted = hashes(vectors)
        token_ids = torch.full_like(wanted, -1)
        for start in range(0, weight.shape[0], 16384):
            table = weight[start : start + 16384] * embed_tokens.embed_scale.to(weight.dtype)
            found, rows = (wanted[:, None] == hashes(table)[None, :]).nonzero(as_tuple=True)
            exact = (vectors[found] == table[rows]).all(-1)
            token_ids[found[exact]] = rows[exact] + start
    return token_ids.view(inputs_embeds.shape[:-1]).to(inputs_embeds.device)
'''
GEMMA4_LOOKUP = "input_ids = token_ids_of_embeddings(inputs_embeds, self.embed_tokens)\nif (input_ids < 0).any():\n    pass\n"
GEMMA3N_LOOKUP = """\
if input_ids is not None:
    pass
elif per_layer_inputs is None:
    # inputs_embeds alone: the per-layer embeddings of the tokens they embed; 0 for any other vector, as the
    # multimodal model gives its image and audio tokens
    token_ids = token_ids_of_embeddings(inputs_embeds, self.embed_tokens)
    in_table = (token_ids >= 0) & (token_ids < self.config.vocab_size_per_layer_input)
    per_layer_inputs = self.get_per_layer_inputs(torch.where(in_table, token_ids, 0))
"""


class PerLayerInputsFromEmbedsRule(Rule):
    """Gemma-4 and Gemma-3n add to each layer an embedding of the token it reads (per-layer inputs), looked up by
    ``input_ids``. Given ``inputs_embeds`` alone (``generate(inputs_embeds=...)``, prompt tuning):

    - Gemma-4 finds the ids by comparing every vector with every row of the embedding table at once, a
      batch x tokens x vocabulary x hidden boolean tensor (about 400 MB a token at E2B's 262,144 x 1,536), and
      against rows scaled by the exact ``sqrt(hidden_size)`` where the embedding scales by that number rounded to
      the weight's dtype: in bfloat16 no token matches, and it raises.
    - Gemma-3n has no lookup: the per-layer token embeddings are silently left out (wrong logits).

    The fix finds the ids with ``token_ids_of_embeddings`` (an exact match, in memory bounded by a vocabulary chunk,
    scaled as the embedding scales); Gemma-4 keeps its error for vectors that match no token, Gemma-3n gives them
    token 0, as its multimodal model gives image and audio tokens. Not fixed upstream as of 5.25.0.
    """

    id = "per-layer-inputs-from-embeds"
    marker = "get_per_layer_inputs"
    scope = IN_PER_LAYER_TEXT_MODEL
    expected = (
        "Gemma4TextModel.get_per_layer_inputs comparing `inputs_embeds` with `self.embed_tokens.weight` under "
        "`if input_ids is None:`, or Gemma3nTextModel.forward looking per-layer inputs up under "
        "`if input_ids is not None:` alone"
    )

    BUGGY = '''
        class Gemma4TextModel(Gemma4PreTrainedModel):
            def get_per_layer_inputs(self, input_ids, inputs_embeds):
                # If only inputs_embeds are provided, reverse main embedding to find the input_ids
                if input_ids is None:
                    with torch.no_grad():
                        input_ids = (
                            (
                                inputs_embeds[:, :, None, :]
                                == self.embed_tokens.weight[None, None, :, :] * self.config.hidden_size**0.5
                            )
                            .all(dim=3)
                            .nonzero()[:, 2]
                        )
                        try:
                            input_ids = input_ids.view(inputs_embeds.shape[:2])
                        except RuntimeError:
                            raise RuntimeError("the `inputs_embeds` you provided do not exactly match the embedding weights")

                return self.embed_tokens_per_layer(input_ids)
    '''
    PATCHED = (
        LOOKUP.replace("\n", "\n        ")
        + '''

        class Gemma4TextModel(Gemma4PreTrainedModel):
            def get_per_layer_inputs(self, input_ids, inputs_embeds):
                # If only inputs_embeds are provided, reverse main embedding to find the input_ids
                if input_ids is None:
                    input_ids = token_ids_of_embeddings(inputs_embeds, self.embed_tokens)
                    if (input_ids < 0).any():
                        raise RuntimeError("the `inputs_embeds` you provided do not exactly match the embedding weights")

                return self.embed_tokens_per_layer(input_ids)
    '''
    )
    BUGGY_GEMMA3N = '''
        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, per_layer_inputs=None, inputs_embeds=None, **kwargs):
                if input_ids is not None:
                    inputs_embeds = self.embed_tokens(input_ids)
                    per_layer_inputs = self.get_per_layer_inputs(input_ids)

                per_layer_inputs = self.project_per_layer_inputs(inputs_embeds, per_layer_inputs)
                return per_layer_inputs
    '''
    PATCHED_GEMMA3N = (
        LOOKUP.replace("\n", "\n        ")
        + '''

        class Gemma3nTextModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, per_layer_inputs=None, inputs_embeds=None, **kwargs):
                if input_ids is not None:
                    inputs_embeds = self.embed_tokens(input_ids)
                    per_layer_inputs = self.get_per_layer_inputs(input_ids)
                elif per_layer_inputs is None:
                    # inputs_embeds alone: the per-layer embeddings of the tokens they embed; 0 for any other vector, as the
                    # multimodal model gives its image and audio tokens
                    token_ids = token_ids_of_embeddings(inputs_embeds, self.embed_tokens)
                    in_table = (token_ids >= 0) & (token_ids < self.config.vocab_size_per_layer_input)
                    per_layer_inputs = self.get_per_layer_inputs(torch.where(in_table, token_ids, 0))

                per_layer_inputs = self.project_per_layer_inputs(inputs_embeds, per_layer_inputs)
                return per_layer_inputs
    '''
    )
    EXAMPLES = ((BUGGY_GEMMA3N, PATCHED_GEMMA3N),)
    FIXED = ()  # open upstream as of 5.25.0; the second pass over patched text is the fixed shape
    DRIFTED = (
        # the reverse lookup was rewritten some third way
        BUGGY.replace("== self.embed_tokens.weight[None, None, :, :]", "== self.embed_tokens(torch.arange(10))"),
        # Gemma-3n looks the per-layer inputs up some other way
        BUGGY_GEMMA3N.replace("self.get_per_layer_inputs(input_ids)", "self.embed_tokens_per_layer(input_ids)"),
        # the text model was renamed
        BUGGY.replace("class Gemma4TextModel(", "class Gemma4LanguageModel("),
    )

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return m.matches(node, IN_GET_PER_LAYER_INPUTS | IN_FORWARD)

    @m.visit(USES_LOOKUP)
    def note_lookup(self, node: cst.Call) -> None:
        self.found_fixed()

    @m.call_if_inside(IN_GET_PER_LAYER_INPUTS)
    @m.leave(NO_INPUT_IDS)
    def look_up_in_chunks(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        """Gemma-4: the whole-vocabulary comparison becomes the chunked lookup, raising the same error."""
        if not m.findall(updated_node, EMBEDDING_TABLE):
            return updated_node
        raises = m.findall(updated_node, m.SimpleStatementLine(body=[m.Raise()]))
        if len(raises) != 1 or not m.findall(updated_node, m.Call(func=m.Attribute(attr=m.Name("nonzero")))):
            self.drift("the reverse lookup must compare with `self.embed_tokens.weight`, take `.nonzero()` and raise once")
            return updated_node
        self.rewrote()
        lookup, check = cst.parse_module(GEMMA4_LOOKUP, config=self.module.config_for_parsing).body
        check = check.with_changes(body=check.body.with_changes(body=[raises[0].with_changes(leading_lines=())]))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=[lookup, check]))

    @m.call_if_inside(IN_FORWARD)
    @m.leave(INPUT_IDS_GIVEN)
    def look_up_without_input_ids(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        """Gemma-3n: ``elif per_layer_inputs is None:`` looks the ids up from ``inputs_embeds``."""
        if not any(m.matches(line, m.SimpleStatementLine(body=[PER_LAYER_INPUTS_OF_IDS])) for line in updated_node.body.body):
            return updated_node
        if updated_node.orelse is not None:
            if not m.findall(updated_node.orelse, USES_LOOKUP):
                self.drift("`if input_ids is not None:` already has an `else`")
            return updated_node
        self.rewrote()
        template = cst.parse_statement(GEMMA3N_LOOKUP, config=self.module.config_for_parsing)
        return updated_node.with_changes(orelse=template.orelse)

    @m.leave(IN_PER_LAYER_TEXT_MODEL)
    def define_lookup(self, original_node: cst.ClassDef, updated_node: cst.ClassDef):
        if not self.sites:
            return updated_node
        definition = cst.parse_statement(LOOKUP.lstrip(), config=self.module.config_for_parsing)
        definition = definition.with_changes(leading_lines=updated_node.leading_lines)
        return cst.FlattenSentinel([definition, updated_node.with_changes(leading_lines=[cst.EmptyLine(indent=False)] * 2)])
