"""The recipe layer: YAML recipe -> validated Recipe -> expanded Items. Public API: flowgen.recipe.api.

    api.py         the public surface: load_recipe, expand_items, validate_task, check_references
    spec.py        the imageInference spec's values and limits (data only; flowgen.plan reads it too)
    schema.py      pydantic models of a recipe and of a task (TaskFields), and the Item
    validation.py  every rule that decides whether a task is valid and supported, and its references
    loading.py     safe YAML, --set overrides, load() stage by stage
    datasets.py    CSV / JSONL / image-glob / inline tables read into keyed rows
    expansion.py   the matrix (product, zip, exclude, include) and expand() into Items
    naming.py      the output folder and each result's file name, kept inside the folder
    templates.py   `{field}` templates

Kept import-free so that importing one module (spec.py, say) does not load the others.
"""
