"""fused-loss (opt-in): the training loss of Gemma's LM heads without the [tokens, vocabulary] logits."""

from __future__ import annotations

import ast
import textwrap

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, NONE, SELF, assigns, is_not_none

IN_LM_HEAD_MODEL = m.ClassDef(name=m.Name(m.MatchRegex(r"Gemma(2|3|3n|4)For(CausalLM|ConditionalGeneration)")))
LOGITS_FROM_LM_HEAD = assigns(
    m.Name("logits"), m.Call(func=m.Attribute(value=SELF, attr=m.Name("lm_head")), args=[m.Arg(keyword=None, star="")])
)
# ``if ...final_logit_softcapping... is not None:`` after the head: one of SOFT_CAPS, else drift
CAPS_LOGITS = m.If(
    test=m.MatchIfTrue(lambda test: bool(m.findall(test, m.Attribute(attr=m.Name("final_logit_softcapping")))))
)
NO_LOSS = assigns(m.Name("loss"), NONE)
LABELS_GIVEN = m.If(test=is_not_none(m.Name("labels")), orelse=None)


def _keyword(name: str) -> m.MatchIfTrue:
    """No keyword, or ``name``."""
    return m.MatchIfTrue(lambda keyword: keyword is None or keyword.value == name)


def _named(name: str) -> m.Arg:
    """``NAME`` or ``NAME=NAME``."""
    return m.Arg(m.Name(name), keyword=_keyword(name), star="")


# ``loss = self.loss_function(logits, labels, VOCABULARY, **KWARGS)``, its arguments positional or named
LOSS_FUNCTION = assigns(
    m.Name("loss"),
    m.Call(
        func=m.Attribute(value=SELF, attr=m.Name("loss_function")),
        args=[_named("logits"), _named("labels"), m.Arg(keyword=_keyword("vocab_size"), star=""), m.Arg(star="**")],
    ),
)
# The final soft cap as upstream wrote it, by where it reads the cap
SOFT_CAP = """
if {test} is not None:
    logits = logits / {cap}
    logits = torch.tanh(logits)
    logits = logits * {cap}
"""
# The multimodal models' own loss, as upstream wrote it (but for comments and layout): the mean over the shifted
# positions whose label token the attention mask keeps
OWN_LOSS = """
if labels is not None:
    logits = logits.float()
    shift_logits = logits[..., :-1, :]
    shift_labels = labels[..., 1:]
    if attention_mask is not None:
        shift_attention_mask = attention_mask[:, -shift_logits.shape[1] :].to(logits.device)
        shift_logits = shift_logits[shift_attention_mask.to(logits.device) != 0].contiguous()
        shift_labels = shift_labels[shift_attention_mask.to(shift_labels.device) != 0].contiguous()
    else:
        shift_logits = shift_logits.contiguous()
        shift_labels = shift_labels.contiguous()
    loss_fct = nn.CrossEntropyLoss()
    flat_logits = shift_logits.view(-1, self.config.text_config.vocab_size)
    flat_labels = shift_labels.view(-1).to(shift_logits.device)
    loss = loss_fct(flat_logits, flat_labels)
"""
ROUTED = m.Call(func=m.Attribute(value=m.Name("fused_loss"), attr=m.Name("applies")))
IMPORT = "from rewriter import fused_loss\n"


def _ast_of(code: str) -> str:
    return ast.dump(ast.parse(textwrap.dedent(code)))


CONFIG_CAP = "self.config.final_logit_softcapping"
TEXT_CONFIG_CAP = "self.config.get_text_config().final_logit_softcapping"
SOFT_CAPS = {
    _ast_of(SOFT_CAP.format(test=CONFIG_CAP, cap=CONFIG_CAP)): CONFIG_CAP,
    _ast_of(SOFT_CAP.format(test=f"(final_logit_softcapping := {TEXT_CONFIG_CAP})", cap="final_logit_softcapping")): (
        TEXT_CONFIG_CAP
    ),
}
# Gemma-4 5.5.x reads the vocabulary size from get_text_config()
OWN_LOSSES = {
    _ast_of(OWN_LOSS),
    _ast_of(OWN_LOSS.replace("self.config.text_config.vocab_size", "self.config.get_text_config().vocab_size")),
}


class FusedLossRule(Rule):
    """Opt-in (``rewriter.compile(family, fused_loss=True)``), not a bug: ``Gemma{2,3,3n,4}ForCausalLM`` and
    ``...ForConditionalGeneration`` project every position onto the 256k/262k-token vocabulary and keep several
    float32 copies of those logits for the loss (about 6 GiB at 2,048 tokens), most of a LoRA step's memory.

    The forward keeps its text, under ``else``; before it, when ``fused_loss.applies`` (labels given, gradients on,
    a plain ``nn.Linear`` LM head and transformers' causal-LM loss), it returns the same loss of the same hidden
    states and soft cap, and no logits. Two losses are known: ``self.loss_function(logits, labels, ..., **kwargs)``,
    which becomes ``fused_loss.causal_lm_loss`` with those kwargs (``num_items_in_batch``, ``ignore_index``,
    ``shift_labels``), and the multimodal models' own ``nn.CrossEntropyLoss()`` mean over the positions the
    attention mask keeps (Gemma-3 4.53.0 to 5.16.1; Gemma-3n and Gemma-4 until loss-accumulation rewrites it),
    which becomes ``fused_loss.masked_mean_loss``. Every model class in scope must have that forward; a forward
    that already routes is ``not_needed``.
    """

    id = "fused-loss"
    marker = "self.lm_head("
    scope = IN_LM_HEAD_MODEL
    expected = (
        "`logits = self.lm_head(...)`, the optional final soft cap `if`, `loss = None` and `if labels is not None:` "
        "with `loss = self.loss_function(..., **kwargs)` or Gemma-3's own `nn.CrossEntropyLoss()` mean, in each "
        "Gemma ForCausalLM/ForConditionalGeneration forward"
    )

    BUGGY = '''
        class Gemma4ForCausalLM(Gemma4PreTrainedModel, GenerationMixin):
            def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs: Unpack[TransformersKwargs]):
                outputs = self.model(input_ids=input_ids, **kwargs)

                hidden_states = outputs.last_hidden_state
                # Only compute necessary logits, and do not upcast them to float if we are not computing the loss
                slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
                logits = self.lm_head(hidden_states[:, slice_indices, :])
                if self.config.final_logit_softcapping is not None:
                    logits = logits / self.config.final_logit_softcapping
                    logits = torch.tanh(logits)
                    logits = logits * self.config.final_logit_softcapping

                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

                return CausalLMOutputWithPast(loss=loss, logits=logits)
    '''
    PATCHED = '''
        class Gemma4ForCausalLM(Gemma4PreTrainedModel, GenerationMixin):
            def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs: Unpack[TransformersKwargs]):
                outputs = self.model(input_ids=input_ids, **kwargs)

                hidden_states = outputs.last_hidden_state
                # Only compute necessary logits, and do not upcast them to float if we are not computing the loss
                slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
                from rewriter import fused_loss
                if fused_loss.applies(self, labels):
                    logits, loss = None, fused_loss.causal_lm_loss(self.lm_head, hidden_states[:, slice_indices, :], labels, self.config.final_logit_softcapping, **kwargs)
                else:
                    logits = self.lm_head(hidden_states[:, slice_indices, :])
                    if self.config.final_logit_softcapping is not None:
                        logits = logits / self.config.final_logit_softcapping
                        logits = torch.tanh(logits)
                        logits = logits * self.config.final_logit_softcapping

                    loss = None
                    if labels is not None:
                        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

                return CausalLMOutputWithPast(loss=loss, logits=logits)
    '''
    EXAMPLES = (
        # Gemma-3n and Gemma-4's multimodal models (5.6.0 on): the cap read from the text config, keyword arguments
        (
            '''
            class Gemma3nForConditionalGeneration(Gemma3nPreTrainedModel, GenerationMixin):
                def forward(self, input_ids=None, labels=None, **lm_kwargs):
                    hidden_states = self.model(input_ids, **lm_kwargs).last_hidden_state
                    logits = self.lm_head(hidden_states)
                    if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
                        logits = logits / final_logit_softcapping
                        logits = torch.tanh(logits)
                        logits = logits * final_logit_softcapping

                    loss = None
                    if labels is not None:
                        loss = self.loss_function(logits=logits, labels=labels, vocab_size=262144, **lm_kwargs)
                    return Gemma3nCausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
            '''
            class Gemma3nForConditionalGeneration(Gemma3nPreTrainedModel, GenerationMixin):
                def forward(self, input_ids=None, labels=None, **lm_kwargs):
                    hidden_states = self.model(input_ids, **lm_kwargs).last_hidden_state
                    from rewriter import fused_loss
                    if fused_loss.applies(self, labels):
                        logits, loss = None, fused_loss.causal_lm_loss(self.lm_head, hidden_states, labels, self.config.get_text_config().final_logit_softcapping, **lm_kwargs)
                    else:
                        logits = self.lm_head(hidden_states)
                        if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
                            logits = logits / final_logit_softcapping
                            logits = torch.tanh(logits)
                            logits = logits * final_logit_softcapping

                        loss = None
                        if labels is not None:
                            loss = self.loss_function(logits=logits, labels=labels, vocab_size=262144, **lm_kwargs)
                    return Gemma3nCausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
        ),
        # Gemma-3's multimodal model, 4.53.0 to 5.16.1: no cap, its own mean loss over the positions the mask keeps
        (
            '''
            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    hidden_states = self.model(input_ids, attention_mask=attention_mask, **lm_kwargs)[0]
                    logits = self.lm_head(hidden_states)

                    loss = None
                    if labels is not None:
                        # Upcast to float if we need to compute the loss to avoid potential precision issues
                        logits = logits.float()
                        shift_logits = logits[..., :-1, :]
                        shift_labels = labels[..., 1:]
                        if attention_mask is not None:
                            # we use the input attention mask to shift the logits and labels, because it is 2D.
                            # we also crop attn mask in case it is longer, which happens in PrefixTuning with peft
                            shift_attention_mask = attention_mask[:, -shift_logits.shape[1] :].to(logits.device)
                            shift_logits = shift_logits[shift_attention_mask.to(logits.device) != 0].contiguous()
                            shift_labels = shift_labels[shift_attention_mask.to(shift_labels.device) != 0].contiguous()
                        else:
                            shift_logits = shift_logits.contiguous()
                            shift_labels = shift_labels.contiguous()
                        # Flatten the tokens
                        loss_fct = nn.CrossEntropyLoss()

                        flat_logits = shift_logits.view(-1, self.config.text_config.vocab_size)
                        flat_labels = shift_labels.view(-1).to(shift_logits.device)
                        loss = loss_fct(flat_logits, flat_labels)

                    return Gemma3CausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
            '''
            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    hidden_states = self.model(input_ids, attention_mask=attention_mask, **lm_kwargs)[0]
                    from rewriter import fused_loss
                    if fused_loss.applies(self, labels, own_loss=True):
                        logits, loss = None, fused_loss.masked_mean_loss(self.lm_head, hidden_states, labels, None, attention_mask)
                    else:
                        logits = self.lm_head(hidden_states)

                        loss = None
                        if labels is not None:
                            # Upcast to float if we need to compute the loss to avoid potential precision issues
                            logits = logits.float()
                            shift_logits = logits[..., :-1, :]
                            shift_labels = labels[..., 1:]
                            if attention_mask is not None:
                                # we use the input attention mask to shift the logits and labels, because it is 2D.
                                # we also crop attn mask in case it is longer, which happens in PrefixTuning with peft
                                shift_attention_mask = attention_mask[:, -shift_logits.shape[1] :].to(logits.device)
                                shift_logits = shift_logits[shift_attention_mask.to(logits.device) != 0].contiguous()
                                shift_labels = shift_labels[shift_attention_mask.to(shift_labels.device) != 0].contiguous()
                            else:
                                shift_logits = shift_logits.contiguous()
                                shift_labels = shift_labels.contiguous()
                            # Flatten the tokens
                            loss_fct = nn.CrossEntropyLoss()

                            flat_logits = shift_logits.view(-1, self.config.text_config.vocab_size)
                            flat_labels = shift_labels.view(-1).to(shift_logits.device)
                            loss = loss_fct(flat_logits, flat_labels)

                    return Gemma3CausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
        ),
    )
    FIXED = (PATCHED,)
    DRIFTED = (
        # the logits are scaled between the head and the loss: the fused loss would not know it
        BUGGY.replace(
            "                loss = None\n",
            "                logits = logits * self.logit_scale\n                loss = None\n",
        ),
        # the loss takes no kwargs: where would num_items_in_batch come from?
        BUGGY.replace("self.vocab_size, **kwargs)", "self.vocab_size)"),
        # the labels' branch does more than compute the loss
        BUGGY.replace(
            "self.vocab_size, **kwargs)\n",
            "self.vocab_size, **kwargs)\n                    loss = loss + self.router_aux_loss_coef * outputs.aux_loss\n",
        ),
        # a soft cap of another formula
        BUGGY.replace("torch.tanh(logits)", "torch.clamp(logits, -1, 1)"),
        # the loss reads other logits than the head's
        BUGGY.replace("self.loss_function(logits, labels,", "self.loss_function(logits[:, :-1], labels,"),
        # the head is applied elsewhere
        BUGGY.replace("logits = self.lm_head(hidden_states[:, slice_indices, :])", "logits = self.head(hidden_states)"),
        # a second model class in the file without the shape
        BUGGY
        + '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            def forward(self, input_ids=None, labels=None, **kwargs):
                return self.model(input_ids, labels=labels, **kwargs)
        ''',
    )

    def __init__(self) -> None:
        super().__init__()
        self.routed: set[str] = set()  # the classes whose forward routes the loss, here or upstream

    @m.call_if_inside(IN_LM_HEAD_MODEL)
    @m.leave(IN_FORWARD)
    def route_the_loss(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        model = self.inside[IN_LM_HEAD_MODEL].name.value
        if m.findall(updated_node, ROUTED):
            self.found_fixed()
            self.routed.add(model)
            return updated_node
        body = list(updated_node.body.body)
        heads = [i for i, statement in enumerate(body) if m.matches(statement, LOGITS_FROM_LM_HEAD)]
        if len(heads) != 1:
            return updated_node  # ``leave_ClassDef`` reports the class
        start = end = heads[0]
        softcap = "None"
        if end + 1 < len(body) and m.matches(body[end + 1], CAPS_LOGITS):
            end += 1
            softcap = SOFT_CAPS.get(_ast_of(self.module.code_for_node(body[end])))
            if softcap is None:
                self.drift(f"{model}.forward soft-caps the logits in a way this rule does not know")
                return updated_node
        loss = body[end + 2] if end + 2 < len(body) and m.matches(body[end + 1], NO_LOSS) else None
        head = self.module.code_for_node(body[start].body[0].value.args[0].value)
        routed = self.routed_loss(model, loss, head, softcap)
        if routed is None:
            return updated_node
        self.rewrote()
        self.routed.add(model)
        condition, call = routed
        config = self.module.config_for_parsing
        branch = cst.parse_statement(f"if {condition}:\n    logits, loss = None, {call}\nelse:\n    pass\n", config=config)
        unrouted = [body[start].with_changes(leading_lines=()), *body[start + 1 : end + 3]]
        branch = branch.with_changes(
            orelse=branch.orelse.with_changes(body=branch.orelse.body.with_changes(body=unrouted))
        )
        imports = cst.parse_statement(IMPORT, config=config).with_changes(leading_lines=body[start].leading_lines)
        return updated_node.with_changes(
            body=updated_node.body.with_changes(body=[*body[:start], imports, branch, *body[end + 3 :]])
        )

    def routed_loss(self, model: str, loss: cst.BaseStatement | None, head: str, softcap: str) -> tuple[str, str] | None:
        """When the fused loss applies and what computes it, for the ``if labels is not None:`` block ``loss`` of
        the logits ``self.lm_head(head)`` capped at ``softcap``; ``None``, with drift, for a block not known."""
        if loss is None or not m.matches(loss, LABELS_GIVEN):
            self.drift(f"{model}.forward has no `loss = None` and `if labels is not None:` right after the logits")
            return None
        statements = loss.body.body
        if len(statements) == 1 and m.matches(statements[0], LOSS_FUNCTION):
            kwargs = self.module.code_for_node(statements[0].body[0].value.args[-1].value)
            call = f"fused_loss.causal_lm_loss(self.lm_head, {head}, labels, {softcap}, **{kwargs})"
            return "fused_loss.applies(self, labels)", call
        if _ast_of(self.module.code_for_node(loss)) in OWN_LOSSES:
            call = f"fused_loss.masked_mean_loss(self.lm_head, {head}, labels, {softcap}, attention_mask)"
            return "fused_loss.applies(self, labels, own_loss=True)", call
        self.drift(
            f"{model}.forward's `if labels is not None:` neither only calls `self.loss_function(logits, labels, ..., "
            "**kwargs)` nor computes Gemma-3's own `nn.CrossEntropyLoss()` mean"
        )
        return None

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        model = original_node.name.value
        if m.matches(original_node, IN_LM_HEAD_MODEL) and model not in self.routed and not self.problems:
            self.drift(f"{model} has no forward with one `logits = self.lm_head(...)` to route")
        return updated_node
