"""A source-rewriting compiler cache that makes transformers' Gemma models correct, with no runtime wrappers."""

__version__ = "0.1.0"

from rewriter.api import (  # noqa: E402
    attention_graphs,
    compile,
    compile_on_import,
    compiled,
    decode_graphs,
    patched_source,
    restore,
)
from rewriter.report import (  # noqa: E402
    CompileReport,
    RewriterError,
    RuleDriftError,
    RuleOutcome,
    UnsupportedTransformersError,
)

__all__ = [
    "CompileReport",
    "RewriterError",
    "RuleDriftError",
    "RuleOutcome",
    "UnsupportedTransformersError",
    "attention_graphs",
    "compile",
    "compile_on_import",
    "compiled",
    "decode_graphs",
    "patched_source",
    "restore",
]
