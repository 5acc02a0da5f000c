"""Optional compiled decoding: ``generate`` gets a static cache, and each decode step runs as compiled graphs of the
whole forward (``"forward"``) or of each decoder layer variant (``"layers"``). Design: docs/compiled.md.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import CodeType, FunctionType

import torch
from torch._dynamo import eval_frame
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.nn.modules import module as nn_module

try:  # dynamo's frame hook, for the direct call (torch 2.13; without these every call goes through the wrapper)
    from torch._C._dynamo.eval_frame import set_eval_frame, set_fullgraph_compiled_frame_count
    from torch._dynamo.types import ConvertFrameReturn, FrameAction, FrameExecStrategy
except ImportError:
    set_eval_frame = None

from rewriter.variants import CompiledVariants, Variant, compile_copy, kv_role, why_compile_cannot_run

logger = logging.getLogger("rewriter")

UNITS = ("forward", "layers")
# a compiler failure, or a variant past dynamo's recompile limit (with fullgraph=True dynamo raises rather than run
# eager: hooks that differ per layer, such as one ``functools.partial`` per layer, give each layer a graph)
COMPILER_FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)
SLIDING_LENGTH = r".*\.cumulative_length_int$"
MASK_MAKER = "create_masks_for_generate"  # what ``generate`` calls on the model for a static cache's 4D masks
INDUCTOR_OPTIONS = {  # why: docs/compiled.md
    "forward": {"size_asserts": False, "cpp_wrapper": True, "cpp_wrapper_build_separate": True},
    "layers": {"size_asserts": False, "cpp_wrapper": True},
}
MODULE = "self"  # the forward's first argument: the module, whose tensors and structure keep their guards
# the module's guards kept besides those on its hooks: every tensor's sizes, strides, dtype and device; each
# module's type and attributes set on the instance; tied parameters
MODULE_GUARDS = frozenset({"TENSOR_MATCH", "TYPE_MATCH", "NOT_PRESENT_IN_GENERIC_DICT", "DUPLICATE_INPUT"})
HOOKS = re.compile(r"\b_\w*hooks\w*")  # a hook dict's name: ``_forward_hooks``, ``_forward_pre_hooks``, ...


def decode_guards(guards) -> list[bool]:
    """Dynamo's ``guard_filter_fn`` for a decode step: which of its guards to keep (docs/compiled.md)."""
    return [_keeps(guard) for guard in guards]


def _keeps(guard) -> bool:
    if HOOKS.search(guard.name):  # a hook dict and the hooks in it (their code, arguments and closures)
        return True
    if guard.is_global:  # the functions and modules the code calls
        return False
    if guard.name == "":  # ambient state: grad mode, autocast, default dtype and device, the shape environment
        return True
    argument = _argument(guard.orig_guard.originating_source)
    return argument is not None and (argument != MODULE or guard.guard_type in MODULE_GUARDS)


def _argument(source) -> str | None:
    """The argument of the compiled function that a guard's source starts from, or ``None``."""
    while hasattr(source, "base"):
        source = source.base
    return getattr(source, "local_name", None)


@dataclass(frozen=True)
class DecodingClasses:
    """The classes compiled decoding touches in a family's modeling module."""

    layer: str  # the decoder layer: its forward is the "layers" unit
    generators: tuple[str, ...]  # the classes ``generate`` runs on: their forward is the "forward" unit


CLASSES = {
    "gemma4": DecodingClasses("Gemma4TextDecoderLayer", ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"))
}


class LayerCache:
    """One layer of a ``StaticCache``, answering ``update`` whatever layer index the attention passes."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)


@dataclass
class CompiledDecoding(CompiledVariants):
    """Each owner's ``forward`` dispatching decode steps on a ``StaticCache`` to the compiled copy of their variant."""

    what = "decoding"
    unit: str
    eager: dict[type, FunctionType]  # owner class -> its own forward
    generators: tuple[type, ...]
    models: dict[int, tuple[weakref.ref, str]] = field(default_factory=dict)  # id(config) -> (config, its number)
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def install(self) -> None:
        self.replaced = {}  # (class, attribute) -> the class's own value before, None where it inherited one
        for owner in self.generators:
            self._replace(owner, "generate", _static_cache_by_default(owner.generate))
            if self.unit == "forward":
                self._replace(owner, MASK_MAKER, staticmethod(_masks_in_the_graph(getattr(owner, MASK_MAKER, None))))
        for owner, eager in self.eager.items():
            self._replace(owner, "forward", self._dispatcher(eager))
        dynamo, compiler = torch._dynamo.config, torch.compiler.config
        settings = {
            (dynamo, "skip_nnmodule_hook_guards"): False,  # a hook registered after the first step is seen
            # a sliding cache layer counts its tokens in a Python int: symbolic from the first graph, not a recompile
            (compiler, "dynamic_sources"): ",".join(filter(None, (compiler.dynamic_sources, SLIDING_LENGTH))),
        }
        if self.unit == "layers":
            settings[dynamo, "allow_unspec_int_on_nn_module"] = True  # layer indices vary without new graphs
        self.settings = {setting: getattr(*setting) for setting in settings}  # (config, name) -> its value before
        for (config, name), value in settings.items():
            setattr(config, name, value)

    def uninstall(self) -> None:
        for (owner, name), own in self.replaced.items():
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        for (config, name), value in self.settings.items():
            setattr(config, name, value)

    def _replace(self, owner: type, name: str, value) -> None:
        self.replaced[owner, name] = owner.__dict__.get(name)
        setattr(owner, name, value)

    def _dispatcher(self, eager: FunctionType):
        from transformers import StaticCache

        compiled, layers = self, self.unit == "layers"

        @functools.wraps(eager)
        def forward(module, *args, **kwargs):
            cache = kwargs.get("past_key_values")
            tokens = args[0] if args else kwargs.get("input_ids")
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            decoding = type(cache) is StaticCache and tokens.shape[1] == 1 and not module.training
            decoding = decoding and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
            if compiled.failure is not None or not decoding:
                return eager(module, *args, **kwargs)
            model = (compiled._number(module.config), module.config._attn_implementation)  # what no guard checks
            if layers:
                attention = module.self_attn
                key = (*model, attention.layer_type, attention.is_kv_shared_layer, attention.store_full_length_kv,
                       len(tokens))
                # KV-shared layers read shared K/V and never touch the cache (it has no layers for them)
                view = None if attention.is_kv_shared_layer else LayerCache(cache.layers[module.layer_idx])
                call = {**kwargs, "past_key_values": view}
            else:
                key, call = (*model, type(module), len(tokens)), kwargs
            variant = compiled.variants.get(key) or compiled._add_variant(key, module, tokens, eager)
            try:
                return variant.function(module, *args, **call)
            except COMPILER_FAILURES as error:  # never a model error
                compiled.fail(error)
                return eager(module, *args, **kwargs)

        return forward

    def _number(self, config) -> str:
        """The number of the model whose config this is: each model's variants are its own (docs/compiled.md)."""
        known = self.models.get(id(config))
        if known is None or known[0]() is not config:  # a new config, perhaps where a collected one lived
            known = self.models[id(config)] = (weakref.ref(config), f"#{next(self.numbers)}")
        return known[1]

    def _add_variant(self, key: tuple, module, tokens: torch.Tensor, eager: FunctionType) -> Variant:
        if self.unit == "layers":
            attention = module.self_attn
            why = {"unit": "layer", "layer": attention.layer_type, "kv": kv_role(attention)}
        else:
            why = {"unit": "forward", "model": type(module).__name__}
        why.update(config=key[0], attention=key[1], batch=str(len(tokens)))
        options = {**INDUCTOR_OPTIONS[self.unit], "guard_filter_fn": decode_guards}  # torch.compile pops the filter
        variant = compile_copy(eager, why, fullgraph=True, options=options)
        variant.function = direct_call(variant.function, variant.code)
        self.variants[key] = variant
        return variant


class NoGraph(Exception):
    """No graph of a compiled copy passes its guards for this call; raised by dynamo's frame hook before the frame
    runs."""


def direct_call(compiled, code: CodeType):
    """``compiled`` (``torch.compile(fullgraph=True)`` of a copy whose code object is ``code``) called straight
    through dynamo's frame hook where a graph's guards pass, as its wrapper calls it (docs/compiled.md); the
    wrapper itself, which compiles, where none does, and while dynamo traces or a stance other than the default
    is set."""
    copy = getattr(compiled, "__wrapped__", None)  # torch.compile's wrapper is functools.wraps of the copy
    if set_eval_frame is None or copy is None or copy.__code__ is not code:  # no hook, or dynamo is off
        return compiled
    run_uncached = ConvertFrameReturn(FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT), apply_to_code=False)

    def on_miss(frame, cache_entry, frame_state) -> ConvertFrameReturn:
        if frame.f_code is code:
            raise NoGraph
        return run_uncached  # any other frame (none reaches the hook today): run it as it is, remember nothing

    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or not _default_stance():  # dynamo inlines the wrapper, which applies a stance
            return compiled(*args, **kwargs)
        # as the wrapper of a fullgraph copy does: the frames a graph calls (its runtime wrappers) skip the hook
        count = set_fullgraph_compiled_frame_count(0)
        prior = set_eval_frame(on_miss)
        try:
            return copy(*args, **kwargs)
        except NoGraph:
            pass
        finally:
            set_eval_frame(prior)
            set_fullgraph_compiled_frame_count(count)
        result = compiled(*args, **kwargs)  # compiles
        entries = _debug_get_cache_entry_list(code)
        if entries:  # dynamo matches a graph to the backend that compiled it, found through this attribute
            on_miss._torchdynamo_orig_backend = entries[0].backend
        return result

    return call


def _default_stance() -> bool:
    """Whether no ``torch.compiler.set_stance`` is in force: another stance, a forced backend or skipped guards."""
    stance = eval_frame._stance
    return stance.stance == "default" and stance.backend is None and not stance.skip_guard_eval_unsafe


def _masks_in_the_graph(make_masks):
    """``generate``'s mask maker, leaving a decode step's masks to the compiled forward: it gets the 2D mask padded
    to the static cache's length (a fixed shape) and builds the 4D masks in its graph, not in Python per token."""
    from transformers import StaticCache
    from transformers.masking_utils import create_masks_for_generate

    make_masks = make_masks or create_masks_for_generate

    @functools.wraps(make_masks)
    def masks(config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs):
        if type(past_key_values) is StaticCache and inputs_embeds.shape[1] == 1 and attention_mask is not None:
            padding = past_key_values.max_cache_len - attention_mask.shape[-1]
            if padding >= 0:
                return torch.nn.functional.pad(attention_mask, (0, padding))
        return make_masks(config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs)

    return masks


def _static_cache_by_default(generate):
    @functools.wraps(generate)
    def static_generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        if "past_key_values" not in kwargs and kwargs.get("cache_implementation", config.cache_implementation) is None:
            kwargs["cache_implementation"] = "static"
            kwargs.setdefault("disable_compile", "compile_config" not in kwargs)  # our graphs, not a second compile
        return generate(self, *args, **kwargs)

    return static_generate


def compile_decoding(family: str, module_name: str, unit: str) -> tuple[CompiledDecoding | None, str]:
    """Install compiled decoding of ``unit`` on ``family``'s classes; (installed, status) or (None, why not)."""
    reason = why_compile_cannot_run()
    if reason is not None:
        logger.warning("rewriter: decoding stays eager: %s", reason)
        return None, f"eager ({reason})"
    module, names = importlib.import_module(module_name), CLASSES[family]
    generators = tuple(getattr(module, name) for name in names.generators)
    owners = generators if unit == "forward" else (getattr(module, names.layer),)
    compiled = CompiledDecoding(unit, {owner: owner.__dict__["forward"] for owner in owners}, generators)
    compiled.install()
    return compiled, f"compiled {unit}"
