"""loss-accumulation: Gemma-3, 3n and 4's own mean loss, which gradient accumulation and DDP scale wrong in ``Trainer``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, IN_INIT, SELF, SUPER_INIT, is_not_none

IN_CONDITIONAL_GENERATION = m.ClassDef(name=m.Name(m.MatchRegex(r"Gemma(3|3n|4)ForConditionalGeneration")))
ACCEPTS_LOSS_KWARGS = m.Name("accepts_loss_kwargs")
ACCEPTS_NO_LOSS_KWARGS = m.Assign(
    targets=[m.AssignTarget(ACCEPTS_LOSS_KWARGS | m.Attribute(value=SELF, attr=ACCEPTS_LOSS_KWARGS))],
    value=m.Name("False"),
)
CROSS_ENTROPY = m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("CrossEntropyLoss")))
LABELS_GIVEN = is_not_none(m.Name("labels"))
OWN_LOSS = m.If(test=LABELS_GIVEN)  # with `nn.CrossEntropyLoss()` somewhere in its body
LOSS_FUNCTION_CALL = m.Call(func=m.Attribute(value=SELF, attr=m.Name("loss_function")))
# ``self.loss_function(..., **kwargs)``: Trainer's ``num_items_in_batch`` reaches the loss through the forward's kwargs
LOSS_FUNCTION_GETS_KWARGS = m.Call(
    func=m.Attribute(value=SELF, attr=m.Name("loss_function")), args=[m.ZeroOrMore(), m.Arg(star="**"), m.ZeroOrMore()]
)
LOSS_FUNCTION = "loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **{kwargs})\n"
NO_LOSS_KWARGS = "self.accepts_loss_kwargs = False\n"
# Gemma-3's fix (4.57.0) only declares it: its own loss (which also drops the positions the attention mask pads) stays,
# and Trainer divides it by the accumulation steps
DECLARATION_ONLY = {"Gemma3ForConditionalGeneration"}


class LossAccumulationRule(Rule):
    """``Gemma3ForConditionalGeneration`` (4.53.0 to 4.56.2), ``Gemma3nForConditionalGeneration`` (4.53.0 to 5.5.4)
    and ``Gemma4ForConditionalGeneration`` (5.5.0 to 5.5.4) compute a per-batch mean loss that ignores
    ``num_items_in_batch``, yet take ``**kwargs`` and do not say so (``accepts_loss_kwargs = False``): ``Trainer``
    then neither divides the loss by the accumulation steps nor lets the model normalise it, and the loss and
    gradients grow with the steps (and with the world size under DDP).

    The fix is transformers 5.6.0's (Gemma-3n and Gemma-4): the loss is ``self.loss_function(...)`` and
    ``accepts_loss_kwargs`` is ``False``. The buggy classes do not declare it and the installer adds no class attribute,
    so the constructor sets it on each model, where ``Trainer`` (``hasattr(model, "accepts_loss_kwargs")``) reads it the same.

    Gemma-3's fix is 4.57.0's, its first fixed release: the declaration alone, its own mean loss kept (``Trainer``
    divides it by the steps; it also drops the positions the attention mask pads, which ``self.loss_function`` would
    not). Upstream fixed Gemma-3 twice, and both shapes are ``not_needed``: 4.57.0's, and 5.17.0's, which drops the
    declaration and calls ``self.loss_function(..., **lm_kwargs)``, which ``Trainer``'s ``num_items_in_batch`` reaches.
    """

    id = "loss-accumulation"
    marker = "nn.CrossEntropyLoss()"
    scope = IN_CONDITIONAL_GENERATION
    expected = (
        "Gemma3, Gemma3n or Gemma4ForConditionalGeneration.forward computing `nn.CrossEntropyLoss()` under "
        "`if labels is not None`"
    )

    BUGGY = '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            base_model_prefix = "model"

            def __init__(self, config: Gemma4Config):
                super().__init__(config)
                self.model = Gemma4Model(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                logits = self.lm_head(self.model(input_ids, **kwargs).last_hidden_state)
                loss = None
                if labels is not None:
                    # Upcast to float
                    logits = logits.float()
                    loss_fct = nn.CrossEntropyLoss()
                    loss = loss_fct(logits[..., :-1, :].flatten(0, 1), labels[..., 1:].flatten())
                return loss, logits
    '''
    PATCHED = '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            base_model_prefix = "model"

            def __init__(self, config: Gemma4Config):
                super().__init__(config)
                self.accepts_loss_kwargs = False
                self.model = Gemma4Model(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                logits = self.lm_head(self.model(input_ids, **kwargs).last_hidden_state)
                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **kwargs)
                return loss, logits
    '''
    EXAMPLES = (
        # Gemma-3, 4.53.0 to 4.56.2: the loss drops the positions the attention mask pads; 4.57.0 only declares
        (
            '''
            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                _tied_weights_keys = ["lm_head.weight"]

                def __init__(self, config: Gemma3Config):
                    super().__init__(config)
                    self.model = Gemma3Model(config)
                    self.post_init()

                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
                    logits = self.lm_head(outputs[0])

                    loss = None
                    if labels is not None:
                        # Upcast to float if we need to compute the loss to avoid potential precision issues
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
                        # Flatten the tokens
                        loss_fct = nn.CrossEntropyLoss()
                        flat_logits = shift_logits.view(-1, self.config.text_config.vocab_size)
                        flat_labels = shift_labels.view(-1).to(shift_logits.device)
                        loss = loss_fct(flat_logits, flat_labels)

                    if not return_dict:
                        return (loss, logits)
                    return Gemma3CausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
            '''
            class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
                _tied_weights_keys = ["lm_head.weight"]

                def __init__(self, config: Gemma3Config):
                    super().__init__(config)
                    self.accepts_loss_kwargs = False
                    self.model = Gemma3Model(config)
                    self.post_init()

                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
                    logits = self.lm_head(outputs[0])

                    loss = None
                    if labels is not None:
                        # Upcast to float if we need to compute the loss to avoid potential precision issues
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
                        # Flatten the tokens
                        loss_fct = nn.CrossEntropyLoss()
                        flat_logits = shift_logits.view(-1, self.config.text_config.vocab_size)
                        flat_labels = shift_labels.view(-1).to(shift_logits.device)
                        loss = loss_fct(flat_logits, flat_labels)

                    if not return_dict:
                        return (loss, logits)
                    return Gemma3CausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
        ),
        # Gemma-3n, 4.53.0 to 5.5.4: the final logits are soft-capped before the loss, in either shape
        (
            '''
            class Gemma3nForConditionalGeneration(Gemma3nPreTrainedModel, GenerationMixin):
                base_model_prefix = "model"

                def __init__(self, config: Gemma3nConfig):
                    super().__init__(config)
                    self.model = Gemma3nModel(config)

                @can_return_tuple
                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    logits = self.lm_head(self.model(input_ids, attention_mask=attention_mask, **lm_kwargs)[0])
                    if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
                        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping

                    loss = None
                    if labels is not None:
                        logits = logits.float()
                        shift_logits = logits[..., :-1, :].contiguous()
                        shift_labels = labels[..., 1:].contiguous()
                        loss_fct = nn.CrossEntropyLoss()
                        loss = loss_fct(shift_logits.view(-1, self.config.text_config.vocab_size), shift_labels.view(-1))

                    return Gemma3nCausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
            '''
            class Gemma3nForConditionalGeneration(Gemma3nPreTrainedModel, GenerationMixin):
                base_model_prefix = "model"

                def __init__(self, config: Gemma3nConfig):
                    super().__init__(config)
                    self.accepts_loss_kwargs = False
                    self.model = Gemma3nModel(config)

                @can_return_tuple
                def forward(self, input_ids=None, attention_mask=None, labels=None, **lm_kwargs):
                    logits = self.lm_head(self.model(input_ids, attention_mask=attention_mask, **lm_kwargs)[0])
                    if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
                        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping

                    loss = None
                    if labels is not None:
                        loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **lm_kwargs)

                    return Gemma3nCausalLMOutputWithPast(loss=loss, logits=logits)
            ''',
        ),
    )
    FIXED = (
        # Gemma-4 and Gemma-3n from 5.6.0
        '''
        class Gemma4ForConditionalGeneration(Gemma4PreTrainedModel, GenerationMixin):
            accepts_loss_kwargs = False

            def __init__(self, config: Gemma4Config):
                super().__init__(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **kwargs)
        ''',
        # Gemma-3, 4.57.0 to 5.16.1: it says it takes no loss kwargs and keeps its own mean loss, which Trainer divides
        '''
        class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
            accepts_loss_kwargs = False

            def __init__(self, config: Gemma3Config):
                super().__init__(config)

            def forward(self, input_ids=None, labels=None, **lm_kwargs):
                loss = None
                if labels is not None:
                    logits = logits.float()
                    loss_fct = nn.CrossEntropyLoss()
                    loss = loss_fct(logits[..., :-1, :].flatten(0, 1), labels[..., 1:].flatten())
        ''',
        # Gemma-3 from 5.17.0: no declaration; Trainer's num_items_in_batch reaches the loss function
        '''
        class Gemma3ForConditionalGeneration(Gemma3PreTrainedModel, GenerationMixin):
            def __init__(self, config: Gemma3Config):
                super().__init__(config)

            def forward(self, input_ids=None, labels=None, **kwargs: Unpack[TransformersKwargs]):
                loss = None
                if labels is not None:
                    loss = self.loss_function(
                        logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                    )
        ''',
    )
    DRIFTED = (
        # the class was renamed
        BUGGY.replace("class Gemma4ForConditionalGeneration(", "class Gemma4ForMultimodalLM("),
        # the loss normalises some third way
        BUGGY.replace("loss_fct = nn.CrossEntropyLoss()", "loss_fct = nn.NLLLoss()"),
        # it says it takes no loss kwargs but computes no loss that can be told
        BUGGY.replace('base_model_prefix = "model"', "accepts_loss_kwargs = False").replace(
            "loss_fct = nn.CrossEntropyLoss()", "loss_fct = nn.NLLLoss()"
        ),
        # the loss function is called without the kwargs, and the model does not say it takes none
        PATCHED.replace("\n                self.accepts_loss_kwargs = False", "").replace(", **kwargs)\n", ")\n"),
        # the own loss is computed twice
        BUGGY.replace("                return loss, logits", "                if labels is not None:\n"
                      "                    loss = nn.CrossEntropyLoss()(logits, labels)\n"
                      "                return loss, logits"),
        # the constructor no longer calls super().__init__ first
        BUGGY.replace("super().__init__(config)", "PreTrainedModel.__init__(self, config)"),
    )

    @m.visit(ACCEPTS_NO_LOSS_KWARGS)
    def note_no_loss_kwargs(self, node: cst.Assign) -> None:
        self.parts["declared"] += 1

    @m.call_if_inside(IN_FORWARD)
    @m.visit(LOSS_FUNCTION_CALL)
    def note_loss_function(self, node: cst.Call) -> None:
        self.parts["loss function"] += 1
        if m.matches(node, LOSS_FUNCTION_GETS_KWARGS):
            self.parts["loss function gets kwargs"] += 1

    @m.leave(IN_CONDITIONAL_GENERATION)
    def use_loss_function(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        """Decided once the whole class is seen: wherever it says ``accepts_loss_kwargs = False``, nothing changes."""
        body = list(updated_node.body.body)
        forward = next((i for i, node in enumerate(body) if m.matches(node, IN_FORWARD)), None)
        own_losses = [
            node
            for node in (body[forward].body.body if forward is not None else ())
            if m.matches(node, OWN_LOSS) and m.findall(node, CROSS_ENTROPY)
        ]
        self.parts["own loss"] += len(own_losses)
        if not own_losses or self.parts["declared"]:
            return updated_node
        kwargs = body[forward].params.star_kwarg
        if len(own_losses) > 1 or kwargs is None:
            self.drift("forward must compute its own loss once and take `**kwargs`")
            return updated_node
        init = next((i for i, node in enumerate(body) if m.matches(node, IN_INIT)), None)
        lines = list(body[init].body.body) if init is not None else []
        at = next((i for i, line in enumerate(lines) if m.matches(line, SUPER_INIT)), None)
        if at is None:
            self.drift(f"{updated_node.name.value}.__init__ must call `super().__init__(...)`")
            return updated_node
        if updated_node.name.value not in DECLARATION_ONLY:
            own = own_losses[0]
            code = LOSS_FUNCTION.format(kwargs=kwargs.name.value)
            loss = cst.parse_statement(code, config=self.module.config_for_parsing)
            body[forward] = body[forward].deep_replace(own, own.with_changes(body=own.body.with_changes(body=[loss])))
            self.rewrote()
        lines.insert(at + 1, cst.parse_statement(NO_LOSS_KWARGS, config=self.module.config_for_parsing))
        body[init] = body[init].with_deep_changes(body[init].body, body=lines)
        self.rewrote()
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def check(self) -> None:
        if self.sites:
            return
        declared, own_loss = self.parts["declared"], self.parts["own loss"]
        if declared and (own_loss or self.parts["loss function"]):
            self.found_fixed()  # 5.6.0's shape, or Gemma-3's own mean loss from 4.57.0, which Trainer divides
        elif self.parts["loss function gets kwargs"] and not own_loss:
            self.found_fixed()  # Gemma-3 from 5.17.0: num_items_in_batch reaches the loss function
        elif declared:
            self.drift("`accepts_loss_kwargs = False` without a loss that can be told")
        elif self.parts["loss function"]:
            self.drift("`self.loss_function(...)` without `**kwargs`, and no `accepts_loss_kwargs = False`")
