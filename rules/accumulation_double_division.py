"""accumulation-double-division: `Trainer` divides the loss by the accumulation steps twice (transformers and accelerate)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

IN_TRAINER = m.ClassDef(name=m.Name("Trainer"))
IN_CREATE_ACCELERATOR = m.FunctionDef(name=m.Name("create_accelerator_and_postprocess"))
NUM_STEPS = m.Subscript(
    value=m.Name("grad_acc_kwargs"), slice=[m.SubscriptElement(m.Index(m.SimpleString('"num_steps"')))]
)
NUM_STEPS_GIVEN = m.If(
    test=m.Comparison(
        left=m.SimpleString('"num_steps"'), comparisons=[m.ComparisonTarget(m.In(), m.Name("grad_acc_kwargs"))]
    )
)
ACCUMULATION_STEPS = m.Attribute(
    value=m.Attribute(value=m.Name("self"), attr=m.Name("args")), attr=m.Name("gradient_accumulation_steps")
)
ELSE_ACCELERATE_ACCUMULATES = m.Else(
    body=m.IndentedBlock(
        body=[m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(NUM_STEPS)], value=ACCUMULATION_STEPS)])]
    )
)
ONE_STEP_IN_ACCELERATE = 'grad_acc_kwargs["num_steps"] = 1\n'


class AccumulationDoubleDivisionRule(Rule):
    """``Trainer`` divides each micro-batch's loss by the accumulation steps itself, and also tells Accelerate the
    steps, whose ``backward`` divides again: under accumulation every gradient is that many times too small (any
    model, TRL's trainers too). As transformers 5.5.4 does, Accelerate is told one step.
    """

    id = "accumulation-double-division"
    marker = 'grad_acc_kwargs["num_steps"] = self.args.gradient_accumulation_steps'
    scope = IN_TRAINER
    expected = (
        '`else: grad_acc_kwargs["num_steps"] = self.args.gradient_accumulation_steps`'
        " in Trainer.create_accelerator_and_postprocess"
    )

    BUGGY = '''
        class Trainer:
            def create_accelerator_and_postprocess(self):
                grad_acc_kwargs = {}
                if "num_steps" in grad_acc_kwargs:
                    self.args.gradient_accumulation_steps = grad_acc_kwargs["num_steps"]
                else:
                    grad_acc_kwargs["num_steps"] = self.args.gradient_accumulation_steps

                gradient_accumulation_plugin = GradientAccumulationPlugin(**grad_acc_kwargs)
    '''
    PATCHED = '''
        class Trainer:
            def create_accelerator_and_postprocess(self):
                grad_acc_kwargs = {}
                if "num_steps" in grad_acc_kwargs:
                    self.args.gradient_accumulation_steps = grad_acc_kwargs["num_steps"]
                grad_acc_kwargs["num_steps"] = 1

                gradient_accumulation_plugin = GradientAccumulationPlugin(**grad_acc_kwargs)
    '''
    FIXED = (
        # 5.5.4 on: Accelerate is told one step
        PATCHED,
        # 4.x to 5.1: Accelerate is told nothing and keeps one step
        '''
        class Trainer:
            def create_accelerator_and_postprocess(self):
                grad_acc_kwargs = {}
                if "num_steps" in grad_acc_kwargs:
                    self.args.gradient_accumulation_steps = grad_acc_kwargs["num_steps"]

                accelerator_config = self.args.accelerator_config.to_dict()
        ''',
    )
    DRIFTED = (
        # the steps reach Accelerate some third way
        BUGGY.replace(
            'grad_acc_kwargs["num_steps"] = self.args.gradient_accumulation_steps',
            "grad_acc_kwargs.update(num_steps=self.args.gradient_accumulation_steps)",
        ),
        # the method was renamed
        BUGGY.replace("def create_accelerator_and_postprocess(", "def create_accelerator("),
    )

    @m.call_if_inside(IN_CREATE_ACCELERATOR)
    @m.leave(NUM_STEPS_GIVEN)
    def tell_accelerate_one_step(self, original_node: cst.If, updated_node: cst.If):  # an If or a FlattenSentinel
        if updated_node.orelse is None:
            self.found_fixed()
            return updated_node
        if not m.matches(updated_node.orelse, ELSE_ACCELERATE_ACCUMULATES):
            self.drift("the `else` of `if \"num_steps\" in grad_acc_kwargs` does something else")
            return updated_node
        self.rewrote()
        one_step = cst.parse_statement(ONE_STEP_IN_ACCELERATE, config=self.module.config_for_parsing)
        return cst.FlattenSentinel([updated_node.with_changes(orelse=None), one_step])
