"""The model families rewriter knows, and the transformers each one can patch."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from rewriter.releases import RELEASES
from rewriter.report import UnsupportedTransformersError


@dataclass(frozen=True)
class Family:
    """A model family: the transformers releases it supports, and the files it patches with the rules bound to each.

    ``files`` maps each file (relative to the transformers package) to the rules that run on it, in order, as
    ``"module:Class"`` names, so that reading a family never imports LibCST. One rule class serves every file that
    has its bug, in any family.
    ``requires`` names families whose fixes this one's rely on, or that its users meet anyway (``trainer``).
    ``opt_in`` maps each feature a user may ask for (``compile(family, fused_loss=True)``) to the rules it adds after
    a file's own; ``features`` names those this family includes (``with_features``).
    """

    name: str
    supported: str
    files: dict[str, tuple[str, ...]]
    attention: tuple[str, str] | None = None  # the file and class of the text attention ``compile_attention`` compiles
    requires: tuple[str, ...] = ()  # families patched, when the program imports their module, with this one
    opt_in: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    features: tuple[str, ...] = ()

    def with_features(self, *features: str) -> Family:
        """This family with the rules of ``features`` (names of ``opt_in``) added; ``ValueError`` for another."""
        if unknown := sorted(set(features) - set(self.opt_in)):
            offered = ", ".join(sorted(self.opt_in)) or "none"
            raise ValueError(f"{self.name} has no feature {', '.join(unknown)} (its features: {offered})")
        chosen = tuple(sorted(set(features)))
        files = {
            target: rules + tuple(rule for feature in chosen for rule in self.opt_in[feature].get(target, ()))
            for target, rules in self.files.items()
        }
        return replace(self, files=files, features=chosen)

    def with_every_feature(self) -> Family:
        """This family with every rule it has, opt-in ones included."""
        return self.with_features(*self.opt_in)

    @property
    def label(self) -> str:
        """The name, and the features it includes: ``gemma4+fused-loss``."""
        return "+".join((self.name, *self.features))

    def supports(self, version: str) -> bool:
        """Whether the rules know transformers ``version``: inside ``supported``."""
        return Version(version) in SpecifierSet(self.supported)

    @property
    def releases(self) -> tuple[str, ...]:
        """The releases of ``rewriter.releases.RELEASES`` this family supports: checked and shipped, oldest first."""
        return tuple(release for release in RELEASES if self.supports(release))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def entry_modules(self) -> tuple[str, ...]:
        """The modules whose import means the program uses this family: its model's files (modeling, processing),
        else its only file's."""
        models = [target for target in self.files if target.startswith("models/")] or [self.targets[0]]
        return tuple(map(module_name, models))

    def rules(self) -> tuple[tuple[str, type], ...]:
        """``(file, rule class)`` in the order they run. Imports LibCST."""
        return tuple((target, _load(rule)) for target, rules in self.files.items() for rule in rules)

    def code_files(self) -> tuple[Path, ...]:
        """The files whose text decides a cache entry's content: every rule module (rules share code), the engine
        that runs and plans them, and what patched code imports."""
        rules = Path(importlib.util.find_spec("rewriter.rules").origin).parent
        engine = (
            importlib.util.find_spec(f"rewriter.{name}").origin
            for name in ("rule", "engine", "install", "kv_sharing", "fused_loss")
        )
        return (*sorted(rules.glob("*.py")), *map(Path, engine))


def _load(rule: str) -> type:
    module, _, name = rule.partition(":")
    return getattr(importlib.import_module(module), name)


KV_SHARED_SLICE = "rewriter.rules.kv_shared_slice:KVSharedSliceRule"
GEMMA4_KV_SHARING_WITHOUT_CACHE = "rewriter.rules.kv_sharing_without_cache:Gemma4KVSharingWithoutCacheRule"
GEMMA3N_KV_SHARING_WITHOUT_CACHE = "rewriter.rules.kv_sharing_without_cache:Gemma3nKVSharingWithoutCacheRule"
KV_SHARING_FSDP2 = "rewriter.rules.kv_sharing_fsdp2:KVSharingFSDP2Rule"  # after a model's kv-sharing-without-cache
INPUT_PROJ_DEQUANT = "rewriter.rules.input_proj_dequant:InputProjDequantRule"
ROTARY_BUFFER_ORDER = "rewriter.rules.rotary_buffer_order:RotaryBufferOrderRule"
ROTARY_COMPUTE_ORDER = "rewriter.rules.rotary_compute_order:RotaryComputeOrderRule"
TEXT_ONLY_TRAINING = "rewriter.rules.text_only_training:TextOnlyTrainingRule"
LOSS_ACCUMULATION = "rewriter.rules.loss_accumulation:LossAccumulationRule"
FP16_VISION_POOLER = "rewriter.rules.fp16_vision_pooler:FP16VisionPoolerRule"
PER_LAYER_INPUTS_FROM_EMBEDS = "rewriter.rules.per_layer_inputs_from_embeds:PerLayerInputsFromEmbedsRule"
TEXT_ONLY_OUTPUT_PROPERTIES = "rewriter.rules.text_only_output_properties:TextOnlyOutputPropertiesRule"
FLASH_ATTENTION_IMAGE_MASK = "rewriter.rules.flash_attention_image_mask:FlashAttentionImageMaskRule"
PROCESSOR_DOUBLE_BOS = "rewriter.rules.processor_double_bos:ProcessorDoubleBosRule"
AUDIO_SDPA_FALLBACK = "rewriter.rules.audio_sdpa_fallback:AudioSdpaFallbackRule"
AUDIO_EAGER_MASK = "rewriter.rules.audio_eager_mask:AudioEagerMaskRule"
AUDIO_FEATURES_DTYPE = "rewriter.rules.audio_features_dtype:AudioFeaturesDtypeRule"
AUDIO_QUANTIZED_WEIGHTS = "rewriter.rules.audio_quantized_weights:AudioQuantizedWeightsRule"
ROUTER_SOFTMAX_FLOAT32 = "rewriter.rules.router_softmax_float32:RouterSoftmaxFloat32Rule"
SDPA_GQA_HEAD_DIM = "rewriter.rules.sdpa_gqa_head_dim:SdpaGqaHeadDimRule"
PER_LAYER_INPUTS_NONE = "rewriter.rules.per_layer_inputs_none:PerLayerInputsNoneRule"
VIDEO_FEATURES_TUPLE = "rewriter.rules.video_features_tuple:VideoFeaturesTupleRule"
PLACEHOLDER_MASK_DEFAULTS = "rewriter.rules.placeholder_mask_defaults:PlaceholderMaskDefaultsRule"
AUDIO_OUTPUTS_COLLISION = "rewriter.rules.audio_outputs_collision:AudioOutputsCollisionRule"
IMAGE_BIDIRECTIONAL_MASK = "rewriter.rules.image_bidirectional_mask:ImageBidirectionalMaskRule"
SOFTCAP_SDPA = "rewriter.rules.softcap_sdpa:SoftcapSdpaRule"
ACCUMULATION_DOUBLE_DIVISION = "rewriter.rules.accumulation_double_division:AccumulationDoubleDivisionRule"
FUSED_LOSS = "rewriter.rules.fused_loss:FusedLossRule"


def fused_loss(modeling: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """The opt-in fused loss of a family's LM heads, run after the fixes of their file (``modeling``)."""
    return {"fused-loss": {modeling: (FUSED_LOSS,)}}


FAMILIES = {
    "gemma2": Family(
        name="gemma2",
        supported=">=4.53,<6",
        files={"models/gemma2/modeling_gemma2.py": (SOFTCAP_SDPA,)},
        requires=("trainer",),
        opt_in=fused_loss("models/gemma2/modeling_gemma2.py"),
    ),
    "gemma3": Family(
        name="gemma3",
        supported=">=4.53,<6",
        files={
            "models/gemma3/modeling_gemma3.py": (
                ROTARY_BUFFER_ORDER,
                ROTARY_COMPUTE_ORDER,
                TEXT_ONLY_TRAINING,
                LOSS_ACCUMULATION,
                TEXT_ONLY_OUTPUT_PROPERTIES,
                FLASH_ATTENTION_IMAGE_MASK,
            ),
            "models/gemma3/processing_gemma3.py": (PROCESSOR_DOUBLE_BOS,),
        },
        requires=("trainer",),
        opt_in=fused_loss("models/gemma3/modeling_gemma3.py"),
    ),
    "gemma3n": Family(
        name="gemma3n",
        supported=">=4.53,<6",
        files={
            "models/gemma3n/modeling_gemma3n.py": (
                ROTARY_BUFFER_ORDER,
                ROTARY_COMPUTE_ORDER,
                GEMMA3N_KV_SHARING_WITHOUT_CACHE,
                KV_SHARING_FSDP2,
                PER_LAYER_INPUTS_FROM_EMBEDS,
                LOSS_ACCUMULATION,
                TEXT_ONLY_OUTPUT_PROPERTIES,
                PLACEHOLDER_MASK_DEFAULTS,
                AUDIO_OUTPUTS_COLLISION,
            ),
            "models/gemma3n/processing_gemma3n.py": (PROCESSOR_DOUBLE_BOS,),
        },
        requires=("trainer",),
        opt_in=fused_loss("models/gemma3n/modeling_gemma3n.py"),
    ),
    "gemma4": Family(
        name="gemma4",
        supported=">=5.5,<6",
        files={
            "cache_utils.py": (KV_SHARED_SLICE,),
            "integrations/sdpa_attention.py": (SDPA_GQA_HEAD_DIM,),
            "models/gemma4/modeling_gemma4.py": (
                GEMMA4_KV_SHARING_WITHOUT_CACHE,
                KV_SHARING_FSDP2,
                INPUT_PROJ_DEQUANT,
                ROTARY_BUFFER_ORDER,
                ROTARY_COMPUTE_ORDER,
                TEXT_ONLY_TRAINING,
                LOSS_ACCUMULATION,
                FP16_VISION_POOLER,
                PER_LAYER_INPUTS_FROM_EMBEDS,
                TEXT_ONLY_OUTPUT_PROPERTIES,
                AUDIO_SDPA_FALLBACK,
                AUDIO_EAGER_MASK,
                AUDIO_FEATURES_DTYPE,
                AUDIO_QUANTIZED_WEIGHTS,
                ROUTER_SOFTMAX_FLOAT32,
                IMAGE_BIDIRECTIONAL_MASK,
                PER_LAYER_INPUTS_NONE,
                VIDEO_FEATURES_TUPLE,
            ),
        },
        attention=("models/gemma4/modeling_gemma4.py", "Gemma4TextAttention"),
        requires=("trainer",),
        opt_in=fused_loss("models/gemma4/modeling_gemma4.py"),
    ),
    # Not a model: Trainer's own bug, which every family's fine-tuning meets (gemma4's loss fix relies on it).
    "trainer": Family(
        name="trainer",
        supported=">=4.53,<6",
        files={"trainer.py": (ACCUMULATION_DOUBLE_DIVISION,)},
    ),
}


def get_family(name: str, *, fused_loss: bool = False) -> Family:
    """The family called ``name``, with its opt-in fused loss when asked; ``ValueError`` for an unknown one."""
    try:
        family = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}") from None
    return family.with_features("fused-loss") if fused_loss else family


def module_name(target: str) -> str:
    """``models/gemma4/modeling_gemma4.py`` -> ``transformers.models.gemma4.modeling_gemma4``."""
    return "transformers." + target.removesuffix(".py").replace("/", ".")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_package() -> Path:
    """The installed transformers package folder, found without importing it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedTransformersError("transformers is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def installed_transformers(family: Family) -> tuple[str, Path]:
    """The installed transformers version and package folder, checked against what ``family`` supports."""
    version = installed_version()
    if version is None or importlib.util.find_spec("transformers") is None:
        raise UnsupportedTransformersError(
            f"transformers is not installed; {family.name} needs transformers{family.supported}"
        )
    if not family.supports(version):
        raise UnsupportedTransformersError(
            f"transformers {version} is installed; {family.name} supports transformers{family.supported}"
        )
    package = installed_package()
    check_sources(family, package, f"transformers {version} at {package}")
    return version, package


def check_sources(family: Family, package: Path, what: str) -> None:
    missing = [target for target in family.targets if not (package / target).is_file()]
    if missing:
        raise UnsupportedTransformersError(f"{what} has no {', '.join(missing)}: it does not ship {family.name}")


def read_sources(family: Family, package: Path) -> dict[str, str]:
    """The text of each file the family's rules rewrite, from a transformers package folder."""
    check_sources(family, package, f"the transformers folder {package}")
    return {target: (package / target).read_text(encoding="utf-8") for target in family.targets}
