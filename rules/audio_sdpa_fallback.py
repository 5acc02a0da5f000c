"""audio-sdpa-fallback: an explicit ``attn_implementation="sdpa"`` refuses to build a Gemma-4 model with audio."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from rewriter.rule import Rule
from rewriter.rules.matchers import IN_INIT

AUDIO_MODEL = m.ClassDef(name=m.Name("Gemma4AudioModel"))
CONFIG = m.Name("config")
# the class attribute with which 5.20.0 refuses SDPA (and the flags set with it)
SDPA_UNSUPPORTED = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Name("_supports_sdpa"))], value=m.Name("False"))]
)
SUPER_INIT = m.SimpleStatementLine(
    body=[
        m.Expr(
            m.Call(
                func=m.Attribute(value=m.Call(func=m.Name("super"), args=[]), attr=m.Name("__init__")),
                args=[m.Arg(CONFIG, keyword=None)],
            )
        )
    ]
)
ATTN_IMPLEMENTATION = m.Attribute(value=CONFIG, attr=m.Name(m.MatchRegex(r"_attn_implementation(_internal)?")))
EAGER = m.SimpleString(m.MatchRegex(r"""(["'])eager\1"""))
FORCES_EAGER = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(ATTN_IMPLEMENTATION)], value=EAGER)])
# the upstream-style fix: the tower resolves every requested implementation itself
RESOLVES_ITS_OWN = m.FunctionDef(name=m.Name("_check_and_adjust_attn_implementation"))
EAGER_ONLY = (
    "# The chunked local attention takes eager's mask only: eager whatever the model asked for (sdpa, flex)\n"
    'config._attn_implementation_internal = "eager"\n'
)


class AudioSdpaFallbackRule(Rule):
    """From transformers 5.20.0 ``Gemma4AudioModel`` sets ``_supports_sdpa = False`` (and flex, flash and attention
    backends likewise): its hand-written chunked attention now takes the eager (additive float) mask. A model built
    with no ``attn_implementation`` falls back to eager for the audio tower, but an explicit ``"sdpa"`` or
    ``"flex_attention"`` reaches the audio sub-config too, and ``PreTrainedModel.__init__`` raises ``ValueError``.

    The fix sets the audio config's implementation to eager before ``super().__init__(config)`` checks it: the
    audio tower runs eager whatever the model was asked for, the text and vision towers keep what was asked.
    (Upstream would override ``_check_and_adjust_attn_implementation``; the installer cannot add a method.)
    Before 5.20.0 the tower supports SDPA and its mask is boolean, so forcing eager there would invert it: the rule
    reports ``not_needed``. Not fixed upstream as of 5.25.0.
    """

    id = "audio-sdpa-fallback"
    marker = "class Gemma4AudioModel("
    scope = AUDIO_MODEL
    expected = "`super().__init__(config)` in `__init__` of a Gemma4AudioModel that sets `_supports_sdpa = False`"

    BUGGY = '''
        class Gemma4AudioModel(Gemma4PreTrainedModel):
            """An audio encoder."""

            config: Gemma4AudioConfig
            main_input_name = "input_features"
            # The chunked local attention is only implemented in eager
            _supports_flash_attn = False
            _supports_sdpa = False
            _supports_flex_attn = False

            def __init__(self, config: Gemma4AudioConfig):
                super().__init__(config)
                self.config = config
                self.layers = nn.ModuleList([Gemma4AudioLayer(config, i) for i in range(config.num_hidden_layers)])
                self.post_init()

            def forward(self, input_features, attention_mask=None, **kwargs):
                return self.layers(input_features)
    '''
    PATCHED = '''
        class Gemma4AudioModel(Gemma4PreTrainedModel):
            """An audio encoder."""

            config: Gemma4AudioConfig
            main_input_name = "input_features"
            # The chunked local attention is only implemented in eager
            _supports_flash_attn = False
            _supports_sdpa = False
            _supports_flex_attn = False

            def __init__(self, config: Gemma4AudioConfig):
                # The chunked local attention takes eager's mask only: eager whatever the model asked for (sdpa, flex)
                config._attn_implementation_internal = "eager"
                super().__init__(config)
                self.config = config
                self.layers = nn.ModuleList([Gemma4AudioLayer(config, i) for i in range(config.num_hidden_layers)])
                self.post_init()

            def forward(self, input_features, attention_mask=None, **kwargs):
                return self.layers(input_features)
    '''
    FIXED = (
        # 5.5.0 to 5.19.0: the tower supports SDPA (its mask is boolean); forcing eager would invert the mask
        '''
        class Gemma4AudioModel(Gemma4PreTrainedModel):
            config: Gemma4AudioConfig
            main_input_name = "input_features"

            def __init__(self, config: Gemma4AudioConfig):
                super().__init__(config)
                self.config = config
                self.post_init()
        ''',
        # the tower resolves the implementation itself, as an upstream fix would
        '''
        class Gemma4AudioModel(Gemma4PreTrainedModel):
            _supports_sdpa = False

            def __init__(self, config: Gemma4AudioConfig):
                super().__init__(config)
                self.post_init()

            def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
                return "eager"
        ''',
    )
    DRIFTED = (
        # no `super().__init__(config)` to put the setting before
        BUGGY.replace("super().__init__(config)", "super().__init__(config, *inputs)"),
        # no __init__ of its own
        '''
        class Gemma4AudioModel(Gemma4PreTrainedModel):
            _supports_sdpa = False

            def forward(self, input_features, attention_mask=None, **kwargs):
                return self.layers(input_features)
        ''',
        # no Gemma4AudioModel at all
        '''
        class Gemma4SpeechModel(Gemma4PreTrainedModel):
            _supports_sdpa = False

            def __init__(self, config):
                super().__init__(config)
        ''',
    )

    @m.leave(AUDIO_MODEL)
    def force_eager(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        body = updated_node.body.body
        if not any(m.matches(statement, SDPA_UNSUPPORTED) for statement in body):
            self.found_fixed()  # the tower takes SDPA's boolean mask: an explicit "sdpa" builds
            return updated_node
        if any(m.matches(statement, RESOLVES_ITS_OWN) for statement in body):
            self.found_fixed()
            return updated_node
        init = next((statement for statement in body if m.matches(statement, IN_INIT)), None)
        if init is None:
            self.drift("Gemma4AudioModel has no `__init__`")
            return updated_node
        lines = list(init.body.body)
        at = next((index for index, line in enumerate(lines) if m.matches(line, SUPER_INIT)), None)
        if at is None:
            self.drift("`Gemma4AudioModel.__init__` has no `super().__init__(config)`")
            return updated_node
        if any(m.matches(line, FORCES_EAGER) for line in lines[:at]):
            self.found_fixed()
            return updated_node
        self.rewrote()
        lines.insert(at, cst.parse_statement(EAGER_ONLY, config=self.module.config_for_parsing))
        new_init = init.with_changes(body=init.body.with_changes(body=lines))
        body = [new_init if statement is init else statement for statement in body]
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))
