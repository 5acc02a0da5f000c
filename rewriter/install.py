"""Install patched source into modules that are already imported, keeping every object's identity.

A patched module is never imported in place of the original: its classes and functions stay the objects users
already hold. Instead, each function whose source a rule changed gets the code object compiled from the patched
file (``function.__code__ = ...``), so wrappers, decorators, ``isinstance`` and ``super()`` keep working, calls
cost nothing extra, and tracebacks and ``inspect.getsource`` point at real lines of the patched file. New top-level
definitions a rule adds run in the module's own namespace.
"""

from __future__ import annotations

import ast
import copy
import importlib
from dataclasses import dataclass, field
from types import CodeType, FunctionType, ModuleType

from rewriter.report import RewriterError

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class InstallError(RewriterError):
    """A patch changes something that cannot be installed into live objects (a rule bug, or a drifted module)."""


@dataclass(frozen=True)
class ModulePatch:
    """What installing one patched module does: the names it adds and the functions whose code it replaces."""

    module: str
    added: tuple[str, ...]
    replaced: tuple[str, ...]
    definitions: CodeType
    replacements: CodeType


def plan(module: str, original: str, patched: str, filename: str) -> ModulePatch:
    """Compare original and patched source by definition and compile only what changed, as ``filename``."""
    old_tree, new_tree = ast.parse(original), ast.parse(patched)
    old_definitions = {node.name: node for node in old_tree.body if isinstance(node, DEFINITIONS)}
    if _dump_others(old_tree.body) != _dump_others(new_tree.body):
        raise InstallError(f"{module}: a rule changed module-level code other than definitions")
    added, shells, replaced = [], [], []
    for node in new_tree.body:
        if not isinstance(node, DEFINITIONS):
            continue
        old = old_definitions.get(node.name)
        if old is None:
            added.append(node)
        elif ast.dump(node) == ast.dump(old):
            continue
        elif isinstance(node, ast.ClassDef):
            methods = _changed_methods(module, old, node)
            shells.append(_shell(node, [_undecorated(method) for method in methods]))
            replaced.extend(f"{node.name}.{method.name}" for method in methods)
        else:
            _check_same_decorators(module, old, node)
            shells.append(_undecorated(node))
            replaced.append(node.name)
    return ModulePatch(
        module=module,
        added=tuple(node.name for node in added),
        replaced=tuple(replaced),
        definitions=compile(ast.Module(body=added, type_ignores=[]), filename, "exec", dont_inherit=True),
        replacements=compile(ast.Module(body=shells, type_ignores=[]), filename, "exec", dont_inherit=True),
    )


@dataclass
class Installed:
    """An installed patch and what it replaced, so that ``uninstall`` can put the originals back."""

    patch: ModulePatch
    module: ModuleType
    originals: list[tuple[FunctionType, tuple]] = field(default_factory=list)


def install(patch: ModulePatch) -> Installed:
    module = importlib.import_module(patch.module)
    targets = [_live_function(module, qualname) for qualname in patch.replaced]  # all found before any change
    scratch = dict(module.__dict__)
    exec(patch.replacements, scratch)
    replacements = [_function(scratch[qualname.split(".")[0]], qualname) for qualname in patch.replaced]
    for target, replacement in zip(targets, replacements):
        if target.__code__.co_freevars != replacement.__code__.co_freevars:
            raise InstallError(f"{target.__qualname__}: the patched code closes over other names")
    installed = Installed(patch, module)
    exec(patch.definitions, module.__dict__)
    for target, replacement in zip(targets, replacements):
        installed.originals.append((target, _function_state(target)))
        _set_function_state(target, _function_state(replacement))
    return installed


def uninstall(installed: Installed) -> None:
    for function, state in installed.originals:
        _set_function_state(function, state)
    for name in installed.patch.added:
        installed.module.__dict__.pop(name, None)


def _function_state(function: FunctionType) -> tuple:
    return function.__code__, function.__defaults__, function.__kwdefaults__, function.__annotations__


def _set_function_state(function: FunctionType, state: tuple) -> None:
    function.__code__, function.__defaults__, function.__kwdefaults__, function.__annotations__ = state


def _function(owner: object, qualname: str) -> FunctionType:
    """The plain function ``qualname`` defined directly in ``owner`` (a shell class or a module-level function)."""
    if "." not in qualname:
        return owner
    return vars(owner)[qualname.split(".", 1)[1]]


def _live_function(module: ModuleType, qualname: str) -> FunctionType:
    """The function object whose code is ``qualname``, found through decorators, wrappers and descriptors."""
    owner_name, _, name = qualname.rpartition(".")
    start = vars(vars(module)[owner_name]).get(name) if owner_name else vars(module).get(name)
    pending, seen = [start], set()
    while pending:
        candidate = pending.pop()
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if isinstance(candidate, FunctionType) and candidate.__code__.co_qualname == qualname:
            return candidate
        pending.append(getattr(candidate, "__func__", None))
        pending.append(getattr(candidate, "__wrapped__", None))
        for cell in getattr(candidate, "__closure__", None) or ():
            try:
                pending.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    raise InstallError(f"{module.__name__}: cannot find the function {qualname} to patch in the imported module")


def _changed_methods(module: str, old: ast.ClassDef, new: ast.ClassDef) -> list[ast.FunctionDef]:
    if _dump_others(old.body) != _dump_others(new.body) or _dump_header(old) != _dump_header(new):
        raise InstallError(f"{module}.{new.name}: a rule changed the class itself, not only its methods")
    old_methods = {node.name: node for node in old.body if isinstance(node, DEFINITIONS)}
    new_methods = {node.name: node for node in new.body if isinstance(node, DEFINITIONS)}
    if old_methods.keys() != new_methods.keys():
        raise InstallError(f"{module}.{new.name}: a rule added or removed methods; only existing ones can be patched")
    changed = []
    for name, node in new_methods.items():
        if ast.dump(node) == ast.dump(old_methods[name]):
            continue
        if isinstance(node, ast.ClassDef):
            raise InstallError(f"{module}.{new.name}.{name}: a rule changed a nested class")
        _check_same_decorators(module, old_methods[name], node)
        changed.append(node)
    return changed


def _check_same_decorators(module: str, old: ast.AST, new: ast.AST) -> None:
    if _dump_all(old.decorator_list) != _dump_all(new.decorator_list):
        raise InstallError(f"{module}.{new.name}: a rule changed decorators, which cannot be patched in place")


def _undecorated(node: ast.FunctionDef) -> ast.FunctionDef:
    """The function without its decorators (the live object keeps them), first line where the decorators were."""
    bare = copy.copy(node)
    bare.decorator_list = []
    bare.lineno = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    return bare


def _shell(node: ast.ClassDef, methods: list[ast.FunctionDef]) -> ast.ClassDef:
    """A bare class of the same name holding only the changed methods, so their code gets the right qualname."""
    shell = copy.copy(node)
    shell.bases, shell.keywords, shell.decorator_list, shell.body = [], [], [], methods
    return shell


def _dump_all(nodes) -> list[str]:
    return [ast.dump(node) for node in nodes]


def _dump_others(body: list[ast.stmt]) -> list[str]:
    return _dump_all(node for node in body if not isinstance(node, DEFINITIONS))


def _dump_header(node: ast.ClassDef) -> list[str]:
    return _dump_all((*node.bases, *node.keywords, *node.decorator_list))
