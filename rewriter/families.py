"""The model families rewriter knows, and the transformers each one can patch."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from rewriter.report import UnsupportedTransformersError


@dataclass(frozen=True)
class Family:
    """A model family: its rules module, the transformers releases it supports, and the files its rules rewrite."""

    name: str
    rules_module: str
    supported: str
    targets: tuple[str, ...]
    attention: tuple[str, str]  # the file and class of the text attention that ``compile_attention`` compiles

    def rules(self) -> tuple:
        """The family's rule classes, in the order they run. Imports LibCST."""
        return importlib.import_module(self.rules_module).RULES

    def code_files(self) -> tuple[Path, ...]:
        """The files whose text decides a cache entry's content: the rules, and the engine that runs and plans them."""
        modules = (self.rules_module, "rewriter.rule", "rewriter.engine", "rewriter.install")
        return tuple(Path(importlib.util.find_spec(name).origin) for name in modules)


FAMILIES = {
    "gemma4": Family(
        name="gemma4",
        rules_module="rewriter.rules.gemma4",
        supported=">=5.5,<6",
        targets=("cache_utils.py", "models/gemma4/modeling_gemma4.py"),
        attention=("models/gemma4/modeling_gemma4.py", "Gemma4TextAttention"),
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}") from None


def module_name(target: str) -> str:
    """``models/gemma4/modeling_gemma4.py`` -> ``transformers.models.gemma4.modeling_gemma4``."""
    return "transformers." + target.removesuffix(".py").replace("/", ".")


def installed_transformers(family: Family) -> tuple[str, Path]:
    """The installed transformers version and package folder, checked against what ``family`` supports."""
    try:
        version = importlib.metadata.version("transformers")
        spec = importlib.util.find_spec("transformers")
    except importlib.metadata.PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedTransformersError(
            f"transformers is not installed; {family.name} needs transformers{family.supported}"
        )
    if Version(version) not in SpecifierSet(family.supported):
        raise UnsupportedTransformersError(
            f"transformers {version} is installed; {family.name} supports transformers{family.supported}"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
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
