"""The recipe document as pydantic models (extra="forbid" everywhere).

The top level is structural only: `defaults` and `task` stay plain dicts here because they may hold
templates (`"{product.name}"`) that only become values per item; their imageInference rules live in
task_model.py / task_rules.py and run on every resolved item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from flowgen.recipe.item import Item
from flowgen.recipe.naming import FilenameRenderer
from flowgen.recipe.spec_values import SEED_MAX

class Strict(BaseModel):
    """Base for every recipe model: unknown keys are errors, nothing is coerced silently."""

    model_config = ConfigDict(extra="forbid")


class DatasetSpec(Strict):
    """One named table of rows. Exactly one source: csv, jsonl, images (a glob) or values (inline)."""

    csv: str | None = None
    jsonl: str | None = None
    images: str | None = None
    values: list[Any] | None = None
    key: str | None = None
    filter: dict[str, Any] | None = None

    @field_validator("values")
    @classmethod
    def _rows(cls, values: list[Any] | None) -> list[Any] | None:
        for index, value in enumerate(values or []):
            if not isinstance(value, (str, int, float, bool, dict)):
                raise ValueError(f"values[{index}] must be a scalar or a mapping of columns, got {value!r}")
        return values

    @field_validator("filter")
    @classmethod
    def _scalars(cls, filters: dict[str, Any] | None) -> dict[str, Any] | None:
        for column, wanted in (filters or {}).items():
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if not isinstance(value, (str, int, float, bool)):
                    raise ValueError(f"{column}: must be a value or a list of values, got {value!r}")
        return filters

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        given = [name for name in ("csv", "jsonl", "images", "values") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of csv, jsonl, images, values; got {', '.join(given) or 'none'}")
        return self

    @property
    def source(self) -> str:
        """Which kind of source this dataset reads: "csv", "jsonl", "images" or "values"."""
        return next(name for name in ("csv", "jsonl", "images", "values") if getattr(self, name) is not None)


class OutputSpec(Strict):
    """Where results go. Both are templates; both must stay inside the output folder."""

    dir: str = "out/{name}"
    filename: str = "{slug}_{result}.{ext}"


class Recipe(Strict):
    """A validated recipe. Build it with flowgen.recipe.api.load_recipe, not directly."""

    version: Literal[1]
    name: str
    description: str | None = None
    model: str | None = None
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    defaults: dict[str, Any] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    matrix: dict[str, Any] = Field(default_factory=dict)  # variable -> dataset name | inline list (checked in loading)
    zip: list[dict[str, Any]] = Field(default_factory=list)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    task: dict[str, Any]
    output: OutputSpec = Field(default_factory=OutputSpec)

    _source_path: Path = PrivateAttr(default=Path("recipe.yaml"))
    _raw: dict = PrivateAttr(default_factory=dict)
    _rows: dict = PrivateAttr(default_factory=dict)  # dataset name -> list[Row], filled by loading
    _card: Any = PrivateAttr(default=None)
    _filename_renderer: Any = PrivateAttr(default=None)

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value != 1 or isinstance(value, bool):
            raise ValueError(f"must be 1 (the only recipe format so far), got {value!r}")
        return value

    @field_validator("name", mode="before")
    @classmethod
    def _safe_name(cls, value: Any) -> Any:
        import re

        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit (it names the output folder), got {value!r}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _no_bool_seed(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer between 0 and {SEED_MAX}, got {value!r}")
        return value

    @property
    def source_path(self) -> Path:
        """Absolute path of the recipe file."""
        return self._source_path

    @property
    def recipe_dir(self) -> Path:
        """The folder every relative path in the recipe is resolved against."""
        return self._source_path.parent

    @property
    def raw(self) -> dict:
        """The recipe as a plain dict after --set overrides (JSON-safe; hash this for identity)."""
        return self._raw

    @property
    def card(self) -> Any:
        """The model card from flowgen.engine.cards, or None when no card module/card was available."""
        return self._card

    @property
    def distilled(self) -> bool | None:
        """Whether the model is guidance-distilled (CFG off, 4 steps); None when unknown."""
        from flowgen.recipe.models import is_distilled

        return is_distilled(self.model, self._card)

    def output_dir(self, base: Path | str | None = None) -> Path:
        """The output folder: `base` (the --out option) when given, else output.dir under the recipe folder."""
        from flowgen.recipe.naming import output_dir

        return output_dir(self, base)

    def render_filename(self, item: Item, result_index: int, ext: str) -> str:
        """The result's path relative to the output folder (may contain sub-folders, never `..`)."""
        return self.filename_renderer()(item, result_index, ext)

    def filename_renderer(self) -> "FilenameRenderer":
        """render_filename as a callable that remembers the names it rendered: pass it where
        every result's name is asked for (the planner's `filename`)."""
        renderer = self._filename_renderer
        if renderer is None or not renderer.fits(self):
            renderer = self._filename_renderer = FilenameRenderer(self)
        return renderer
