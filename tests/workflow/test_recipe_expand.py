"""Matrix expansion, stable keys, templating and output naming of recipes (flowgen.recipe.api)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flowgen.errors import RecipeError
from flowgen.recipe.api import expand_items, load_recipe

PRODUCTS = "sku,name,image\nA-100,white sneaker,refs/a.jpg\nB-200,brown boot,refs/b.jpg\nC-300,red loafer,refs/c.jpg\n"


def write_recipe(folder: Path, recipe: dict, files: dict[str, str] | None = None) -> Path:
    """Write recipe.yaml (and data files) into `folder`; return the recipe path."""
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def base(**changes) -> dict:
    recipe = {
        "version": 1,
        "name": "shoes",
        "model": "runware:400@6",
        "seed": 1234,
        "defaults": {"width": 512, "height": 512, "outputFormat": "WEBP"},
        "datasets": {"products": {"csv": "data/products.csv", "key": "{sku}"}, "surfaces": {"values": ["marble", "linen", "oak"]}},
        "matrix": {"product": "products", "surface": "surfaces"},
        "task": {"positivePrompt": "Photo of {product.name} on {surface}", "inputs": {"referenceImages": ["{product.image}"]}},
        "output": {"filename": "{product.sku}_{surface}_{result}.{ext}"},
    }
    recipe.update(changes)
    return recipe


def items_of(tmp_path: Path, recipe: dict, csv: str = PRODUCTS, overrides=()) -> list:
    path = write_recipe(tmp_path, recipe, {"data/products.csv": csv})
    return expand_items(load_recipe(path, list(overrides)))


def test_product_of_two_variables_gives_every_combination_with_value_keys(tmp_path):
    items = items_of(tmp_path, base())
    assert len(items) == 9
    assert items[0].key == "product=A-100|surface=linen"  # sorted by key, variables sorted by name
    assert [i.key for i in items] == sorted(i.key for i in items)
    first = items[0]
    assert first.values == {"product": {"sku": "A-100", "name": "white sneaker", "image": "refs/a.jpg"}, "surface": "linen"}
    assert first.task["positivePrompt"] == "Photo of white sneaker on linen"


def test_exclude_matches_nested_columns_keys_and_lists(tmp_path):
    recipe = base(exclude=[{"surface": "oak", "product": {"sku": "A-100"}}, {"product": "B-200", "surface": ["linen", "marble"]}])
    keys = {i.key for i in items_of(tmp_path, recipe)}
    assert len(keys) == 9 - 1 - 2
    assert "product=A-100|surface=oak" not in keys
    assert "product=B-200|surface=linen" not in keys and "product=B-200|surface=marble" not in keys
    assert "product=B-200|surface=oak" in keys and "product=A-100|surface=linen" in keys


def test_include_extends_matching_combinations_and_adds_unmatched_ones(tmp_path):
    recipe = base(include=[{"surface": "oak", "light": "warm"}, {"product": {"sku": "B-200"}, "surface": "velvet"}])
    recipe["task"]["positivePrompt"] = "Photo of {product.name} on {surface}"
    items = {i.key: i for i in items_of(tmp_path, recipe)}
    assert len(items) == 10
    oak = items["light=warm|product=C-300|surface=oak"]  # extended: the added variable joins the key
    assert oak.values["light"] == "warm"
    velvet = items["product=B-200|surface=velvet"]  # no combination has velvet: a new one
    assert velvet.task["positivePrompt"] == "Photo of brown boot on velvet"
    assert "product=A-100|surface=marble" in items  # untouched


def test_include_never_overwrites_a_matrix_value(tmp_path):
    recipe = base(include=[{"product": "A-100", "surface": "oak", "light": "rim"}])
    keys = {i.key for i in items_of(tmp_path, recipe)}
    assert "light=rim|product=A-100|surface=oak" in keys and len(keys) == 9


def test_include_only_matrix_makes_one_item_per_entry(tmp_path):
    recipe = base(matrix={}, include=[{"pose": "front"}, {"pose": "side"}], datasets={})
    recipe["task"] = {"positivePrompt": "A shoe, {pose} view"}
    recipe["output"] = {"filename": "{pose}_{result}.{ext}"}
    items = items_of(tmp_path, recipe)
    assert [i.key for i in items] == ["pose=front", "pose=side"]
    assert items[1].task["positivePrompt"] == "A shoe, side view"


def test_zip_pairs_rows_and_joins_the_product(tmp_path):
    recipe = base(matrix={"surface": ["marble", "oak"]}, zip=[{"product": "products", "light": ["soft", "hard", "rim"]}])
    items = items_of(tmp_path, recipe)
    assert len(items) == 6
    pairs = {(i.values["product"]["sku"], i.values["light"]) for i in items}
    assert pairs == {("A-100", "soft"), ("B-200", "hard"), ("C-300", "rim")}
    assert items[0].key == "light=hard|product=B-200|surface=marble"


def test_keys_and_tasks_do_not_depend_on_row_order_or_other_rows(tmp_path):
    for folder in "abc":
        (tmp_path / folder).mkdir()
    first = {i.key: i.task for i in items_of(tmp_path / "a", base())}
    lines = PRODUCTS.splitlines()
    reordered = "\n".join([lines[0], lines[3], lines[1], lines[2]]) + "\n"
    second = {i.key: i.task for i in items_of(tmp_path / "b", base(), csv=reordered)}
    assert first.keys() == second.keys()
    for key in first:
        assert {**first[key], "inputs": None} == {**second[key], "inputs": None}  # paths differ by folder only
    grown = {i.key: i for i in items_of(tmp_path / "c", base(), csv=reordered + "D-400,green clog,refs/d.jpg\n")}
    assert len(grown) == 12
    for key, task in second.items():
        assert grown[key].task["positivePrompt"] == task["positivePrompt"]


def test_whole_placeholders_keep_types_and_csv_numbers_become_numbers(tmp_path):
    recipe = base(datasets={"sizes": {"jsonl": "data/sizes.jsonl", "key": "{label}"}, "products": {"csv": "data/products.csv"}})
    recipe["matrix"] = {"size": "sizes", "product": "products"}
    recipe["task"] = {"positivePrompt": "{product.name}", "width": "{size.w}", "height": "{product.h}"}
    recipe["output"] = {"filename": "{slug}.{ext}"}
    csv = "sku,name,h\nA-100,white sneaker,768\n"
    path = write_recipe(tmp_path, recipe, {"data/products.csv": csv, "data/sizes.jsonl": '{"label": "wide", "w": 1024}\n{"label": "square", "w": 512}\n'})
    items = expand_items(load_recipe(path))
    assert [(i.key, i.task["width"], i.task["height"]) for i in items] == [("product=A-100|size=square", 512, 768), ("product=A-100|size=wide", 1024, 768)]


def test_templated_value_out_of_range_is_reported_per_item(tmp_path):
    recipe = base()
    recipe["task"]["width"] = "{product.w}"
    csv = "sku,name,image,w\nA-100,white sneaker,refs/a.jpg,512\nB-200,brown boot,refs/b.jpg,1000\n"
    with pytest.raises(RecipeError) as err:
        items_of(tmp_path, recipe, csv=csv)
    assert err.value.problems == [
        "task.width: must be a multiple of 16 between 128 and 2048, got '1000' (item 'product=B-200|surface=linen') [and 2 more items with this problem]"
    ]


def test_unknown_template_field_names_the_row_and_the_available_fields(tmp_path):
    recipe = base()
    recipe["task"]["positivePrompt"] = "Photo of {product.nme}"
    with pytest.raises(RecipeError) as err:
        items_of(tmp_path, recipe)
    assert err.value.problems == [
        "task.positivePrompt: template names unknown field 'product.nme' (row A-100 of dataset products); "
        "available: product.sku, product.name, product.image, surface, name, key [and 8 more items with this problem]"
    ]


def test_defaults_merge_under_task_and_model_defaults_fill_the_rest(tmp_path):
    recipe = base()
    recipe["task"]["width"] = 768
    task = items_of(tmp_path, recipe)[0].task
    assert (task["width"], task["height"], task["outputFormat"]) == (768, 512, "WEBP")
    assert task["model"] == "runware:400@6" and task["steps"] == 4 and task["numberResults"] == 1
    assert task.get("CFGScale", 1.0) == 1.0  # 9B KV is distilled: no guidance


def test_base_model_gets_guidance_default_and_accepts_cfg(tmp_path):
    task = items_of(tmp_path, base(model="runware:400@3"))[0].task
    assert task["CFGScale"] > 1  # the card (4.0) or the spec default (3.5): guidance on
    (tmp_path / "b").mkdir()
    recipe = base(model="runware:400@3")
    recipe["task"]["CFGScale"] = 5
    assert items_of(tmp_path / "b", recipe)[0].task["CFGScale"] == 5.0


def test_references_resolve_against_the_recipe_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = base()
    recipe["task"]["inputs"]["referenceImages"] = ["{product.image}", "brand/style.jpg", "/abs/x.jpg"]
    item = items_of(tmp_path, recipe)[0]
    assert item.references == (tmp_path / "refs/a.jpg", tmp_path / "brand/style.jpg", Path("/abs/x.jpg"))
    assert item.task["inputs"]["referenceImages"] == [str(p) for p in item.references]


def test_images_dataset_rows_are_path_and_stem_with_filter(tmp_path):
    for name in ("b.jpg", "a.jpg", "skip.png"):
        (tmp_path / "refs").mkdir(exist_ok=True)
        (tmp_path / "refs" / name).write_bytes(b"x")
    recipe = base(datasets={"photos": {"images": "refs/*.jpg", "filter": {"name": ["a", "b"]}}}, matrix={"photo": "photos"})
    recipe["task"] = {"positivePrompt": "Edit {photo.name}", "inputs": {"referenceImages": ["{photo.path}"]}}
    recipe["output"] = {"filename": "{photo.name}_{result}.{ext}"}
    items = items_of(tmp_path, recipe)
    assert [i.key for i in items] == ["photo=a", "photo=b"]
    assert items[0].values["photo"] == {"path": "refs/a.jpg", "name": "a"}
    assert items[0].references == (tmp_path / "refs/a.jpg",)


def test_dataset_filter_keeps_matching_rows(tmp_path):
    recipe = base()
    recipe["datasets"]["products"]["filter"] = {"sku": ["A-100", "C-300"]}
    assert {i.values["product"]["sku"] for i in items_of(tmp_path, recipe)} == {"A-100", "C-300"}


def test_filename_rendering_subfolders_format_specs_and_output_dir(tmp_path):
    recipe = base(output={"dir": "renders/{name}", "filename": "{surface}/{product.sku}-{result:03d}.{ext}"})
    path = write_recipe(tmp_path, recipe, {"data/products.csv": PRODUCTS})
    loaded = load_recipe(path)
    item = expand_items(loaded)[0]
    assert loaded.render_filename(item, 7, "webp") == "linen/A-100-007.webp"
    assert loaded.output_dir(None) == tmp_path / "renders/shoes"
    assert loaded.output_dir(tmp_path / "x") == (tmp_path / "x").resolve()


def test_default_filename_uses_a_safe_slug_of_the_key(tmp_path):
    recipe = base()
    recipe.pop("output")
    path = write_recipe(tmp_path, recipe, {"data/products.csv": PRODUCTS})
    loaded = load_recipe(path)
    assert loaded.render_filename(expand_items(loaded)[0], 1, "webp") == "product-A-100_surface-linen_1.webp"
    assert loaded.output_dir(None) == tmp_path / "out/shoes"


def test_filename_that_data_makes_escape_is_an_error_naming_output_filename(tmp_path):
    recipe = base(output={"filename": "{product.sku}/{surface}_{result}.{ext}"})
    with pytest.raises(RecipeError) as err:
        items_of(tmp_path, recipe, csv="sku,name,image\n..,x,refs/a.jpg\n")
    assert all(p.startswith("output.filename: '../") and "escapes the output folder" in p for p in err.value.problems)


def test_duplicate_keys_name_both_rows(tmp_path):
    with pytest.raises(RecipeError) as err:
        items_of(tmp_path, base(), csv=PRODUCTS + "A-100,again,refs/a.jpg\n")
    assert err.value.problems == [
        "datasets.products: duplicate key 'A-100' in line 2 of data/products.csv and line 5 of data/products.csv; "
        "set `key:` to a template that is unique per row"
    ]


def test_braces_can_be_escaped(tmp_path):
    recipe = base()
    recipe["task"]["positivePrompt"] = "Logo {{brand}} on {surface}"
    assert items_of(tmp_path, recipe)[0].task["positivePrompt"] == "Logo {brand} on linen"


def test_raw_is_the_overridden_plain_dict(tmp_path):
    path = write_recipe(tmp_path, base(), {"data/products.csv": PRODUCTS})
    loaded = load_recipe(path, ["task.steps=8", "defaults.outputFormat=PNG"])
    assert loaded.raw["task"]["steps"] == 8 and loaded.raw["defaults"]["outputFormat"] == "PNG"
    assert json.loads(json.dumps(loaded.raw)) == loaded.raw
    assert loaded.source_path == path.resolve() and loaded.seed == 1234 and loaded.name == "shoes"
    assert expand_items(loaded)[0].task["outputFormat"] == "PNG"
