"""What code and which libraries a stage's artifact comes from: the code and library parts of a stage key.

Code: the import closure of the stage's job (its module plus `stage_main`), found by reading `import` statements
with `ast` (nothing is imported). The closure, not the whole package: editing the report renderer must not re-train
SFT, and a module a stage starts importing enters its key without anyone updating a list. Imports inside functions
count (they can execute); so do the `__init__.py` of every package on the way. Each module enters by a hash of its
syntax tree without docstrings, so comments, formatting and docs do not invalidate artifacts; any change to what
the code does does. The closure misses only imports by computed name (`importlib.import_module(x)`):
`stage_main`'s import of the stage module is the one we have, and the stage module is a root for that reason.

Libraries: the installed versions of the packages whose code computes the results, read from package metadata
(no imports), so an upgrade that changes numerics re-runs what it touches instead of reusing old artifacts.
"""
from __future__ import annotations

import ast
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGE = "rlhf_tasks"
PACKAGE_DIR = Path(__file__).resolve().parent
RESULT_LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "datasets", "tokenizers", "safetensors")

_PARSED: dict[tuple, tuple[str, list[tuple[str, int, tuple[str, ...]]]]] = {}


def module_file(module: str, package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> Path | None:
    """`rlhf_tasks.a.b` -> `<package_dir>/a/b.py` or `<package_dir>/a/b/__init__.py`; None when not ours."""
    if module != package and not module.startswith(package + "."):
        return None
    rel = module.split(".")[1:]
    base = package_dir.joinpath(*rel)
    for f in (base.with_suffix(".py") if rel else None, base / "__init__.py"):
        if f is not None and f.is_file():
            return f
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _parse(path: Path) -> tuple[str, list[tuple[str, int, tuple[str, ...]]]]:
    """-> (hash of the docstring-free syntax tree, imports as (module, relative level, imported names))."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _PARSED:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        imports: list[tuple[str, int, tuple[str, ...]]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imports += [(a.name, 0, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imports.append((node.module or "", node.level, tuple(a.name for a in node.names)))
        digest = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()[:16]
        _PARSED[memo] = (digest, imports)
    return _PARSED[memo]


def _absolute(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_closure(roots: list[str], package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of `package` that importing `roots` can execute -> its file. Roots outside it add nothing."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        f = module_file(mod, package_dir, package)
        if f is None:
            continue
        seen[mod] = f
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__ run first
        for target, names in imports_of(f, mod):
            todo.append(target)
            todo += [f"{target}.{n}" for n in names if n != "*"]  # `from pkg import submodule`
    return seen


def imports_of(path: Path, module: str) -> list[tuple[str, tuple[str, ...]]]:
    """What the source of `module` (at `path`) imports anywhere, top level or inside functions, as
    (absolute module, names imported from it); `import a.b` gives ("a.b", ())."""
    is_package = path.name == "__init__.py"
    return [(_absolute(name, level, module, is_package), names) for name, level, names in _parse(path)[1]]


def code_hashes(roots: list[str], package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, str]:
    """{package-relative file: hash of its code} over the import closure of `roots` (the `code` of a stage key)."""
    closure = import_closure(roots, package_dir, package)
    return {f.relative_to(package_dir).as_posix(): _parse(f)[0] for f in sorted(closure.values())}


def module_code_hashes(module: str) -> dict[str, str] | None:
    """{file: code hash} of any importable module (ours or not) and of the modules of its own top-level package
    that it imports: the code of a `package.module:callable` reference (a programmatic reward) that a stage key
    covers. The files are found with `importlib.util.find_spec` of the top-level name, which runs nothing; None
    when the module is not there."""
    import importlib.util

    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: the closure inside it, named from the package down
        root = Path(next(iter(spec.submodule_search_locations)))
        closure = import_closure([module], root, top)
        if module not in closure:
            return None
        return {f"{top}/{f.relative_to(root).as_posix()}": _parse(f)[0] for f in sorted(closure.values())}
    if module != top or not (spec.origin or "").endswith(".py"):
        return None
    return {Path(spec.origin).name: _parse(Path(spec.origin))[0]}  # a one-file module is its own closure


def library_versions(names: tuple[str, ...] = RESULT_LIBRARIES) -> dict[str, str]:
    """{distribution: installed version, or "not installed"} from package metadata."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
