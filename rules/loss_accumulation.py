"""loss-accumulation: Gemma-4's own mean loss, which gradient accumulation and DDP scale wrong in ``Trainer``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, IN_INIT, SELF, is_not_none

IN_CONDITIONAL_GENERATION = m.ClassDef(name=m.Name("Gemma4ForConditionalGeneration"))
ACCEPTS_LOSS_KWARGS = m.Name("accepts_loss_kwargs")
ACCEPTS_NO_LOSS_KWARGS = m.Assign(
    targets=[m.AssignTarget(ACCEPTS_LOSS_KWARGS | m.Attribute(value=SELF, attr=ACCEPTS_LOSS_KWARGS))],
    value=m.Name("False"),
)
SUPER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))))]
)
CROSS_ENTROPY = m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("CrossEntropyLoss")))
LABELS_GIVEN = is_not_none(m.Name("labels"))
OWN_LOSS = m.If(test=LABELS_GIVEN)  # with `nn.CrossEntropyLoss()` somewhere in its body
LOSS_FUNCTION_CALL = m.Call(func=m.Attribute(value=SELF, attr=m.Name("loss_function")))
LOSS_FUNCTION = "loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size, **{kwargs})\n"
NO_LOSS_KWARGS = "self.accepts_loss_kwargs = False\n"


class LossAccumulationRule(Rule):
    """``Gemma4ForConditionalGeneration`` computes a per-batch mean loss that ignores ``num_items_in_batch``, yet
    does not say so (``accepts_loss_kwargs = False``): ``Trainer`` then neither divides the loss by the
    accumulation steps nor lets the model normalise it, and the loss and gradients grow with the steps.

    The fix is transformers 5.6.0's: the loss is ``self.loss_function(...)`` and ``accepts_loss_kwargs`` is
    ``False``. A class attribute cannot be installed into a live class, so the constructor sets it on each model,
    where ``Trainer`` (``hasattr(model, "accepts_loss_kwargs")``) reads it the same.
    """

    id = "loss-accumulation"
    marker = "class Gemma4ForConditionalGeneration"
    scope = IN_CONDITIONAL_GENERATION
    expected = "Gemma4ForConditionalGeneration.forward computing `nn.CrossEntropyLoss()` under `if labels is not None`"

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
    FIXED = (
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
    )
    DRIFTED = (
        # the class was renamed
        BUGGY.replace("class Gemma4ForConditionalGeneration(", "class Gemma4ForMultimodalLM("),
        # the loss normalises some third way
        BUGGY.replace("loss_fct = nn.CrossEntropyLoss()", "loss_fct = nn.NLLLoss()"),
        # it says it takes no loss kwargs but keeps its own loss
        BUGGY.replace('base_model_prefix = "model"', "accepts_loss_kwargs = False"),
    )

    @m.visit(ACCEPTS_NO_LOSS_KWARGS)
    def note_no_loss_kwargs(self, node: cst.Assign) -> None:
        self.parts["declared"] += 1

    @m.call_if_inside(IN_FORWARD)
    @m.visit(LOSS_FUNCTION_CALL)
    def note_loss_function(self, node: cst.Call) -> None:
        self.parts["loss function"] += 1

    @m.leave(IN_FORWARD)
    def use_loss_function(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        own_losses = [
            node for node in updated_node.body.body if m.matches(node, OWN_LOSS) and m.findall(node, CROSS_ENTROPY)
        ]
        if not own_losses or self.parts["declared"]:
            return updated_node
        kwargs = updated_node.params.star_kwarg
        if len(own_losses) > 1 or kwargs is None:
            self.drift("forward must compute its own loss once and take `**kwargs`")
            return updated_node
        self.parts["own loss"] += 1
        self.rewrote()
        own = own_losses[0]
        code = LOSS_FUNCTION.format(kwargs=kwargs.name.value)
        loss = cst.parse_statement(code, config=self.module.config_for_parsing)
        return updated_node.deep_replace(own, own.with_changes(body=own.body.with_changes(body=[loss])))

    @m.leave(IN_CONDITIONAL_GENERATION)
    def declare_no_loss_kwargs(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        init = next((node for node in updated_node.body.body if m.matches(node, IN_INIT)), None)
        if not self.parts["own loss"]:
            return updated_node
        at = next((i for i, line in enumerate(init.body.body) if m.matches(line, SUPER_INIT)), None) if init else None
        if at is None:
            self.drift("Gemma4ForConditionalGeneration.__init__ must call `super().__init__(...)`")
            return updated_node
        self.rewrote()
        lines = list(init.body.body)
        lines.insert(at + 1, cst.parse_statement(NO_LOSS_KWARGS, config=self.module.config_for_parsing))
        return updated_node.deep_replace(init, init.with_deep_changes(init.body, body=lines))

    def check(self) -> None:
        if self.parts["declared"] and not self.parts["loss function"]:
            self.drift("`accepts_loss_kwargs = False` with a loss of its own")
        elif self.parts["declared"]:
            self.found_fixed()
