"""A small incremental recipe ("nightly": a CSV of products, 128x128 PNG, 2 steps) written into a folder,
its rows, and `flowgen run` of it through the command (the `engine` fixture in conftest.py renders)."""

from __future__ import annotations

from pathlib import Path


def write_recipe(folder: Path, *, dataset: str = "products: {csv: products.csv, key: '{sku}', incremental: true}",
                 matrix: str = "product: products", prompt: str = "photo of {product.name}",
                 filename: str = "{product.sku}_{result}.{ext}", extra: str = "", task: str = "") -> Path:
    """A small recipe (128x128 PNG, 2 steps, 1 result per item) in `folder`."""
    path = folder / "recipe.yaml"
    path.write_text(f"""version: 1
name: nightly
model: flux2-klein-tiny
{extra}
datasets:
  {dataset}
matrix:
  {matrix}
task:
  positivePrompt: "{prompt}"
  width: 128
  height: 128
  steps: 2
  outputFormat: PNG
  {task}
output:
  dir: out/{{name}}
  filename: "{filename}"
""")
    return path


def write_rows(folder: Path, rows: list[tuple[str, str]]) -> None:
    (folder / "products.csv").write_text("sku,name\n" + "".join(f"{sku},{name}\n" for sku, name in rows))


def run(recipe: Path, *overrides: str, **options) -> int:
    """`flowgen run` through its command (the fake engine renders)."""
    from flowgen.commands.run import run_command

    return run_command(str(recipe), None, list(overrides), None, False, **options)
