"""``rewriter.compile``, ``compile_on_import`` and ``restore``: patch model families' transformers code at start-up."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rewriter import install as installer
from rewriter import onimport
from rewriter.build import entry_key, find_or_build
from rewriter.families import FAMILIES, Family, get_family, installed_transformers, module_name, read_sources
from rewriter.report import CompileReport, RuleDriftError, drift_message

if TYPE_CHECKING:
    from rewriter.attention import CompiledAttention
    from rewriter.generation import CompiledDecoding

logger = logging.getLogger("rewriter")


@dataclass
class _Installation:
    """What ``compile`` installed for one family: its report, the patched texts, each installed patch, and compiled
    attention or decoding where asked for."""

    report: CompileReport
    texts: dict[str, str]
    patches: list[installer.Installed]
    attention: CompiledAttention | None = None
    decoding: CompiledDecoding | None = None

    def set_attention(self, family: Family, compiled: bool) -> None:
        """Turn compiled attention on or off; the report says which, and why when it stays eager."""
        if compiled and self.attention is None:
            from rewriter.attention import compile_attention  # imports torch

            self.attention, status = compile_attention(module_name(family.attention[0]), family.attention[1])
            self.report = replace(self.report, attention=status)
        elif not compiled and self.attention is not None:
            self.attention.uninstall()
            self.attention = None
            self.report = replace(self.report, attention="eager")

    def set_decoding(self, family: Family, unit: str | None) -> None:
        """Compile decode steps by ``unit`` ("forward", "layers") or not at all (``None``); the report says which."""
        if self.decoding is not None and self.decoding.unit != unit:
            self.decoding.uninstall()
            self.decoding = None
            self.report = replace(self.report, decode="eager")
        if unit is not None and self.decoding is None:
            from rewriter.generation import compile_decoding  # imports torch

            self.decoding, status = compile_decoding(family.name, module_name(family.attention[0]), unit)
            self.report = replace(self.report, decode=status)


_installed: dict[str, _Installation] = {}


def compile(
    family: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    use_shipped: bool = True,
    compile_attention: bool = False,
    compile_decode: str | None = None,
    fused_loss: bool = False,
) -> CompileReport:
    """Rewrite ``family``'s transformers source with its rules, cache it, and install it into the live classes.

    Entries are looked up in the wheel's shipped cache (unless ``use_shipped=False`` or ``REWRITER_NO_SHIPPED=1``),
    then in ``cache_dir`` (else ``$REWRITER_CACHE_DIR``, else the user cache folder); a miss runs the LibCST rules
    and stores the result there, or keeps it in memory when that folder cannot be used. Calling it again with the
    same sources changes nothing. Drift is logged as a warning naming the rule, the file and the shape it
    expected; with ``strict=True`` it raises ``RuleDriftError`` before anything is installed. The families it
    ``requires`` (``trainer``) are compiled, with the same cache options, when the program imports their module.
    ``compile_attention=True`` also wraps the family's text attention in ``torch.compile`` (``rewriter.attention``),
    or says in ``report.attention`` why it stays eager. ``compile_decode="forward"`` or ``"layers"`` makes
    ``generate`` use a static cache and compiles each decode step as whole graphs (``rewriter.generation``);
    ``report.decode`` says which, or why it stays eager. ``fused_loss=True`` adds the opt-in fused-loss rule
    (``rewriter.fused_loss``): training forwards given labels return the loss without logits; its entry is built
    on first use (no shipped entry has it).
    """
    family = get_family(family, fused_loss=fused_loss)
    _check_compiled_modes(family, compile_attention, compile_decode)
    version, package = installed_transformers(family)
    sources = read_sources(family, package)
    key, components = entry_key(family, sources)
    installation = _installed.get(family.name)
    if installation is not None and installation.report.key == key:
        _check_drift(installation.report, strict)
        installation.set_attention(family, compile_attention)
        installation.set_decoding(family, compile_decode)
        return installation.report

    entry, origin = find_or_build(family, version, sources, key, components, cache_dir, use_shipped=use_shipped)
    manifest = str(entry.manifest) if entry.manifest else None
    report = CompileReport(family.name, version, key, origin, manifest, entry.outcomes)
    _check_drift(report, strict)

    for required in family.requires:
        if required not in _installed:
            compile_on_import(required, cache_dir=cache_dir, strict=strict, use_shipped=use_shipped)
    restore(family.name)
    installation = _Installation(report, entry.texts, [])
    try:
        for target, patch in entry.patches.items():
            filename = f"<rewriter {key[:12]} transformers/{target}>"
            installation.patches.append(installer.install(patch, entry.texts[target], filename))
    except BaseException:
        _uninstall(family.name, installation)
        raise
    _installed[family.name] = installation
    installation.set_attention(family, compile_attention)
    installation.set_decoding(family, compile_decode)
    return installation.report


def compile_on_import(*families: str, **options) -> dict[str, CompileReport]:
    """Compile each family (default: every family) when the program first imports one of its model's modules
    (modeling or processing), at once for those it already imported; the reports of those come back, the others are
    ``compiled(family)`` once imported.

    ``options`` are ``compile``'s. With no family named, ``fused_loss``, ``compile_attention`` and
    ``compile_decode`` go to the families that have them; a named family without them is a ``ValueError`` at once.
    A family's patch runs right after transformers imports its module and before the import returns, so no model
    is built unpatched; a family whose module is never imported costs nothing. Errors (drift under ``strict``, an
    unsupported transformers) surface from that import.
    """
    fused_loss = options.pop("fused_loss", False)
    chosen = [get_family(name, fused_loss=fused_loss) for name in families] or list(FAMILIES.values())
    for family in chosen:
        own = {**options, "fused_loss": fused_loss and "fused-loss" in family.opt_in}
        if not families and family.attention is None:
            own.update(compile_attention=False, compile_decode=None)
        _check_compiled_modes(family, own.get("compile_attention", False), own.get("compile_decode"))
        for module in family.entry_modules:  # the first one imported compiles the family, patching every file
            onimport.when_imported(module, family.name, lambda name=family.name, own=own: compile(name, **own))
    return {family.name: _installed[family.name].report for family in chosen if family.name in _installed}


def compiled(family: str) -> CompileReport | None:
    """The report of ``family``'s installed patch, or ``None`` while it is not installed."""
    installation = _installed.get(get_family(family).name)
    return installation.report if installation is not None else None


def patched_source(family: str, target: str) -> str | None:
    """The text of ``target`` (a file ``family`` patches, relative to the transformers package) as it now runs:
    patched, or upstream's where no rule changed it; ``None`` while the family is not compiled."""
    installation = _installed.get(get_family(family).name)
    return installation.texts[target] if installation is not None else None


def restore(family: str) -> bool:
    """Put back the original code of ``family``'s classes and stop patching it on import; ``False`` if nothing
    was installed."""
    family = get_family(family)
    installation = _installed.pop(family.name, None)
    _uninstall(family.name, installation)
    return installation is not None


def _uninstall(family: str, installation: _Installation | None) -> None:
    """Forget ``family``'s import hooks, and put back what ``installation`` installed."""
    onimport.forget(family)
    if installation is None:
        return
    if installation.attention is not None:
        installation.attention.uninstall()
    if installation.decoding is not None:
        installation.decoding.uninstall()
    for installed in reversed(installation.patches):
        installer.uninstall(installed)


def attention_graphs(family: str) -> list[dict]:
    """The compiled attention variants of ``family``, why each exists, and their graph counts (none when eager)."""
    installation = _installed.get(get_family(family).name)
    return installation.attention.graphs() if installation is not None and installation.attention is not None else []


def decode_graphs(family: str) -> list[dict]:
    """The compiled decoding variants of ``family``, why each exists, and their graph counts (none when eager)."""
    installation = _installed.get(get_family(family).name)
    return installation.decoding.graphs() if installation is not None and installation.decoding is not None else []


def _check_compiled_modes(family: Family, compile_attention: bool, unit: str | None) -> None:
    if (compile_attention or unit) and family.attention is None:
        raise ValueError(f"{family.name} has no compiled attention; families with one: {', '.join(_with_attention())}")
    if unit is None:
        return
    from rewriter.generation import UNITS  # imports torch

    if unit not in UNITS:
        raise ValueError(f"compile_decode must be one of {', '.join(UNITS)} or None, not {unit!r}")
    if compile_attention:
        raise ValueError("compile_decode compiles attention inside its graphs; leave compile_attention off")


def _with_attention() -> list[str]:
    return [name for name, family in FAMILIES.items() if family.attention is not None]


def _check_drift(report: CompileReport, strict: bool) -> None:
    if report.drifted and strict:
        raise RuleDriftError(report.drifted)
    for outcome in report.drifted:
        logger.warning("rewriter: %s; left unpatched", drift_message(outcome))
