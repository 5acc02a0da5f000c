"""audio-outputs-collision: every Gemma-3n audio input crashes on ``'Tensor' object has no attribute
'audio_mel_mask'``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_FORWARD, SELF, assigns

GEMMA3N_MODEL = m.ClassDef(name=m.Name("Gemma3nModel"))
GET_AUDIO_FEATURES = m.Call(func=m.Attribute(value=SELF, attr=m.Name("get_audio_features")))
ENCODE_AUDIO = assigns(m.DoNotCare(), GET_AUDIO_FEATURES)
OUTPUTS = "audio_outputs"  # 5.3.0's name for what get_audio_features returns


def attribute_of(name: str, attr: str) -> m.Attribute:
    return m.Attribute(value=m.Name(name), attr=m.Name(attr))


class AudioOutputsCollisionRule(Rule):
    """From transformers 5.0.0 ``Gemma3nModel.get_audio_features`` returns an output object, and
    ``Gemma3nModel.forward`` unpacks it in three lines that reuse one name::

        audio_features = self.get_audio_features(input_features, ~input_features_mask, return_dict=True)
        audio_features = audio_features.pooler_output
        audio_mask = audio_features.audio_mel_mask

    The second line rebinds ``audio_features`` to the ``pooler_output`` tensor before the third reads the mask
    from it: every input with audio raises ``AttributeError: 'Tensor' object has no attribute 'audio_mel_mask'``
    (5.0.0 to 5.2.0).

    The fix is transformers 5.3.0's (PR #44008): the output object is named ``audio_outputs``, and both reads take
    from it. In 4.x ``get_audio_features`` returns a ``(features, mask)`` tuple, unpacked in one line: the rule
    reports ``not_needed``.
    """

    id = "audio-outputs-collision"
    marker = "audio_mask = audio_features.audio_mel_mask"
    scope = GEMMA3N_MODEL
    expected = (
        "`audio_features = self.get_audio_features(...)`, `audio_features = audio_features.pooler_output`,"
        " `audio_mask = audio_features.audio_mel_mask` in Gemma3nModel.forward"
    )

    BUGGY = '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, input_features=None, input_features_mask=None, **kwargs):
                # Merge text and audio
                if input_features is not None and input_features_mask is not None:
                    audio_features = self.get_audio_features(input_features, ~input_features_mask, return_dict=True)
                    audio_features = audio_features.pooler_output
                    audio_mask = audio_features.audio_mel_mask

                    audio_padding_toks = torch.tensor([[self.vocab_size - 1]], dtype=torch.long, device=audio_features.device)
                    audio_features = torch.where(audio_mask.unsqueeze(-1), audio_padding_embs, audio_features)
    '''
    PATCHED = '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, input_features=None, input_features_mask=None, **kwargs):
                # Merge text and audio
                if input_features is not None and input_features_mask is not None:
                    audio_outputs = self.get_audio_features(input_features, ~input_features_mask, return_dict=True)
                    audio_features = audio_outputs.pooler_output
                    audio_mask = audio_outputs.audio_mel_mask

                    audio_padding_toks = torch.tensor([[self.vocab_size - 1]], dtype=torch.long, device=audio_features.device)
                    audio_features = torch.where(audio_mask.unsqueeze(-1), audio_padding_embs, audio_features)
    '''
    FIXED = (
        PATCHED,
        # 4.x: get_audio_features returns a tuple
        '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, input_features=None, input_features_mask=None, **kwargs):
                if input_features is not None and input_features_mask is not None:
                    audio_features, audio_mask = self.get_audio_features(input_features, ~input_features_mask)
                    audio_features = torch.where(audio_mask.unsqueeze(-1), audio_padding_embs, audio_features)
        ''',
    )
    DRIFTED = (
        # the mask is read some other way
        BUGGY.replace("audio_mask = audio_features.audio_mel_mask", "audio_mask = audio_features.mask"),
        # something between the call and the reads
        BUGGY.replace(
            "audio_features = audio_features.pooler_output\n",
            "audio_features = audio_features.pooler_output\n                    audio_features = audio_features.float()\n",
        ),
        # the name the fix would use is taken
        BUGGY.replace("                # Merge text and audio\n", "                audio_outputs = None\n"),
        # no audio in the forward at all
        '''
        class Gemma3nModel(Gemma3nPreTrainedModel):
            def forward(self, input_ids=None, **kwargs):
                return self.language_model(input_ids)
        ''',
    )

    @m.call_if_inside(GEMMA3N_MODEL)
    @m.call_if_inside(IN_FORWARD)
    @m.leave(m.IndentedBlock())
    def rename_the_outputs(self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock):
        body = list(updated_node.body)
        for at, line in enumerate(body):
            if not m.matches(line, ENCODE_AUDIO):
                continue
            self.parts["call"] += 1
            target = line.body[0].targets[0].target
            if not isinstance(target, cst.Name):
                self.found_fixed()  # 4.x: `audio_features, audio_mask = self.get_audio_features(...)`
                continue
            name, (features, mask) = target.value, (body[at + 1 : at + 3] + [None, None])[:2]
            if not (
                m.matches(features, assigns(m.Name(), attribute_of(name, "pooler_output")))
                and m.matches(mask, assigns(m.Name(), attribute_of(name, "audio_mel_mask")))
            ):
                self.drift(f"the two lines after `{name} = self.get_audio_features(...)` are not these reads")
            elif features.body[0].targets[0].target.value != name:
                self.found_fixed()  # 5.3.0 on: the outputs keep a name of their own
            elif m.findall(self.inside[IN_FORWARD], m.Name(OUTPUTS)):
                self.drift(f"Gemma3nModel.forward already uses the name `{OUTPUTS}`")
            else:
                self.rewrote()
                body[at] = m.replace(line, m.AssignTarget(), lambda node, _: cst.AssignTarget(cst.Name(OUTPUTS)))
                body[at + 1] = m.replace(features, m.Attribute(value=m.Name(name)), self.read_outputs)
                body[at + 2] = m.replace(mask, m.Attribute(value=m.Name(name)), self.read_outputs)
        return updated_node.with_changes(body=body)

    @staticmethod
    def read_outputs(node: cst.Attribute, _) -> cst.Attribute:
        return node.with_changes(value=cst.Name(OUTPUTS))

    def check(self) -> None:
        if not self.parts["call"]:
            self.drift("Gemma3nModel.forward calls no `self.get_audio_features(...)`")
