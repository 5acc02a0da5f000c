"""Optional ``torch.compile`` of a family's text attention that stays under dynamo's recompile limit.

Compiling the attention forward once for all layers fails quietly: every layer kind (sliding or full, with other
head sizes), every cache type and both phases of ``generate`` need their own graph, dynamo counts them all against
one code object, hits its recompile limit (8) and runs eager. Here each *variant* of a call (layer kind, its role
in KV sharing, the cache type, prefill or decode, training or not) gets its own copy of the forward's code object,
so each copy compiles only the graphs of its variant. Cache updates stay eager (a graph break), so layers of one
kind share their graphs instead of specialising on their index.
"""

from __future__ import annotations

import functools
import importlib
import logging
import shutil
from dataclasses import dataclass, field
from types import FunctionType

import torch

logger = logging.getLogger("rewriter")


def why_compile_cannot_run() -> str | None:
    """Why ``torch.compile`` with inductor cannot run here, or ``None`` when it can."""
    try:
        import torch._dynamo
        from torch._inductor import cpp_builder

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as error:  # any import or probe failure means: no compiler stack
        return f"torch.compile is unavailable: {error}"
    if shutil.which(compiler) is None:
        return f"inductor needs a C++ compiler for CPU code and {compiler!r} was not found"
    return None


@dataclass
class Variant:
    """One compiled copy of the forward, for one kind of call."""

    why: dict[str, str]
    function: object
    code: object

    @property
    def graphs(self) -> int:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.code))


def kv_role(attention) -> str:
    """A text attention's part in KV sharing: reads shared K/V, stores them for the layers that do, or its own."""
    return "shared" if attention.is_kv_shared_layer else "stores shared" if attention.store_full_length_kv else "own"


def compile_copy(eager: FunctionType, why: dict[str, str], **options) -> Variant:
    """``torch.compile`` of a copy of ``eager`` whose code object is its own: its own dynamo cache and recompile
    limit, and its own name (``forward[layer full_attention own 4]``), as dynamo shares what it learnt about sizes
    between code objects of one name: a variant compiled after another with other sizes (a batch of 4 after a
    batch of 1, a full layer's head size after a sliding one's) would get a first graph dynamic in those sizes,
    with slower kernels, where a static one was asked for."""
    code = eager.__code__.replace(co_name=f"{eager.__name__}[{' '.join(why.values())}]")
    copy = FunctionType(code, eager.__globals__, eager.__name__, eager.__defaults__, eager.__closure__)
    copy.__kwdefaults__ = eager.__kwdefaults__
    return Variant(why, torch.compile(copy, **options), code)


@dataclass
class CompiledAttention:
    """Gemma4TextAttention.forward, dispatching each call to the compiled copy of its variant."""

    owner: type
    eager: FunctionType
    variants: dict[tuple, Variant] = field(default_factory=dict)
    failure: str | None = None

    def install(self) -> None:
        """Dispatch the forward; keep cache updates eager; let layer indices vary without new graphs."""
        from transformers.cache_utils import Cache

        self.eager_update, self.unspec_ints = Cache.update, torch._dynamo.config.allow_unspec_int_on_nn_module
        Cache.update = torch.compiler.disable(Cache.update)
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        self.owner.forward = self._dispatcher()

    def uninstall(self) -> None:
        from transformers.cache_utils import Cache

        Cache.update, torch._dynamo.config.allow_unspec_int_on_nn_module = self.eager_update, self.unspec_ints
        self.owner.forward = self.eager

    def graphs(self) -> list[dict]:
        """Each compiled variant, why it exists, and how many graphs dynamo holds for it."""
        return [{**variant.why, "graphs": variant.graphs} for variant in self.variants.values()]

    def _dispatcher(self):
        compiled, eager = self, self.eager

        @functools.wraps(eager)
        def forward(module, hidden_states, *args, **kwargs):
            if compiled.failure is not None:
                return eager(module, hidden_states, *args, **kwargs)
            cache = kwargs.get("past_key_values", args[2] if len(args) > 2 else None)
            key = (module.layer_type, module.is_kv_shared_layer, module.store_full_length_kv, type(cache),
                   hidden_states.shape[1] == 1, module.training)
            variant = compiled.variants.get(key) or compiled._add_variant(key, module, hidden_states, cache)
            try:
                return variant.function(module, hidden_states, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:  # a compiler failure, never a model error
                compiled.failure = f"{type(error).__name__}: {error}".splitlines()[0]
                logger.warning("rewriter: compiled attention failed (%s); running eager", compiled.failure)
                return eager(module, hidden_states, *args, **kwargs)

        return forward

    def _add_variant(self, key: tuple, module, hidden_states: torch.Tensor, cache) -> Variant:
        why = {
            "layer": module.layer_type,
            "kv": kv_role(module),
            "cache": type(cache).__name__ if cache is not None else "none",
            "phase": "decode" if hidden_states.shape[1] == 1 else "prefill",
            "mode": "train" if module.training else "eval",
        }
        self.variants[key] = compile_copy(self.eager, why)
        return self.variants[key]


def compile_attention(module_name: str, class_name: str) -> tuple[CompiledAttention | None, str]:
    """Install compiled attention on ``module_name.class_name``; (installed, status) or (None, why not)."""
    reason = why_compile_cannot_run()
    if reason is not None:
        logger.warning("rewriter: attention stays eager: %s", reason)
        return None, f"eager ({reason})"
    owner = getattr(importlib.import_module(module_name), class_name)
    compiled = CompiledAttention(owner, owner.__dict__["forward"])
    compiled.install()
    return compiled, "compiled"


def recompile_limit_hits() -> int:
    """How many times, in this process, dynamo gave up on a function for hitting its recompile limit."""
    from torch._dynamo.utils import counters

    return sum(count for reason, count in counters["unimplemented"].items() if "recompile limit" in reason.lower())
