"""Compiled copies of a function, one per kind of call (a variant), each with its own dynamo cache, and what
compiled attention and compiled decoding share to dispatch between them and eager."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from types import FunctionType
from typing import ClassVar

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


@dataclass
class CompiledVariants:
    """The compiled copies of one installation by variant key, and a latch: after a compiler failure every call runs
    eager, with one warning. Subclasses dispatch each call and add its variant."""

    what: ClassVar[str]  # what is compiled, in the warning: "attention", "decoding"
    variants: dict[tuple, Variant] = field(default_factory=dict, kw_only=True)
    failure: str | None = field(default=None, kw_only=True)

    def graphs(self) -> list[dict]:
        """Each compiled variant, why it exists, and how many graphs dynamo holds for it."""
        return [{**variant.why, "graphs": variant.graphs} for variant in self.variants.values()]

    def fail(self, error: Exception) -> None:
        """Run eager from now on, saying why once: ``error`` is the compiler's, never the model's."""
        self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
        logger.warning("rewriter: compiled %s failed (%s); running eager", self.what, self.failure)


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


def recompile_limit_hits() -> int:
    """How many times, in this process, dynamo gave up on a function for hitting its recompile limit."""
    from torch._dynamo.utils import counters

    return sum(count for reason, count in counters["unimplemented"].items() if "recompile limit" in reason.lower())
