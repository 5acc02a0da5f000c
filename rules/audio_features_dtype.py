"""audio-features-dtype: Gemma-4 scatters the audio features into the text embeddings without casting them."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule

INPUTS_EMBEDS = m.Name("inputs_embeds")
DEVICE = m.Attribute(value=INPUTS_EMBEDS, attr=m.Name("device"))
DTYPE = m.Attribute(value=INPUTS_EMBEDS, attr=m.Name("dtype"))
MULTIMODAL_MODEL = m.ClassDef(name=m.Name("Gemma4Model"))
AUDIO_MASK = m.Arg(m.Call(func=m.Attribute(value=m.Name("audio_mask"), attr=m.Name("to")), args=[m.Arg(DEVICE)]))
AUDIO_FEATURES_TO = m.Attribute(value=m.Name("audio_features"), attr=m.Name("to"))
# ``inputs_embeds.masked_scatter(audio_mask.to(inputs_embeds.device), audio_features.to(...))``
SCATTERS_AUDIO = m.Call(
    func=m.Attribute(value=INPUTS_EMBEDS, attr=m.Name("masked_scatter")),
    args=[AUDIO_MASK, m.Arg(m.Call(func=AUDIO_FEATURES_TO))],
)
TO_DEVICE = m.Call(func=AUDIO_FEATURES_TO, args=[m.Arg(DEVICE, keyword=None)])
TO_DEVICE_AND_DTYPE = m.Call(func=AUDIO_FEATURES_TO, args=[m.Arg(DEVICE, keyword=None), m.Arg(DTYPE, keyword=None)])


class AudioFeaturesDtypeRule(Rule):
    """``Gemma4Model.forward`` moves the audio features to the device of the text embeddings but, unlike the image
    and video features beside them, does not cast them to their dtype: under autocast (the tower's linears give
    bfloat16, the embedding float32), or with the audio tower kept in another dtype than the text model,
    ``masked_scatter`` raises ``expected self and source to have same dtypes``. Transformers 5.5.0 to 5.14.x.

    Upstream's fix (5.15.0, PR #47482) casts them: ``audio_features.to(inputs_embeds.device, inputs_embeds.dtype)``;
    the rewrite adds that argument. When the dtypes already agree the cast does nothing.
    """

    id = "audio-features-dtype"
    marker = "audio_features.to(inputs_embeds.device)"
    scope = MULTIMODAL_MODEL
    expected = (
        "`inputs_embeds.masked_scatter(audio_mask.to(inputs_embeds.device), audio_features.to(inputs_embeds.device))` "
        "in Gemma4Model"
    )

    BUGGY = '''
        class Gemma4Model(Gemma4PreTrainedModel):
            def forward(self, input_ids, input_features=None, input_features_mask=None, **kwargs):
                inputs_embeds = self.get_input_embeddings()(input_ids)
                if input_features is not None and input_features_mask is not None:
                    audio_features = self.get_audio_features(input_features, input_features_mask).pooler_output
                    inputs_embeds = inputs_embeds.masked_scatter(
                        audio_mask.to(inputs_embeds.device), audio_features.to(inputs_embeds.device)
                    )
                return self.language_model(inputs_embeds=inputs_embeds, **kwargs)
    '''
    PATCHED = BUGGY.replace(
        "audio_features.to(inputs_embeds.device)", "audio_features.to(inputs_embeds.device, inputs_embeds.dtype)"
    )
    FIXED = (PATCHED,)
    DRIFTED = (
        # the features are scattered some other way
        BUGGY.replace("audio_features.to(inputs_embeds.device)", "audio_features.to(inputs_embeds)"),
        # no audio scatter at all
        BUGGY.replace("audio_mask.to(inputs_embeds.device)", "audio_mask"),
    )

    @m.call_if_inside(MULTIMODAL_MODEL)
    @m.leave(SCATTERS_AUDIO)
    def cast_the_features(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        mask, features = updated_node.args
        if m.matches(features.value, TO_DEVICE_AND_DTYPE):
            self.found_fixed()
            return updated_node
        if not m.matches(features.value, TO_DEVICE):
            self.drift("the audio features go to `masked_scatter` neither as `.to(inputs_embeds.device)` nor cast")
            return updated_node
        self.rewrote()
        (device,) = features.value.args
        device = device.with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        cast = features.value.with_changes(args=[device, cst.Arg(cst.parse_expression("inputs_embeds.dtype"))])
        return updated_node.with_changes(args=[mask, features.with_changes(value=cast)])
