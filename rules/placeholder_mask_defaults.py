"""placeholder-mask-defaults: every Gemma-3n image or audio input crashes on a ``get_placeholder_mask`` argument
that the model's own forward does not pass."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import NONE

GEMMA3N_MODEL = m.ClassDef(name=m.Name("Gemma3nModel"))
PLACEHOLDER_MASK = m.FunctionDef(name=m.Name("get_placeholder_mask"))
ARGUMENTS = ("input_ids", "inputs_embeds", "image_features", "audio_features")
OPTIONAL = m.Subscript(value=m.Name("Optional"))


class PlaceholderMaskDefaultsRule(Rule):
    """transformers 4.55.0 moved the placeholder masks of ``Gemma3nModel`` into
    ``get_placeholder_mask(self, input_ids, inputs_embeds, image_features, audio_features)``, four parameters without
    defaults, but ``forward`` passes ``image_features`` alone for images and ``audio_features`` alone for audio: every
    image or audio input raises ``TypeError: Gemma3nModel.get_placeholder_mask() missing 1 required positional
    argument`` (4.55.0 only; text-only inputs do not call it).

    The fix is transformers 4.55.1's: the four parameters become ``Optional[...] = None`` (``... | None`` in a class
    that writes no ``Optional``). Before 4.55.0 the method is absent (``forward`` builds the masks inline): the rule
    reports ``not_needed``.
    """

    id = "placeholder-mask-defaults"
    marker = "class Gemma3nModel("
    scope = GEMMA3N_MODEL
    expected = (
        "Gemma3nModel.get_placeholder_mask(self, input_ids, inputs_embeds, image_features, audio_features),"
        " none of them with a default"
    )

    BUGGY = '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def get_placeholder_mask(
                self,
                input_ids: torch.LongTensor,
                inputs_embeds: torch.FloatTensor,
                image_features: torch.FloatTensor,
                audio_features: torch.FloatTensor,
            ):
                special_image_mask = input_ids == self.config.image_token_id
                special_audio_mask = input_ids == self.config.audio_token_id
                return special_image_mask, special_audio_mask

            def forward(self, input_ids: Optional[torch.LongTensor] = None, pixel_values=None, **kwargs):
                if pixel_values is not None:
                    special_image_mask, _ = self.get_placeholder_mask(
                        input_ids, inputs_embeds=inputs_embeds, image_features=image_features
                    )
    '''
    PATCHED = '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def get_placeholder_mask(
                self,
                input_ids: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None,
                image_features: Optional[torch.FloatTensor] = None,
                audio_features: Optional[torch.FloatTensor] = None,
            ):
                special_image_mask = input_ids == self.config.image_token_id
                special_audio_mask = input_ids == self.config.audio_token_id
                return special_image_mask, special_audio_mask

            def forward(self, input_ids: Optional[torch.LongTensor] = None, pixel_values=None, **kwargs):
                if pixel_values is not None:
                    special_image_mask, _ = self.get_placeholder_mask(
                        input_ids, inputs_embeds=inputs_embeds, image_features=image_features
                    )
    '''
    EXAMPLES = (
        # a class that writes `X | None` (and parameters without annotations)
        (
            '''
            class Gemma3nModel(Gemma3nPreTrainedModel):
                def get_placeholder_mask(self, input_ids, inputs_embeds: torch.Tensor, image_features, audio_features):
                    return input_ids == 1, input_ids == 2
            ''',
            '''
            class Gemma3nModel(Gemma3nPreTrainedModel):
                def get_placeholder_mask(self, input_ids=None, inputs_embeds: torch.Tensor | None = None, image_features=None, audio_features=None):
                    return input_ids == 1, input_ids == 2
            ''',
        ),
    )
    FIXED = (
        PATCHED,
        # 5.0.0 on
        '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def get_placeholder_mask(
                self,
                input_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                image_features: torch.FloatTensor | None = None,
                audio_features: torch.FloatTensor | None = None,
            ):
                return special_image_mask, special_audio_mask
        ''',
        # 4.53.0 to 4.54.1: forward builds the masks itself
        '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids: Optional[torch.LongTensor] = None, pixel_values=None, **kwargs):
                if pixel_values is not None:
                    special_image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
        ''',
    )
    DRIFTED = (
        # some parameters have defaults, some not
        BUGGY.replace("audio_features: torch.FloatTensor,", "audio_features: torch.FloatTensor = None,"),
        # other parameters
        BUGGY.replace("audio_features: torch.FloatTensor,", "audio_features: torch.FloatTensor, video_features,"),
        # the method is gone, yet forward still calls it
        BUGGY.replace("def get_placeholder_mask(", "def placeholder_mask("),
    )

    def __init__(self) -> None:
        super().__init__()
        self.optional = False  # whether the class writes `Optional[...]`, so the module imports it

    @m.visit(GEMMA3N_MODEL)
    def note_the_class(self, node: cst.ClassDef) -> None:
        self.optional = bool(m.findall(node, OPTIONAL))
        if not m.findall(node, m.Name("get_placeholder_mask")):
            self.found_fixed()  # 4.53.0 to 4.54.1: forward builds the masks inline
        elif not any(m.matches(statement, PLACEHOLDER_MASK) for statement in node.body.body):
            self.drift("Gemma3nModel refers to `get_placeholder_mask` but does not define it")

    @m.call_if_inside(GEMMA3N_MODEL)
    @m.leave(PLACEHOLDER_MASK)
    def default_to_none(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        params = updated_node.params
        names = tuple(param.name.value for param in params.params)
        if names != ("self", *ARGUMENTS) or params.star_arg is not cst.MaybeSentinel.DEFAULT or params.kwonly_params:
            self.drift(f"its parameters are {', '.join(names)}")
            return updated_node
        arguments = params.params[1:]
        if all(param.default is not None and m.matches(param.default, NONE) for param in arguments):
            self.found_fixed()  # 4.55.1 on
            return updated_node
        if any(param.default is not None for param in arguments):
            self.drift("some of its parameters have defaults, others not")
            return updated_node
        self.rewrote()
        defaulted = [params.params[0], *map(self.default_none, arguments)]
        return updated_node.with_changes(params=params.with_changes(params=defaulted))

    def default_none(self, param: cst.Param) -> cst.Param:
        """``NAME: Optional[TYPE] = None`` (or ``TYPE | None``) for ``NAME: TYPE``."""
        annotation, equal = param.annotation, cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
        if annotation is not None:
            equal = cst.MaybeSentinel.DEFAULT  # ` = `
            kind = annotation.annotation
            if self.optional:
                optional = cst.Subscript(value=cst.Name("Optional"), slice=[cst.SubscriptElement(cst.Index(kind))])
            else:
                optional = cst.BinaryOperation(left=kind, operator=cst.BitOr(), right=cst.Name("None"))
            annotation = annotation.with_changes(annotation=optional)
        return param.with_changes(annotation=annotation, equal=equal, default=cst.Name("None"))
