"""The package's layers, as README "Layout" states them, checked on the source.

core → config schema → adapters → modules → config loader, engine → cli:
a module imports only from its own layer and those before it (imports under
``TYPE_CHECKING`` are for annotations and do not count), and no import sits
inside a function where it could hide a cycle (:data:`LAZY_IMPORTS_ALLOWED`
and an adapter kind's openers, which import a backend only when a config
chooses it, are the exceptions).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE, SCHEMA, ADAPTERS, MODULES, ENGINE, CLI = range(6)
# Above the modules: what loads a config or runs the engine (and embeds it).
ENGINE_LAYER = {
    "iii.config",
    "iii.engine",
    "iii.serve",
    "iii.listener",
    "iii.systemd",
    "iii.testing",
    "iii.embedding",
    "iii.pytest_plugin",
    "iii.cluster",
}
# Lazy on purpose, and hiding no cycle: the CLI imports what one command needs,
# ``import iii`` loads the embedding API on first use of its names, and the
# pytest plugin (loaded in every project that installs iii) imports nothing
# until a fixture is used.
LAZY_IMPORTS_ALLOWED = {"iii.cli", "iii", "iii.pytest_plugin"}
# (importer, imported) pairs imported inside a function, each for a stated reason.
LAZY_PAIRS_ALLOWED = {
    # Only a clustered engine pays for the cluster (coredis, the peer links);
    # no cycle: the cluster's supervisor uses iii.sd_notify, not iii.systemd.
    ("iii.serve", "iii.cluster"),
}


def layer(module: str) -> int:
    if module == "iii.config_schema":
        return SCHEMA
    if module.startswith("iii.adapters"):
        return ADAPTERS
    if module.startswith("iii.modules"):
        return MODULES
    if module in ENGINE_LAYER or module.startswith(("iii.embedding.", "iii.cluster.")):
        return ENGINE
    if module in ("iii.cli", "iii.__main__"):
        return CLI
    return CORE


def imports():
    """(importer, imported, inside a function) for every runtime import of iii."""
    for path in sorted((ROOT / "iii").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        importer = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from iii.adapters.queue import redis`` imports iii.adapters.queue.redis
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [node.module] if node.module != importer else names
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "iii" or name.startswith("iii."):
                    yield importer, name, node.col_offset > 0


def test_no_layer_imports_from_a_later_one():
    upward = [
        f"{importer} imports {imported}"
        for importer, imported, _ in imports()
        if layer(imported) > layer(importer) and (importer, imported) not in LAZY_PAIRS_ALLOWED
    ]
    assert upward == []


def test_the_config_schema_is_a_leaf():
    used = {imported for importer, imported, _ in imports() if importer == "iii.config_schema"}
    assert used == {"iii.errors"}


def lazy_backend(importer: str, imported: str) -> bool:
    """An adapter kind's opener importing one of its own backends when chosen
    (a backend imports its kind's ``base``, never the package: no cycle)."""
    parts = importer.split(".")
    return (
        len(parts) == 3
        and parts[:2] == ["iii", "adapters"]
        and imported.startswith(importer + ".")
        and imported.count(".") == 3
        and not imported.endswith((".base", ".embedded"))
    )


def test_no_function_local_import():
    local = [
        f"{importer} imports {imported} inside a function"
        for importer, imported, inside in imports()
        if inside
        and importer not in LAZY_IMPORTS_ALLOWED
        and (importer, imported) not in LAZY_PAIRS_ALLOWED
        and not lazy_backend(importer, imported)
    ]
    assert local == []


def test_a_backend_never_imports_its_kind_package():
    # What makes the lazy openers safe: ``iii.adapters.queue.redis`` imports
    # ``iii.adapters.queue.base``, not ``iii.adapters.queue``.
    kinds = {"iii.adapters." + kind for kind in ("cron", "pubsub", "queue", "state", "stream")}
    back = [
        f"{importer} imports {imported}"
        for importer, imported, _ in imports()
        if imported in kinds and importer.startswith(imported + ".")
    ]
    assert back == []
