"""processor-double-bos: a Gemma processor tokenizes a prompt that already starts with ``<bos>`` (what
``apply_chat_template(..., tokenize=False)`` renders) with a second ``<bos>``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import SELF

IN_PROCESSOR = m.ClassDef(name=m.Name(m.MatchRegex(r"Gemma\w*Processor")))
IN_CALL = m.FunctionDef(name=m.Name("__call__"))
# the statement before which the text is tokenized: `output_kwargs = self._merge_kwargs(...)` (the processor tokenizes
# itself: Gemma-3 to 5.14.1, Gemma-3n to 5.22.2), `model_inputs = super().__call__(...)` (`ProcessorMixin` does)
MERGE_KWARGS = m.Call(func=m.Attribute(value=SELF, attr=m.Name("_merge_kwargs")))
SUPER_CALL = m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__call__")))
TOKENIZES_NEXT = m.SimpleStatementLine(body=[m.Assign(value=MERGE_KWARGS | SUPER_CALL)])
BOS_TEST = m.Call(func=m.Attribute(attr=m.Name("startswith")), args=[m.Arg(m.Attribute(attr=m.Name("bos_token")))])

NO_SECOND_BOS = """\
# A prompt that already starts with the bos token (`apply_chat_template(..., tokenize=False)`) gets no second one,
# as `apply_chat_template(..., tokenize=True)` does
prompts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
if (
    prompts
    and self.tokenizer.bos_token is not None
    and all(isinstance(prompt, str) and prompt.startswith(self.tokenizer.bos_token) for prompt in prompts)
    and "add_special_tokens" not in kwargs
    and "add_special_tokens" not in kwargs.get("text_kwargs", {})
):
    kwargs["add_special_tokens"] = False
"""


class ProcessorDoubleBosRule(Rule):
    """Gemma's chat template writes ``<bos>`` first, and the tokenizer adds one by default: a prompt rendered with
    ``apply_chat_template(..., tokenize=False)`` and then given to the processor starts with two, and the model
    trains and generates on inputs unlike the ones it was trained on. ``apply_chat_template(..., tokenize=True)``
    avoids it by passing ``add_special_tokens=False`` when the prompt starts with the bos token; the processor's own
    ``__call__`` does not (every release, open upstream).

    The fix makes ``__call__`` do what ``apply_chat_template`` does: when every prompt starts with the bos token and
    the caller did not choose ``add_special_tokens``, the tokenizer adds no special tokens.
    """

    id = "processor-double-bos"
    marker = "Processor(ProcessorMixin)"
    scope = IN_PROCESSOR
    expected = "Gemma3Processor.__call__ tokenizing after `self._merge_kwargs(...)` or `super().__call__(...)`"

    BUGGY = '''
        class Gemma3Processor(ProcessorMixin):
            def __call__(self, images=None, text=None, **kwargs):
                if text is not None and not isinstance(text, str):
                    if not isinstance(text, list) or not isinstance(text[0], str):
                        raise TypeError("Invalid input text. Please provide a string, or a list of strings")

                model_inputs = super().__call__(images=images, text=text, **kwargs)
                return model_inputs
    '''
    PATCHED = '''
        class Gemma3Processor(ProcessorMixin):
            def __call__(self, images=None, text=None, **kwargs):
                if text is not None and not isinstance(text, str):
                    if not isinstance(text, list) or not isinstance(text[0], str):
                        raise TypeError("Invalid input text. Please provide a string, or a list of strings")

                # A prompt that already starts with the bos token (`apply_chat_template(..., tokenize=False)`) gets no second one,
                # as `apply_chat_template(..., tokenize=True)` does
                prompts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
                if (
                    prompts
                    and self.tokenizer.bos_token is not None
                    and all(isinstance(prompt, str) and prompt.startswith(self.tokenizer.bos_token) for prompt in prompts)
                    and "add_special_tokens" not in kwargs
                    and "add_special_tokens" not in kwargs.get("text_kwargs", {})
                ):
                    kwargs["add_special_tokens"] = False
                model_inputs = super().__call__(images=images, text=text, **kwargs)
                return model_inputs
    '''
    EXAMPLES = (
        # 4.53.0 to 5.14.1: the processor merges its kwargs and tokenizes itself
        (
            '''
            class Gemma3Processor(ProcessorMixin):
                def __call__(self, images=None, text=None, **kwargs):
                    output_kwargs = self._merge_kwargs(Gemma3ProcessorKwargs, **kwargs)
                    return self.tokenizer(text=text, **output_kwargs["text_kwargs"])
            ''',
            '''
            class Gemma3Processor(ProcessorMixin):
                def __call__(self, images=None, text=None, **kwargs):
                    # A prompt that already starts with the bos token (`apply_chat_template(..., tokenize=False)`) gets no second one,
                    # as `apply_chat_template(..., tokenize=True)` does
                    prompts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
                    if (
                        prompts
                        and self.tokenizer.bos_token is not None
                        and all(isinstance(prompt, str) and prompt.startswith(self.tokenizer.bos_token) for prompt in prompts)
                        and "add_special_tokens" not in kwargs
                        and "add_special_tokens" not in kwargs.get("text_kwargs", {})
                    ):
                        kwargs["add_special_tokens"] = False
                    output_kwargs = self._merge_kwargs(Gemma3ProcessorKwargs, **kwargs)
                    return self.tokenizer(text=text, **output_kwargs["text_kwargs"])
            ''',
        ),
    )
    FIXED = (
        PATCHED,
        # a processor that adds the bos itself where a prompt lacks it (Molmo2's way)
        '''
        class Gemma3Processor(ProcessorMixin):
            def __call__(self, images=None, text=None, **kwargs):
                text = [prompt if prompt.startswith(self.tokenizer.bos_token) else self.tokenizer.bos_token + prompt for prompt in text]
                return super().__call__(images=images, text=text, add_special_tokens=False, **kwargs)
        ''',
    )
    DRIFTED = (
        # the text is tokenized some other way
        BUGGY.replace("model_inputs = super().__call__(images=images, text=text, **kwargs)", "model_inputs = self.encode(text)"),
    )

    @m.call_if_inside(IN_PROCESSOR)
    @m.leave(IN_CALL)
    def no_second_bos(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if m.findall(updated_node, BOS_TEST):
            self.found_fixed()
            return updated_node
        body = list(updated_node.body.body)
        at = [i for i, statement in enumerate(body) if m.matches(statement, TOKENIZES_NEXT)]
        if len(at) != 1:
            self.drift("__call__ must merge its kwargs with `self._merge_kwargs` or call `super().__call__` once")
            return updated_node
        block = cst.parse_module(NO_SECOND_BOS, config=self.module.config_for_parsing)
        first, *rest = block.body
        first = first.with_changes(leading_lines=[*body[at[0]].leading_lines, *block.header])
        self.rewrote()
        anchor = body[at[0]].with_changes(leading_lines=())
        return updated_node.with_changes(
            body=updated_node.body.with_changes(body=[*body[: at[0]], first, *rest, anchor, *body[at[0] + 1 :]])
        )
