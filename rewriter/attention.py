"""Optional ``torch.compile`` of a family's text attention: each variant of a call (layer kind, role in KV sharing,
cache type, phase, training) compiles in a copy of its own, under dynamo's recompile limit. Design: docs/compiled.md.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from types import FunctionType

import torch

from rewriter.variants import CompiledVariants, Variant, compile_copy, kv_role, why_compile_cannot_run

logger = logging.getLogger("rewriter")


@dataclass
class CompiledAttention(CompiledVariants):
    """Gemma4TextAttention.forward, dispatching each call to the compiled copy of its variant."""

    what = "attention"
    owner: type
    eager: FunctionType

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
                compiled.fail(error)
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
