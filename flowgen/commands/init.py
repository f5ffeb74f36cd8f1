"""`flowgen init [DIRECTORY]`: a starter recipe with sample data, runnable on a fresh machine.

Writes recipe.yaml (commented; the embedded tiny model, so nothing needs downloading), a small CSV
dataset and three reference images drawn here with Pillow. Checks every target first and refuses
to overwrite any existing file unless --force, so a refusal writes nothing.
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path

import click

from flowgen.errors import FlowgenError
from flowgen.run.atomic import atomic_write_bytes

RECIPE_NAME = "recipe.yaml"

RECIPE = """\
# A starter flowgen recipe, written by `flowgen init`. It edits three sample reference images
# (refs/*.png) into two scenes with the embedded tiny model, so it runs on any machine (CPU is fine)
# in about a minute with nothing to download. The tiny model has random weights: its images are
# structured noise, not pictures. Next:
#   flowgen validate recipe.yaml     check it: every problem at once, nothing written
#   flowgen plan recipe.yaml         what a run would do: items, results, batches, what is new
#   flowgen run recipe.yaml          render into out/starter/ (a rerun renders only what changed)
#   flowgen status out/starter       what the output folder holds
# For real images, fetch a real model's weights (`flowgen models` says how), then set
# `model: runware:400@6` (FLUX.2 [klein] 9B KV) and width/height 1024. Every field: docs/recipes.md.
version: 1
name: starter
model: flux2-klein-tiny          # the embedded tiny model; `flowgen models` lists the real ones
seed: 42                         # each result's seed derives from this, the item's key and the result index
defaults:                        # any imageInference field, spelled as in the Runware API spec
  width: 256
  height: 256
  steps: 4
  outputFormat: PNG
datasets:
  shapes: {csv: data/shapes.csv, key: "{id}"}       # one row per sample image; paths relative to this file
  scenes:                        # inline rows; the first field is the key
    values: [{id: table, text: a wooden table}, {id: beach, text: a sunny beach}]
matrix:                          # every shape in every scene: 3 x 2 = 6 items
  shape: shapes
  scene: scenes
task:                            # templated per item from the matrix variables
  positivePrompt: "The {shape.color} {shape.name} from the reference image, standing on {scene.text}, soft light"
  inputs:
    referenceImages: ["{shape.image}"]   # 1-4 images per item
output:
  dir: out/{name}                # relative to this file
  filename: "{shape.id}_on_{scene.id}_{result}.{ext}"   # must contain {ext}
"""

SHAPES = [  # (id, name, colour name, RGB)
    ("circle", "ball", "red", (200, 40, 40)),
    ("square", "box", "blue", (40, 80, 200)),
    ("triangle", "pyramid", "green", (40, 160, 70)),
]


def init_command(directory: str, force: bool) -> None:
    """Write the starter files into DIRECTORY (created if missing) and print what to run next."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise FlowgenError(f"{root}: exists and is not a folder; name a folder to write the starter recipe into")
    files = starter_files()
    if not force:
        for relative in files:
            if (root / relative).exists():
                raise FlowgenError(
                    f"{root / relative}: already exists; nothing was written "
                    "(pass --force to overwrite the starter files)"
                )
    try:
        for relative, data in files.items():
            atomic_write_bytes(root / relative, data)
    except OSError as err:
        raise FlowgenError(f"{root}: cannot write the starter files ({err.strerror or err})") from None
    for relative in files:
        click.echo(f"wrote {root / relative}")
    recipe = shlex.quote(str(root / RECIPE_NAME))
    out = shlex.quote(str(root / "out" / "starter"))
    click.echo("next:")
    click.echo(f"  flowgen validate {recipe}   # check it")
    click.echo(f"  flowgen plan {recipe}       # what a run would do")
    click.echo(f"  flowgen run {recipe}        # render 6 images with the tiny model")
    click.echo(f"  flowgen status {out}")


def starter_files() -> dict[str, bytes]:
    """Relative path -> bytes of every file `init` writes (the same bytes on every machine)."""
    rows = ["id,name,color,image"] + [f"{sid},{name},{colour},refs/{sid}.png" for sid, name, colour, _ in SHAPES]
    files = {RECIPE_NAME: RECIPE.encode(), "data/shapes.csv": ("\n".join(rows) + "\n").encode()}
    for sid, _, _, rgb in SHAPES:
        files[f"refs/{sid}.png"] = sample_image(sid, rgb)
    return files


def sample_image(shape: str, rgb: tuple[int, int, int], size: int = 256) -> bytes:
    """A PNG of one coloured shape on a light vertical gradient (a stand-in product packshot)."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((size, size)).point(lambda v: 235 - v // 8).convert("RGB")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, size * 3 // 4, size * 3 // 4)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(size // 2, size // 4), (size * 3 // 4, size * 3 // 4), (size // 4, size * 3 // 4)], fill=rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
