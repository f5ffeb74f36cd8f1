"""`flowgen run` and `flowgen serve` render and deliver by one path, read from the source (AST) so it stays so:
the server calls the shared steps (flowgen.run.render, flowgen.delivery.dispatch) instead of the engine or the
encoder, reaches into no private name of run/ or delivery/ and subclasses nothing of theirs, and run/ and
delivery/ import nothing of the server."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "flowgen"
# what only the shared render path calls: an engine call, a face pass, an encode, an engine request
RENDER_STEPS = {"generate_batch", "refine_faces", "encode_image", "BatchRequest", "for_jobs"}


def modules(*folders: str):
    for folder in folders:
        for path in sorted((PACKAGE / folder).glob("*.py")):
            yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(encoding="utf-8"))


def imports_from(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_run_and_delivery_import_nothing_of_the_server():
    offenders = [f"{path}: {module}" for path, tree in modules("run", "delivery")
                 for module, _ in imports_from(tree) if module.startswith("flowgen.serve")]
    assert offenders == []


def test_the_server_uses_only_public_names_of_run_and_delivery_and_subclasses_none():
    private, subclassed = [], []
    for path, tree in modules("serve"):
        shared = set()
        for module, names in imports_from(tree):
            if module.startswith(("flowgen.run", "flowgen.delivery")):
                private += [f"{path}: {module}.{name}" for name in names if name.startswith("_")]
                shared.update(names)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                subclassed += [f"{path}: {node.name}({base.id})" for base in node.bases
                               if isinstance(base, ast.Name) and base.id in shared]
    assert private == [] and subclassed == []


def test_the_server_renders_only_through_the_shared_steps():
    calls = []
    for path, tree in modules("serve"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in RENDER_STEPS:
                    calls.append(f"{path}:{node.lineno}: {name}")
    assert calls == [], "call flowgen.run.render (render_batch, finish_image) instead"
