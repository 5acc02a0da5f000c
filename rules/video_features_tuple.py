"""video-features-tuple: every Gemma-4 video input crashes on ``'tuple' object has no attribute 'to'``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, SELF

GEMMA4_MODEL = m.ClassDef(name=m.Name("Gemma4Model"))
GET_VIDEO_FEATURES = m.FunctionDef(name=m.Name("get_video_features"))
VIDEO_FEATURES = m.Name("video_features")


def pooler_output_set_to(value: m.BaseExpression) -> m.Assign:
    """``<outputs>.pooler_output = VALUE``, for a VALUE that ``value`` matches."""
    return m.Assign(targets=[m.AssignTarget(m.Attribute(attr=m.Name("pooler_output")))], value=value)


# 5.15.0 on: one tensor of features per video
POOLER_OUTPUT_PER_VIDEO = pooler_output_set_to(
    m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("split")))
)
# 5.5.0 to 5.14.1: the features of every video in one tensor
POOLER_OUTPUT_TENSOR = pooler_output_set_to(m.Call(func=m.Attribute(value=SELF, attr=m.Name("embed_vision"))))
# `video_features = video_features.to(...)`
CAST_AS_IS = m.Assign(
    targets=[m.AssignTarget(VIDEO_FEATURES)],
    value=m.Call(func=m.Attribute(value=VIDEO_FEATURES, attr=m.Name("to"))),
)
# 5.15.1 on: `video_features = torch.cat(..., dim=0).to(...)`
CONCATENATE_THEN_CAST = m.Assign(
    targets=[m.AssignTarget(VIDEO_FEATURES)],
    value=m.Call(
        func=m.Attribute(
            value=m.Call(
                func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat")),
                args=[m.Arg(keyword=None), m.Arg(keyword=m.Name("dim"), value=m.Integer("0"))],
            ),
            attr=m.Name("to"),
        )
    ),
)


class VideoFeaturesTupleRule(Rule):
    """In transformers 5.15.0 ``Gemma4Model.get_video_features`` started returning one tensor of features per video
    (``pooler_output = torch.split(...)``, a tuple), but ``Gemma4Model.forward`` kept casting what it gets with
    ``video_features.to(...)``: every input with ``pixel_values_videos`` raises
    ``AttributeError: 'tuple' object has no attribute 'to'`` (5.15.0 only).

    The fix is transformers 5.15.1's: ``torch.cat(video_features, dim=0).to(...)``. The same ``.to`` line is right
    from 5.5.0 to 5.14.1, where ``get_video_features`` returns one tensor: the rule rewrites it only where
    ``get_video_features`` in the same class splits its output.
    """

    id = "video-features-tuple"
    marker = "class Gemma4Model("
    scope = GEMMA4_MODEL
    expected = (
        "`video_features = video_features.to(...)` in Gemma4Model.forward, with get_video_features setting"
        " `pooler_output` to `torch.split(...)` or `self.embed_vision(...)`"
    )

    BUGGY = '''
        class Gemma4Model(Gemma4PreTrainedModel):
            def forward(self, input_ids=None, pixel_values_videos=None, video_position_ids=None, **kwargs):
                if pixel_values_videos is not None:
                    video_features = self.get_video_features(
                        pixel_values_videos, video_position_ids, return_dict=True
                    ).pooler_output
                    video_features = video_features.to(inputs_embeds.device, inputs_embeds.dtype)

            def get_video_features(self, pixel_values_videos, video_position_ids=None, **kwargs):
                vision_outputs = self.vision_tower(pixel_values=pixel_values_videos.flatten(0, 1), **kwargs)
                pooler_output = self.embed_vision(inputs_embeds=vision_outputs.last_hidden_state)
                vision_outputs.pooler_output = torch.split(pooler_output, split_sizes)
                return vision_outputs
    '''
    PATCHED = '''
        class Gemma4Model(Gemma4PreTrainedModel):
            def forward(self, input_ids=None, pixel_values_videos=None, video_position_ids=None, **kwargs):
                if pixel_values_videos is not None:
                    video_features = self.get_video_features(
                        pixel_values_videos, video_position_ids, return_dict=True
                    ).pooler_output
                    video_features = torch.cat(video_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)

            def get_video_features(self, pixel_values_videos, video_position_ids=None, **kwargs):
                vision_outputs = self.vision_tower(pixel_values=pixel_values_videos.flatten(0, 1), **kwargs)
                pooler_output = self.embed_vision(inputs_embeds=vision_outputs.last_hidden_state)
                vision_outputs.pooler_output = torch.split(pooler_output, split_sizes)
                return vision_outputs
    '''
    FIXED = (
        PATCHED,
        # 5.5.0 to 5.14.1: get_video_features returns one tensor, which the same `.to` line casts rightly
        BUGGY.replace(
            "vision_outputs.pooler_output = torch.split(pooler_output, split_sizes)",
            "vision_outputs.pooler_output = self.embed_vision(inputs_embeds=vision_outputs.last_hidden_state)",
        ),
        # 5.18.0 on: the encoder outputs are kept, and concatenated where they are cast
        '''
        class Gemma4Model(Gemma4PreTrainedModel):
            def forward(self, input_ids=None, pixel_values_videos=None, mm_encoder_outputs=None, **kwargs):
                if mm_encoder_outputs.get("video") is not None:
                    video_features = torch.cat(mm_encoder_outputs["video"].pooler_output, dim=0).to(
                        inputs_embeds.device, inputs_embeds.dtype
                    )

            def get_video_features(self, pixel_values_videos, video_position_ids=None, **kwargs):
                vision_outputs.pooler_output = torch.split(pooler_output, split_sizes)
                return vision_outputs
        ''',
    )
    DRIFTED = (
        # get_video_features makes its output some third way: a tuple or not, the rule cannot tell
        BUGGY.replace("torch.split(pooler_output, split_sizes)", "pooler_output.unbind(0)"),
        # no get_video_features in the class
        BUGGY.replace("def get_video_features(", "def encode_videos("),
    )

    def __init__(self) -> None:
        super().__init__()
        self.per_video = self.one_tensor = False  # what get_video_features sets pooler_output to

    @m.visit(GEMMA4_MODEL)
    def note_what_get_video_features_returns(self, node: cst.ClassDef) -> None:
        for method in node.body.body:
            if m.matches(method, GET_VIDEO_FEATURES):
                self.per_video = bool(m.findall(method, POOLER_OUTPUT_PER_VIDEO))
                self.one_tensor = bool(m.findall(method, POOLER_OUTPUT_TENSOR))

    @m.call_if_inside(IN_FORWARD)
    @m.visit(CONCATENATE_THEN_CAST)
    def note_concatenation(self, node: cst.Assign) -> None:
        self.found_fixed()

    @m.call_if_inside(IN_FORWARD)
    @m.leave(CAST_AS_IS)
    def concatenate_then_cast(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        if self.per_video == self.one_tensor:
            self.drift("Gemma4Model.get_video_features sets `pooler_output` to neither (or both) of these")
            return updated_node
        if self.one_tensor:
            self.found_fixed()  # 5.5.0 to 5.14.1: the features are one tensor already
            return updated_node
        self.rewrote()
        cast = updated_node.value.func
        concatenated = cst.parse_expression("torch.cat(video_features, dim=0)")
        cast = cast.with_changes(value=concatenated)
        return updated_node.with_changes(value=updated_node.value.with_changes(func=cast))
