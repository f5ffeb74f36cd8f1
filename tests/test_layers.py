"""The layer rules, read from the source (AST), so a violation fails here before it spreads:

* code outside flowgen/engine imports the engine through its front door only: `from flowgen.engine
  import Name` for a name the package exports, never a module inside it;
* the engine imports nothing of the workflow (recipe, plan, run, serve, commands, report, delivery,
  cli), and refuses arguments with its own EngineInputError, not the recipe's RecipeError;
* the front door's lazy table, its TYPE_CHECKING imports and __all__ name the same things, and the names the
  workflow imports at module level load no JAX (nor does the catalog).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flowgen.engine

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowgen"
ENGINE = PACKAGE / "engine"
WORKFLOW_PACKAGES = ("recipe", "plan", "run", "serve", "commands", "report", "delivery", "cli")


def _modules(folder: Path, *, exclude: Path | None = None):
    for path in sorted(folder.rglob("*.py")):
        if exclude is None or exclude not in path.parents:
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _imports(tree: ast.AST):
    """(line, imported module, names) for every import statement, wherever it sits (functions included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, tuple(alias.name for alias in node.names)


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_code_outside_the_engine_imports_only_its_front_door():
    exported = set(flowgen.engine.__all__)
    offenders = []
    for path, tree in _modules(PACKAGE, exclude=ENGINE):
        for line, module, names in _imports(tree):
            if module.startswith("flowgen.engine."):
                offenders.append(f"{_where(path, line)} imports {module}")
            elif module == "flowgen.engine":
                offenders += [
                    f"{_where(path, line)} imports {name} (not a name flowgen.engine exports)"
                    for name in names
                    if name not in exported
                ]
    assert offenders == [], "import these from flowgen.engine (export them in its __init__): " + "; ".join(offenders)


def test_the_engine_imports_nothing_of_the_workflow():
    forbidden = tuple(f"flowgen.{name}" for name in WORKFLOW_PACKAGES)
    offenders = []
    for path, tree in _modules(ENGINE):
        for line, module, names in _imports(tree):
            if module == "flowgen":
                module_names = [f"flowgen.{name}" for name in names]
            else:
                module_names = [module]
            offenders += [
                f"{_where(path, line)} imports {name}"
                for name in module_names
                if name in forbidden or name.startswith(tuple(f"{f}." for f in forbidden))
            ]
            if module == "flowgen.errors" and "RecipeError" in names:
                offenders.append(f"{_where(path, line)} imports RecipeError (the engine raises EngineInputError)")
    assert offenders == [], "; ".join(offenders)


def test_the_lazy_exports_their_type_checking_imports_and_all_agree():
    tree = ast.parse((ENGINE / "__init__.py").read_text(encoding="utf-8"))
    table = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
    )
    lazy = {}
    for key, value in zip(table.keys, table.values):
        module, _, attr = value.value.partition(":")
        lazy[key.value] = (module, attr or key.value)
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    typed = {
        alias.asname or alias.name: (node.module, alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == lazy
    assert sorted(flowgen.engine.__all__) == sorted(lazy)


def test_every_export_resolves():
    # names only: resolving each imports its module, which for the generation names means JAX (fine here)
    for name in flowgen.engine.__all__:
        assert getattr(flowgen.engine, name) is not None, name


def _module_level_engine_names() -> set[str]:
    """The names workflow modules import from flowgen.engine when they are imported (not inside functions)."""
    names = set()
    for _, tree in _modules(PACKAGE, exclude=ENGINE):
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "flowgen.engine":
                names.update(alias.name for alias in node.names)
    return names


def test_what_the_workflow_imports_at_module_level_and_the_catalog_load_no_jax():
    names = sorted(_module_level_engine_names())
    assert {"ModelCard", "capabilities", "step_cache_option_problems", "reference_sha256"} <= set(names)
    code = (
        "import sys\n"
        "import flowgen.engine.catalog.cards, flowgen.engine.catalog.capabilities, flowgen.engine.catalog.tiny_model\n"
        f"from flowgen.engine import {', '.join(names)}\n"
        "import flowgen.cli, flowgen.recipe.api, flowgen.plan\n"
        "loaded = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
