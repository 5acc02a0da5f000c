"""Run a callback right after a module is first imported, or at once if it already is (a post-import hook).

rewriter patches a family only when the program imports its modeling module, so a program that compiles every
family pays only for the models it uses. Like pytest's assertion rewriter, a finder on ``sys.meta_path`` answers
only for the modules it watches: it asks the finders after it for the real spec and wraps its loader, so the
module is created and executed exactly as it would be, and the callback runs once it is complete.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

Callback = Callable[[], object]


class _PostImportLoader(Loader):
    def __init__(self, loader: Loader, callbacks: list[Callback]):
        self.loader, self.callbacks = loader, callbacks

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self.loader  # as if never wrapped
        for callback in self.callbacks:
            callback()


class PostImportFinder(MetaPathFinder):
    """Watches modules by name; each callback runs once, after its module's first complete import."""

    def __init__(self) -> None:
        self.callbacks: dict[str, dict[str, Callback]] = {}  # module -> {owner: callback}

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        callbacks = self.callbacks.pop(fullname, None)
        if not callbacks:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PostImportLoader(spec.loader, list(callbacks.values()))
                return spec
        return None


_finder = PostImportFinder()


def when_imported(name: str, owner: str, callback: Callback) -> None:
    """Call ``callback()`` once module ``name`` is imported: now if it already is, else right after. An owner has
    one callback a module."""
    if name in sys.modules:
        callback()
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    _finder.callbacks.setdefault(name, {})[owner] = callback


def forget(owner: str) -> None:
    """Drop every callback of ``owner`` that has not run."""
    for callbacks in _finder.callbacks.values():
        callbacks.pop(owner, None)
