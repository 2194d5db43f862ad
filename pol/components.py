"""User code named by a spec (`module:callable`): who may import it, and the digest that pins it.

The trust rule (DESIGN section 8): everything in a bundle, transcript or message is data. A verifier, referee or
third party imports only code it chose before reading the input: pol's built-ins always, other packages only when
its `CodePolicy` allows them. The solver and a client resolving their own spec trust the code they named
(`CodePolicy.trust_all()`). A spec naming other code is refused with `CodeNotAllowed` *before* anything is imported
(`verify_code_allowed`), and `load_callable` checks the policy again at the import itself.

User code is pinned the way data is: resolving a spec binds, per component, a blake3 digest of the source files of
the named module's top-level package (`compute_code_digest`), read from disk without importing anything. A verifier
whose installed package hashes differently answers `CodeDiffers` ("cannot verify"), never "fraud".

The working directory is never put on `sys.path` by pol: code must be importable the ordinary way (installed, or
on PYTHONPATH), so a module shipped next to a bundle is never picked up.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from .canonical import Digest
from .errors import CodeNotAllowed, ComponentError

__all__ = [
    "CodePolicy",
    "is_import_path",
    "get_package",
    "load_callable",
    "compute_code_digest",
    "compute_imported_versions",
    "verify_code_allowed",
    "CODE_SUFFIXES",
    "MAX_CODE_FILES",
    "MAX_CODE_BYTES",
]

CODE_SUFFIXES = (".py", ".so", ".pyd")  # what a package's code digest covers (data files, caches and docs are not code)
MAX_CODE_FILES = 20_000
MAX_CODE_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class CodePolicy:
    """Which user code may be imported. `allow`: top-level packages (or dotted prefixes such as `pkg.models`);
    `trust_all`: any module (only for a spec the caller wrote itself). The default allows built-ins alone."""

    allow: frozenset[str] = frozenset()
    trust_all: bool = False

    @staticmethod
    def trust_all_code() -> CodePolicy:
        """The policy of the caller who wrote the spec (the solver training it, a client resolving it)."""
        return CodePolicy(trust_all=True)

    @staticmethod
    def allowing(packages: Iterable[str]) -> CodePolicy:
        """A verifier's policy: built-ins plus `packages`. Raises ComponentError on a malformed package name."""
        names = frozenset(packages)
        for name in names:
            if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
                raise ComponentError(f"--allow-code expects a package name such as mypkg or mypkg.models, got {name!r}")
        return CodePolicy(allow=names)

    def permits(self, module: str) -> bool:
        """True if `module` (a dotted module name) may be imported under this policy."""
        return self.trust_all or any(module == p or module.startswith(p + ".") for p in self.allow)


def is_import_path(name: str) -> bool:
    """True for `package.module:attr` references."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and not name.startswith("dir:")


def get_package(ref: str) -> str:
    """The top-level package of `module:attr` (what an allow-list and a code digest are about)."""
    return ref.partition(":")[0].split(".")[0]


def verify_code_allowed(role: str, ref: str, policy: CodePolicy) -> None:
    """Raise CodeNotAllowed unless `ref` (a `module:callable` named as the spec's `role`) is allowed. Imports nothing."""
    if is_import_path(ref) and not policy.permits(ref.partition(":")[0]):
        raise CodeNotAllowed(role, ref, get_package(ref))


def load_callable(ref: str, policy: CodePolicy) -> Callable[..., Any]:
    """Import `module:attr[.attr]` and return the callable, if `policy` allows the module.

    Raises CodeNotAllowed (before importing anything) or ComponentError naming what failed.
    """
    verify_code_allowed("component", ref, policy)
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentError(f"cannot import module {module_name!r} for {ref!r}: {exc}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ComponentError(f"module {module_name!r} has no attribute {attr_path!r} (from {ref!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ComponentError(f"{ref!r} is not callable")
    return obj


def _code_files(package: str) -> list[tuple[str, Path]]:
    """(name inside the package, path) of every code file of a top-level package, found without importing it."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise ComponentError(f"cannot find package {package!r}: {exc}") from None
    if found is None:
        raise ComponentError(f"package {package!r} is not installed here (nor on PYTHONPATH)")
    if found.submodule_search_locations:
        files = []
        for location in sorted(found.submodule_search_locations):
            root = Path(location)
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for name in sorted(filenames):
                    if name.endswith(CODE_SUFFIXES):
                        path = Path(dirpath) / name
                        files.append((f"{package}/{path.relative_to(root).as_posix()}", path))
                if len(files) > MAX_CODE_FILES:
                    raise ComponentError(f"package {package!r} has more than {MAX_CODE_FILES} code files to pin")
        return sorted(files)
    if found.origin in ("frozen", "built-in"):  # part of the interpreter: pinned by the interpreter's version
        return []
    if found.origin is None or not Path(found.origin).is_file():
        raise ComponentError(f"package {package!r} has no source file to pin (origin {found.origin!r})")
    return [(Path(found.origin).name, Path(found.origin))]


def compute_code_digest(ref: str) -> Digest:
    """blake3 over the names and bytes of every code file of `ref`'s top-level package, in sorted name order (for a
    module frozen into or built into the interpreter, over the interpreter's version). Reads files only: nothing is
    imported or run. A digest is reused within a process while every file keeps its size and modification time (a
    verifier builds a runtime per segment and would otherwise hash the package each time). Raises ComponentError
    if the package cannot be found or is larger than MAX_CODE_FILES files or MAX_CODE_BYTES bytes."""
    package = get_package(ref)
    files = _code_files(package)
    try:
        key = (package, tuple((name, (st := path.stat()).st_size, st.st_ino, st.st_mtime_ns) for name, path in files))
    except OSError as exc:
        raise ComponentError(f"cannot read the code of package {package!r}: {exc}") from None
    if (cached := _DIGESTS.get(key)) is not None:
        return cached
    h = blake3.blake3(b"pol/code/v1\x00")
    if not files:  # a frozen or built-in module: its code is the interpreter's
        h.update(f"interpreter:{package}:{sys.implementation.name}:{sys.version}".encode())
    total = 0
    for name, path in files:
        data = path.read_bytes()
        total += len(data)
        if total > MAX_CODE_BYTES:
            raise ComponentError(f"package {package!r} holds more than {MAX_CODE_BYTES >> 20} MiB of code to pin")
        encoded = name.encode("utf-8", "surrogateescape")
        h.update(len(encoded).to_bytes(8, "little") + encoded + len(data).to_bytes(8, "little"))
        h.update(data)
    digest = h.hexdigest()
    newest = max((entry[3] for entry in key[1]), default=0)
    if newest < time.time_ns() - 2_000_000_000:  # a file changed within the clock's granularity could change again unseen
        if len(_DIGESTS) >= 64:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


MAX_PINNED_DISTRIBUTIONS = 12  # third-party distributions a user package may import (the spec's versions hold 16)
UNPINNED = frozenset({"pol", "torch"})  # pinned by the spec already (pol always, torch always: exact checks it)


def compute_imported_versions(ref: str) -> dict[str, str]:
    """The installed versions of the third-party distributions `ref`'s top-level package imports, found by reading
    its source (`import x` / `from x import ...`, anywhere in the package's `.py` files; nothing is imported):
    e.g. {"transformers": "4.57.1"} for a package that builds a transformers model. A spec binds them, like the
    package's own code digest, because that code runs as part of the model. Standard-library modules, modules of
    the package itself and modules no installed distribution provides (another package on PYTHONPATH: pin it by
    naming it as the component) are left out. Raises ComponentError past MAX_PINNED_DISTRIBUTIONS."""
    package = get_package(ref)
    modules: set[str] = set()
    for _, path in _code_files(package):
        if path.suffix != ".py":
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # the import of the component reports it, with its line
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    versions: dict[str, str] = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - {package}):
        for dist in providers.get(module, []):
            name = dist.lower().replace("_", "-")
            if name not in UNPINNED:
                versions[name] = importlib.metadata.version(dist)
    if len(versions) > MAX_PINNED_DISTRIBUTIONS:
        raise ComponentError(f"package {package!r} imports {len(versions)} third-party distributions "
                             f"({', '.join(sorted(versions))}); a job pins at most {MAX_PINNED_DISTRIBUTIONS}")
    return versions


_DIGESTS: dict[tuple[Any, ...], Digest] = {}  # (package, files' names, sizes, inodes, mtimes) -> digest
