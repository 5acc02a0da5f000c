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

Callback = Callable[[ModuleType], object]


class _PostImportLoader(Loader):
    def __init__(self, loader: Loader, callback: Callback):
        self.loader, self.callback = loader, callback

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self.loader  # as if never wrapped
        self.callback(module)


class PostImportFinder(MetaPathFinder):
    """Watches modules by name; each callback runs once, after its module's first complete import."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callback] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        callback = self.callbacks.pop(fullname, None)
        if callback is None:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PostImportLoader(spec.loader, callback)
                return spec
        return None


_finder = PostImportFinder()


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it already is, else right after."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    _finder.callbacks[name] = callback


def forget(name: str) -> None:
    """Stop watching module ``name``."""
    _finder.callbacks.pop(name, None)
