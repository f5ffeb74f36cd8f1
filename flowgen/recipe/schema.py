"""The shapes of the recipe layer's data: pydantic models of a recipe and of a task, and the Item.

- Field types (`integer`, `number`, `text`, `one_of`, ...): validators, used as `Annotated[int, integer(1, 50)]`,
  whose error messages say what is allowed and what was given. Values coming from CSV cells arrive as
  strings, so numbers and booleans also accept their plain string spelling ("8", "0.5", "true");
  everything else is strict (no bools as numbers, no floats with fractions as integers).
- TaskFields: the imageInference request for FLUX.2 [klein] as pydantic models, names exactly as the
  spec. Every field is optional here: which ones are required is checked on the merged task
  (defaults + task + top-level model) in validation.py, so `defaults:` can be validated alone.
  Ranges: shared/spec/000_b07fdd4e16f4303e.txt. Enumerations and shared limits: spec.py.
- Recipe (with DatasetSpec, OutputSpec, ScheduleSpec and CanarySpec): the recipe document
  (extra="forbid" everywhere). The top level is structural only: `defaults` and `task` stay plain
  dicts here because they may hold templates (`"{product.name}"`) that only become values per
  item; their imageInference rules (TaskFields and validation.py) run on every resolved item.
- Item: the contract between the recipe layer and the planner. The recipe layer loads and validates
  a recipe and expands it into Items; the planner (flowgen/plan) turns Items into Results (one per
  numberResults index) with seeds, content hashes, output paths and batches. It is the only thing
  both sides share (the planner imports it through flowgen.recipe.api).
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from flowgen.engine import ModelCard  # the typed model card (JAX-free)
from flowgen.recipe import spec
from flowgen.recipe.naming import FilenameRenderer

# --- Field types --------------------------------------------------------------------------------


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a user value for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def integer(lo: int, hi: int | None = None, step: int | None = None) -> BeforeValidator:
    """An integer in [lo, hi] (hi None: no upper bound), optionally a multiple of `step`."""
    if step:
        allowed = f"a multiple of {step} between {lo} and {hi}"
    elif hi is None:
        allowed = f"an integer >= {lo}"
    else:
        allowed = f"an integer between {lo} and {hi}"

    def check(value: Any) -> int:
        number = _as_int(value)
        if number is None or number < lo or (hi is not None and number > hi) or (step and number % step):
            raise ValueError(f"must be {allowed}, got {shown(value)}")
        return number

    return BeforeValidator(check)


def number(lo: float | None, hi: float | None, step: float | None = None) -> BeforeValidator:
    """A float in [lo, hi] (either bound may be None), optionally on a grid of `step`."""
    if lo is not None and hi is not None:
        bounds = f"between {lo:g} and {hi:g}"
    else:
        bounds = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
    grid = f" in steps of {step:g}" if step else ""

    def fits(x: float) -> bool:
        if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
            return False
        return not step or abs(x / step - round(x / step)) <= 1e-6

    def check(value: Any) -> float:
        x = _as_float(value)
        if x is None or not fits(x):
            raise ValueError(f"must be a number {bounds}{grid}, got {shown(value)}")
        return x

    return BeforeValidator(check)


def text(min_len: int = 0, max_len: int | None = None) -> BeforeValidator:
    """A string of min_len..max_len characters."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {shown(value)}")
        if len(value) < min_len or (max_len is not None and len(value) > max_len):
            limit = f"{min_len} to {max_len}" if max_len is not None else f"at least {min_len}"
            raise ValueError(f"must have {limit} characters, got {len(value)}")
        return value

    return BeforeValidator(check)


def boolean() -> BeforeValidator:
    """true/false (also the strings "true"/"false" from CSV cells)."""

    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"must be true or false, got {shown(value)}")

    return BeforeValidator(check)


def one_of(values: Iterable[str], what: str | None = None) -> BeforeValidator:
    """One of a fixed set of strings; long sets are named by `what` and get a did-you-mean hint."""
    allowed = tuple(values)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        if what:
            close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"must be one of the {len(allowed)} {what}{hint}, got {shown(value)}")
        raise ValueError(f"must be one of {', '.join(allowed)}, got {shown(value)}")

    return BeforeValidator(check)


def uri() -> BeforeValidator:
    """An absolute http(s) URL."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
            raise ValueError(f"must be an http(s) URL, got {shown(value)}")
        return value

    return BeforeValidator(check)


def uuid_v4() -> BeforeValidator:
    """A UUID version 4 string."""

    def check(value: Any) -> str:
        try:
            parsed = uuid.UUID(str(value)) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.version != 4:
            raise ValueError(f"must be a UUID v4, got {shown(value)}")
        return value

    return BeforeValidator(check)


def sized_list(lo: int, hi: int | None, noun: str) -> AfterValidator:
    """Post-check on a list's length, with a message in the user's terms."""

    def check(value: list) -> list:
        if len(value) < lo or (hi is not None and len(value) > hi):
            limit = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"must have {limit} {noun}, got {len(value)}")
        return value

    return AfterValidator(check)


# --- The imageInference task --------------------------------------------------------------------


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Safety(_Fields):
    checkContent: Annotated[bool, boolean()] | None = None


class Inputs(_Fields):
    referenceImages: (
        Annotated[list[Annotated[str, text(1)]], sized_list(1, spec.MAX_REFERENCES, "reference images")] | None
    ) = None


class AcceleratorOptions(_Fields):
    cacheEndStep: Annotated[int, integer(1)] | None = None
    cacheEndStepPercentage: Annotated[int, integer(1, 100)] | None = None
    cacheMaxConsecutiveSteps: Annotated[int, integer(1, 5)] | None = None
    cacheStartStep: Annotated[int, integer(0)] | None = None
    cacheStartStepPercentage: Annotated[int, integer(0, 99)] | None = None
    fbCache: Annotated[bool, boolean()] | None = None
    fbCacheThreshold: Annotated[float, number(0, 1, 0.01)] | None = None
    teaCache: Annotated[bool, boolean()] | None = None
    teaCacheDistance: Annotated[float, number(0, 1, 0.01)] | None = None
    dbCache: Annotated[bool, boolean()] | None = None
    dbCacheThreshold: Annotated[float, number(0, 1, 0.01)] | None = None
    dbCacheSkipInterval: Annotated[int, integer(1)] | None = None


class Lora(_Fields):
    model: Annotated[str, text(1)]
    weight: Annotated[float, number(-4, 4, 0.01)] | None = None
    transformer: Annotated[str, one_of(spec.LORA_TRANSFORMERS)] | None = None


class Ultralytics(_Fields):
    CFGScale: Annotated[float, number(0, 50, 0.1)] | None = None
    confidence: Annotated[float, number(0, 1, 0.01)] | None = None
    inpaintSize: Annotated[int, integer(128, 2048)] | None = None
    maskBlur: Annotated[int, integer(0, 100)] | None = None
    maskPadding: Annotated[int, integer(0, 20)] | None = None
    negativePrompt: Annotated[str, text()] | None = None
    positivePrompt: Annotated[str, text()] | None = None
    steps: Annotated[int, integer(1, 100)] | None = None
    strength: Annotated[float, number(0, 1, 0.01)] | None = None  # spec: max 1; below 0 no schedule exists


class TaskFields(_Fields):
    """One imageInference request. Dump with `model_dump(exclude_none=True)` for the resolved task."""

    taskType: Annotated[str, one_of(["imageInference"])] | None = None
    taskUUID: Annotated[str, uuid_v4()] | None = None
    model: Annotated[str, text(1)] | None = None
    positivePrompt: Annotated[str, text(1, 10000)] | None = None
    negativePrompt: Annotated[str, text(2, 3000)] | None = None
    width: Annotated[int, integer(spec.SIDE_MIN, spec.SIDE_MAX, spec.SIDE_STEP)] | None = None
    height: Annotated[int, integer(spec.SIDE_MIN, spec.SIDE_MAX, spec.SIDE_STEP)] | None = None
    steps: Annotated[int, integer(1, 50)] | None = None
    seed: Annotated[int, integer(0, spec.SEED_MAX)] | None = None
    numberResults: Annotated[int, integer(1, 20)] | None = None
    scheduler: Annotated[str, one_of(spec.SCHEDULERS, "scheduler names listed in docs/recipes.md")] | None = None
    CFGScale: Annotated[float, number(1, 20, 0.01)] | None = None
    outputType: Annotated[str, one_of(spec.OUTPUT_TYPES)] | None = None
    outputFormat: Annotated[str, one_of(spec.OUTPUT_FORMATS)] | None = None
    outputQuality: Annotated[int, integer(20, 99)] | None = None
    webhookURL: Annotated[str, uri()] | None = None
    uploadEndpoint: Annotated[str, uri()] | None = None
    deliveryMethod: Annotated[str, one_of(spec.DELIVERY_METHODS)] | None = None
    ttl: Annotated[int, integer(60)] | None = None
    includeCost: Annotated[bool, boolean()] | None = None
    safety: Safety | None = None
    acceleration: Annotated[str, one_of(spec.ACCELERATIONS)] | None = None
    acceleratorOptions: AcceleratorOptions | None = None
    lora: Annotated[list[Lora], sized_list(1, None, "entries")] | None = None
    ultralytics: Ultralytics | None = None
    inputs: Inputs | None = None


def field_names(model: type[BaseModel]) -> list[str]:
    """The field names of a model, for 'unknown field' hints."""
    return list(model.model_fields)


def submodel_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last element of `loc` (walking nested models and lists)."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a list index or a dict key (datasets.<name>): stay on the same model
        current = _inner_model(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """Find a BaseModel class inside Optional[...] / list[...] / Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    return _inner_model(origin) if origin is not None and origin is not annotation else None


# --- The recipe document ------------------------------------------------------------------------


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
    incremental: Annotated[bool, boolean()] = False  # plan only rows (files) new since the last successful run

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
    def _one_source(self) -> DatasetSpec:
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


def _checked_by(problem_of: str) -> BeforeValidator:
    """A field checked by `flowgen.recipe.validation.<problem_of>(value)` (a message, or None when fine)."""

    def check(value: Any) -> Any:
        from flowgen.recipe import validation

        problem = getattr(validation, problem_of)(value)
        if problem:
            raise ValueError(problem)
        return value

    return BeforeValidator(check)


def cron_expression() -> BeforeValidator:
    """A 5-field cron expression or an @alias (checked with croniter, see validation.cron_problem)."""
    return _checked_by("cron_problem")


def time_zone() -> BeforeValidator:
    """An IANA time zone name that zoneinfo knows (see validation.timezone_problem)."""
    return _checked_by("timezone_problem")


class ScheduleSpec(Strict):
    """When `flowgen schedule` runs the recipe: `schedule: "0 3 * * *"` is short for `{cron: ...}`."""

    cron: Annotated[str, cron_expression()]
    timezone: Annotated[str, time_zone()] = "UTC"
    missed: Annotated[str, one_of(("run", "skip"))] = (
        "run"  # due times missed while no scheduler ran: run once, or skip
    )


class CanarySpec(Strict):
    """Golden-seed canary: re-render `items` fixed items before each run; fail below `threshold_db` PSNR."""

    items: Annotated[int, integer(1, 16)]
    threshold_db: Annotated[float, number(1, 100)] = 40.0


class Recipe(Strict):
    """A validated recipe. Build it with flowgen.recipe.api.load_recipe, not directly."""

    version: Literal[1]
    name: str
    description: str | None = None
    model: str | None = None
    seed: int = Field(default=0, ge=0, le=spec.SEED_MAX)
    defaults: dict[str, Any] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    matrix: dict[str, Any] = Field(default_factory=dict)  # variable -> dataset name | inline list (checked in loading)
    zip: list[dict[str, Any]] = Field(default_factory=list)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    task: dict[str, Any]
    output: OutputSpec = Field(default_factory=OutputSpec)
    schedule: ScheduleSpec | None = None
    canary: CanarySpec | None = None

    _source_path: Path = PrivateAttr(default=Path("recipe.yaml"))
    _raw: dict = PrivateAttr(default_factory=dict)
    _rows: dict = PrivateAttr(default_factory=dict)  # dataset name -> list[Row], filled by loading
    _card: ModelCard | None = PrivateAttr(default=None)
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
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(
                "must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit "
                f"(it names the output folder), got {value!r}"
            )
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _cron_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"cron": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                'must be a cron string such as "0 3 * * *" or a mapping with cron, timezone, missed; '
                f"got {shown(value)}"
            )
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _no_bool_seed(cls, value: Any) -> Any:  # worded as every other range, e.g. task.seed's
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= spec.SEED_MAX:
            raise ValueError(f"must be an integer between 0 and {spec.SEED_MAX}, got {value!r}")
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

    def dataset_rows(self, name: str) -> list:
        """The rows (flowgen.recipe.datasets.Row) dataset `name` loaded, after its filter."""
        return list(self._rows.get(name) or [])

    def dataset_variables(self) -> dict[str, str]:
        """Matrix and zip variable -> the dataset it draws rows from (inline lists left out)."""
        sources = dict(self.matrix)
        for group in self.zip:
            sources.update(group)
        return {var: src for var, src in sources.items() if isinstance(src, str) and src in self.datasets}

    @property
    def card(self) -> ModelCard | None:
        """The recipe's model card (flowgen.engine.catalog.cards), or None when its model resolves to none."""
        return self._card

    @property
    def distilled(self) -> bool | None:
        """Whether the model is guidance-distilled (CFG off, 4 steps); None when unknown."""
        from flowgen.recipe.validation import is_distilled

        return is_distilled(self.model, self._card)

    def output_dir(self, base: Path | str | None = None) -> Path:
        """The output folder: `base` (the --out option) when given, else output.dir under the recipe folder."""
        from flowgen.recipe.naming import output_dir

        return output_dir(self, base)

    def render_filename(self, item: Item, result_index: int, ext: str) -> str:
        """The result's path relative to the output folder (may contain sub-folders, never `..`)."""
        return self.filename_renderer()(item, result_index, ext)

    def filename_renderer(self) -> FilenameRenderer:
        """render_filename as a callable that remembers the names it rendered: pass it where
        every result's name is asked for (the planner's `filename`)."""
        renderer = self._filename_renderer
        if renderer is None or not renderer.fits(self):
            renderer = self._filename_renderer = FilenameRenderer(self)
        return renderer


# --- The planner's contract ---------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One cell of the recipe's matrix, fully resolved.

    key:        stable identity built from dataset keys and matrix values only (never a row
                position), e.g. "product=A-100|surface=marble". Seeds and ids derive from it.
    values:     matrix variable -> its value (a dataset row as a dict, or a scalar), for templating
                the output filename.
    task:       every imageInference field after defaults, templating and --set overrides, spelled
                as in the Runware spec (positivePrompt, width, height, steps, seed, numberResults,
                CFGScale, outputFormat, outputQuality, ...). referenceImages are absolute paths.
    references: the reference image paths (absolute), in order; also in task["referenceImages"].
    """

    key: str
    values: dict[str, Any]
    task: dict[str, Any]
    references: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def number_results(self) -> int:
        """How many images the task asks for (the spec's default is 1)."""
        return int(self.task.get("numberResults") or 1)
