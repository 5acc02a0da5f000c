"""Install patched source into modules that are already imported, keeping every object's identity.

A patched module is never imported in place of the original: its classes and functions stay the objects users
already hold. Instead, each function whose source a rule changed gets the code object compiled from the patched
text (``function.__code__ = ...``), so wrappers, decorators, ``isinstance`` and ``super()`` keep working, and calls
cost nothing extra. A class attribute whose literal value a rule changed (``_supports_sdpa = False``) is set on the
live class. The patched text is registered in ``linecache`` under the file name the code is compiled with
(``<rewriter KEY transformers/FILE>``: the angle brackets keep ``linecache`` from ever substituting the upstream
file), so tracebacks, debuggers and ``inspect.getsource`` show the patched lines. New top-level definitions a rule
adds run in the module's own namespace.
"""

from __future__ import annotations

import ast
import importlib
import linecache
import os
import sys
from dataclasses import dataclass, field
from types import FunctionType, ModuleType

from rewriter.report import RewriterError

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
# Up to 3.12, ``inspect`` finds a class by name in its module's ``__file__``; 3.13 reads ``__firstlineno__`` there,
# which for the classes no rule touched is a line of the original file.
CLASSES_FOUND_BY_NAME = sys.version_info < (3, 13)
# ... and transformers itself opens a model's module ``__file__`` (to look for its attention interface), so that must
# stay a real file; a Linux memfd gives the patched text one without writing to any disk.
IN_MEMORY_FILES = hasattr(os, "memfd_create")


class InstallError(RewriterError):
    """A patch changes something that cannot be installed into live objects (a rule bug, or a drifted module)."""


@dataclass(frozen=True)
class ModulePatch:
    """What installing one patched module does, as line ranges of the patched file (stored in cache manifests).

    ``definitions``: ``(first, last)`` lines of each new top-level definition, decorators included.
    ``replacements``: ``(qualname, first, start, last)`` of each changed function: ``first`` is its first decorator
    line (or ``start``), ``start`` its ``def`` line, ``last`` its last line.
    ``attributes``: ``(qualname, first, last)`` of each class attribute whose assigned value changed.
    """

    module: str
    definitions: tuple[tuple[int, int], ...]
    replacements: tuple[tuple[str, int, int, int], ...]
    attributes: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def from_json(cls, data) -> ModulePatch:
        """The patch a manifest describes; ``ValueError`` when it does not have the shape ``plan`` writes."""
        if not isinstance(data, dict) or set(data) != {"module", "definitions", "replacements", "attributes"}:
            raise ValueError("an install plan is not an object with module, definitions, replacements and attributes")
        definitions, replacements, attributes = data["definitions"], data["replacements"], data["attributes"]
        if not (
            isinstance(data["module"], str)
            and isinstance(definitions, list)
            and all(_is_row(row, (int, int)) for row in definitions)
            and isinstance(replacements, list)
            and all(_is_row(row, (str, int, int, int)) for row in replacements)
            and isinstance(attributes, list)
            and all(_is_row(row, (str, int, int)) and "." in row[0] for row in attributes)
        ):
            raise ValueError(f"the install plan of {data['module']!r} has the wrong shape")
        if not definitions and not replacements and not attributes:
            raise ValueError(f"the install plan of {data['module']!r} installs nothing")
        rows = (tuple(map(tuple, data[name])) for name in ("definitions", "replacements", "attributes"))
        return cls(data["module"], *rows)

    def check(self, patched: str) -> None:
        """Raise ``ValueError`` unless every line range names, in ``patched``, the definition it claims to."""
        lines = patched.splitlines(keepends=True)
        for first, last in self.definitions:
            node = _parse_range(lines, first, last)
            if not isinstance(node, DEFINITIONS) or (_first_line(node), node.end_lineno) != (first, last):
                raise ValueError(f"{self.module}: lines {first}-{last} are not one whole definition")
        for qualname, first, start, last in self.replacements:
            owner, _, name = qualname.rpartition(".")
            node = _parse_range(lines, first, last, header=f"class {owner}:\n" if owner else "")
            if (
                not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                or node.name != name
                or (_first_line(node), node.lineno, node.end_lineno) != (first, start, last)
            ):
                raise ValueError(f"{self.module}: lines {first}-{last} are not the function {qualname}")
        for qualname, first, last in self.attributes:
            owner, _, name = qualname.rpartition(".")
            node = _parse_range(lines, first, last, header=f"class {owner}:\n")
            if _attribute_name(node) != name or (node.lineno, node.end_lineno) != (first, last) or not _is_literal(node.value):
                raise ValueError(f"{self.module}: lines {first}-{last} are not the class attribute {qualname}")


def plan(module: str, original: str, patched: str, patched_tree: ast.Module | None = None) -> ModulePatch:
    """Compare original and patched source definition by definition; only what changed is installed."""
    old_tree, new_tree = ast.parse(original), patched_tree or ast.parse(patched)
    old_text, new_text = _Text(original), _Text(patched)
    old_definitions = {node.name: node for node in old_tree.body if isinstance(node, DEFINITIONS)}
    if _dump_others(old_tree.body) != _dump_others(new_tree.body):
        raise InstallError(f"{module}: a rule changed module-level code other than definitions")
    definitions, replacements, attributes = [], [], []
    for node in new_tree.body:
        if not isinstance(node, DEFINITIONS):
            continue
        old = old_definitions.get(node.name)
        if old is None:
            definitions.append((_first_line(node), node.end_lineno))
        elif new_text.of(node) == old_text.of(old):
            continue
        elif isinstance(node, ast.ClassDef):
            methods, changed_attributes = _class_changes(module, old, node, old_text, new_text)
            for method in methods:
                replacements.append((f"{node.name}.{method.name}", _first_line(method), method.lineno, method.end_lineno))
            for attribute in changed_attributes:
                attributes.append((f"{node.name}.{_attribute_name(attribute)}", attribute.lineno, attribute.end_lineno))
        else:
            _check_same_decorators(module, old, node)
            replacements.append((node.name, _first_line(node), node.lineno, node.end_lineno))
    return ModulePatch(module, tuple(definitions), tuple(replacements), tuple(attributes))


@dataclass
class Installed:
    """An installed patch and what it replaced, so that ``uninstall`` can put the originals back."""

    module: ModuleType
    added: tuple[str, ...]
    originals: list[tuple[FunctionType, tuple]] = field(default_factory=list)
    original_attributes: list[tuple[type, str, object]] = field(default_factory=list)  # (class, name, value)
    original_file: str | None = None
    text_file: int | None = None  # the descriptor of the memfd that ``__file__`` names meanwhile


def install(patch: ModulePatch, patched: str, filename: str) -> Installed:
    """Compile the changed parts of ``patched`` as ``filename`` and install them into the imported module."""
    module = importlib.import_module(patch.module)
    lines = patched.splitlines(keepends=True)
    targets = [_live_function(module, qualname) for qualname, *_ in patch.replacements]
    replacements = [_compile_function(module, lines, replacement, filename) for replacement in patch.replacements]
    attributes = [_literal_attribute(module, lines, attribute) for attribute in patch.attributes]
    for target, replacement in zip(targets, replacements):
        if target.__code__.co_freevars != replacement.__code__.co_freevars:
            raise InstallError(f"{target.__qualname__}: the patched code closes over other names")
    definitions = ast.Module(body=[_parse(lines, first, last) for first, last in patch.definitions], type_ignores=[])
    before = set(vars(module))
    # all checks passed: now install. Tracebacks, debuggers and ``inspect`` read the patched lines from linecache
    linecache.cache[filename] = (len(patched), None, lines, filename)
    exec(compile(definitions, filename, "exec", dont_inherit=True), vars(module))
    installed = Installed(module, tuple(name for name in vars(module) if name not in before))
    if CLASSES_FOUND_BY_NAME and IN_MEMORY_FILES and patch.definitions:
        # ``inspect.getsource`` of a class reads its module's file: when a rule added one, point it at the patched
        # text, which holds every class as it now runs, the added ones included (it is a whole copy of the module)
        installed.text_file = os.memfd_create(os.path.basename(module.__file__), os.MFD_CLOEXEC)
        with open(installed.text_file, "w", encoding="utf-8", closefd=False) as file:
            file.write(patched)
        installed.original_file, module.__file__ = module.__file__, f"/proc/self/fd/{installed.text_file}"
    for target, replacement in zip(targets, replacements):
        installed.originals.append((target, _function_state(target)))
        _set_function_state(target, _function_state(replacement))
    for owner, name, value in attributes:
        installed.original_attributes.append((owner, name, vars(owner)[name]))
        setattr(owner, name, value)
    return installed


def uninstall(installed: Installed) -> None:
    for function, state in installed.originals:
        _set_function_state(function, state)
    for owner, name, value in installed.original_attributes:
        setattr(owner, name, value)
    for name in installed.added:
        vars(installed.module).pop(name, None)
    if installed.original_file is not None:
        installed.module.__file__ = installed.original_file
        os.close(installed.text_file)


def _parse(lines: list[str], first: int, last: int, header: str = "") -> ast.stmt:
    """Parse lines ``first..last`` of the patched file (under ``header``), keeping their real line numbers."""
    tree = ast.parse(header + "".join(lines[first - 1 : last]))
    ast.increment_lineno(tree, first - 1 - header.count("\n"))
    return tree.body[0]


def _parse_range(lines: list[str], first: int, last: int, header: str = "") -> ast.stmt | None:
    """Lines ``first..last`` as ``_parse`` reads them, or ``None`` when they are out of the file, do not parse, or
    hold more than one statement."""
    if not 1 <= first <= last <= len(lines):
        return None
    try:
        tree = ast.parse(header + "".join(lines[first - 1 : last]))
    except SyntaxError:
        return None
    body = tree.body[0].body if header else tree.body
    if len(body) != 1:
        return None
    ast.increment_lineno(tree, first - 1 - header.count("\n"))
    return body[0]


def _is_row(row, types: tuple[type, ...]) -> bool:
    """A JSON list holding exactly ``types``, in order (``bool`` is no ``int`` here)."""
    return (
        isinstance(row, list)
        and len(row) == len(types)
        and all(type(value) is kind for value, kind in zip(row, types))
        and all(value >= 1 for value in row if type(value) is int)
    )


def _compile_function(module: ModuleType, lines: list[str], replacement: tuple, filename: str) -> FunctionType:
    """The function as the patched file defines it, without decorators; defaults evaluated in the module's names."""
    qualname, first, start, last = replacement
    owner, _, name = qualname.rpartition(".")
    node = _parse(lines, start, last, header=f"class {owner}:\n" if owner else "")
    (node.body[0] if owner else node).lineno = first  # code starts where the decorators do, as upstream's
    scratch = dict(vars(module))
    exec(compile(ast.Module(body=[node], type_ignores=[]), filename, "exec", dont_inherit=True), scratch)
    return vars(scratch[owner])[name] if owner else scratch[name]


def _literal_attribute(module: ModuleType, lines: list[str], attribute: tuple) -> tuple[type, str, object]:
    """``(class, name, value)``: the live class, which must assign ``name`` itself, and the literal the patched
    assignment gives it (read with ``ast.literal_eval``: nothing runs)."""
    qualname, first, last = attribute
    owner_name, _, name = qualname.rpartition(".")
    owner = vars(module).get(owner_name)
    if not isinstance(owner, type) or name not in vars(owner):
        raise InstallError(f"{module.__name__}: cannot find the class attribute {qualname} to patch in the imported module")
    return owner, name, ast.literal_eval(_parse(lines, first, last, header=f"class {owner_name}:\n").body[0].value)


def _function_state(function: FunctionType) -> tuple:
    return function.__code__, function.__defaults__, function.__kwdefaults__, function.__annotations__


def _set_function_state(function: FunctionType, state: tuple) -> None:
    function.__code__, function.__defaults__, function.__kwdefaults__, function.__annotations__ = state


def _live_function(module: ModuleType, qualname: str) -> FunctionType:
    """The function object whose code is ``qualname``, found through decorators, wrappers, descriptors and
    properties."""
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
        pending.append(getattr(candidate, "fget", None))  # a property's getter
        for cell in getattr(candidate, "__closure__", None) or ():
            try:
                pending.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    raise InstallError(f"{module.__name__}: cannot find the function {qualname} to patch in the imported module")


class _Text:
    """Source lines, to compare definitions by their text (much cheaper than comparing their ASTs)."""

    def __init__(self, source: str):
        self.lines = source.splitlines(keepends=True)

    def of(self, node: ast.AST) -> str:
        return "".join(self.lines[_first_line(node) - 1 : node.end_lineno])


def _class_changes(module: str, old: ast.ClassDef, new: ast.ClassDef, old_text: _Text, new_text: _Text):
    """The methods of ``new`` whose text changed, and its attribute assignments whose value changed."""
    old_others, new_others = (
        [node for node in body if not isinstance(node, DEFINITIONS)] for body in (old.body, new.body)
    )
    if len(old_others) != len(new_others) or _dump_header(old) != _dump_header(new):
        raise InstallError(f"{module}.{new.name}: a rule changed the class itself, not only its methods and attributes")
    attributes = []
    for before, after in zip(old_others, new_others):
        if ast.dump(before) == ast.dump(after):
            continue
        if _attribute_name(after) is None or _attribute_name(after) != _attribute_name(before):
            raise InstallError(f"{module}.{new.name}: a rule changed the class itself, not only its methods and attributes")
        if not _is_literal(after.value):
            raise InstallError(f"{module}.{new.name}.{_attribute_name(after)}: a changed class attribute must be a literal")
        attributes.append(after)
    old_methods = {node.name: node for node in old.body if isinstance(node, DEFINITIONS)}
    new_methods = {node.name: node for node in new.body if isinstance(node, DEFINITIONS)}
    if old_methods.keys() != new_methods.keys():
        raise InstallError(f"{module}.{new.name}: a rule added or removed methods; only existing ones can be patched")
    changed = []
    for name, node in new_methods.items():
        if new_text.of(node) == old_text.of(old_methods[name]):
            continue
        if isinstance(node, ast.ClassDef):
            raise InstallError(f"{module}.{new.name}.{name}: a rule changed a nested class")
        _check_same_decorators(module, old_methods[name], node)
        changed.append(node)
    return changed, attributes


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _attribute_name(node: ast.stmt | None) -> str | None:
    """The name a class-level ``name = value`` (or ``name: type = value``) assigns; ``None`` for any other statement."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id
    return None


def _check_same_decorators(module: str, old: ast.AST, new: ast.AST) -> None:
    if _dump_all(old.decorator_list) != _dump_all(new.decorator_list):
        raise InstallError(f"{module}.{new.name}: a rule changed decorators, which cannot be patched in place")


def _first_line(node: ast.AST) -> int:
    return min([node.lineno, *(decorator.lineno for decorator in getattr(node, "decorator_list", ()))])


def _dump_all(nodes) -> list[str]:
    return [ast.dump(node) for node in nodes]


def _dump_others(body: list[ast.stmt]) -> list[str]:
    return _dump_all(node for node in body if not isinstance(node, DEFINITIONS))


def _dump_header(node: ast.ClassDef) -> list[str]:
    return _dump_all((*node.bases, *node.keywords, *node.decorator_list))
