"""Whether a task is valid and supported: every rule, in the order a task meets them.

Used three times: on `defaults:` and `task:` as written (template placeholders skipped), and on
every expanded item's resolved task (where templates have become values). A task goes through:

1. the spec (task_problems): TaskFields in schema.py, its pydantic errors turned into one-line
   problems that name the field path (format_errors);
2. the local engine's support table (support_problems): what flowgen executes, accepts as a record
   only, or refuses (for now), read from the engine's `capabilities()`;
3. the rules that need the whole merged task (merged_problems): required fields, model-card rules
   (guidance on distilled models), cache-step consistency. The model card comes from find_card;
4. its reference images (reference_problems, behind api.check_references): each file exists and
   its header is sane, without decoding any pixel.

constant_result lets the item builder run rules 2 and 3 once per recipe instead of once per item
when they never read a field that varies per item.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from flowgen import engine as model_engine  # its cards, looked up per call (resolve_model)
from flowgen.engine import ModelCard, capabilities, step_cache_option_problems  # JAX-free names
from flowgen.errors import FlowgenError
from flowgen.recipe.schema import Item, TaskFields, shown, submodel_at
from flowgen.recipe.spec import (
    DISTILLED_AIRS,
    MAX_REFERENCES,
    REFERENCE_MAX_ASPECT,
    REFERENCE_MAX_PIXELS,
    REFERENCE_MIN_SIDE,
)
from flowgen.recipe.templates import is_template

# --- The spec: imageInference task dicts ----------------------------------------------------------


REQUIRED = ("positivePrompt", "width", "height")


def task_problems(task: Any, where: str = "task") -> list[str]:
    """Spec and engine-support problems of one task dict; templated values are not judged."""
    if not isinstance(task, dict):
        return [f"{where}: must be a mapping of imageInference fields, got {type(task).__name__}"]
    templated = set(_templated_paths(task))
    try:
        TaskFields.model_validate(task)
        spec_errors: list[tuple] = []
    except ValidationError as err:
        spec_errors = [tuple(e["loc"]) for e in err.errors()]
        kept = [e for e in err.errors() if not any(tuple(e["loc"])[: len(t)] == t for t in templated)]
        problems = format_errors(kept, where, TaskFields)
    else:
        problems = []
    invalid = {str(loc[0]) for loc in spec_errors if loc}  # an invalid value needs no second complaint
    problems += [p for p in support_problems(task, where) if _top_field(p, where) not in invalid]
    return problems


def _top_field(problem: str, where: str) -> str:
    """'task.inputs.referenceImages[0]: ...' -> 'inputs'."""
    path = problem.split(":", 1)[0].removeprefix(where + ".")
    return path.split(".", 1)[0].split("[", 1)[0]


def merge_tasks(*layers: dict) -> dict:
    """Merge task dicts, later layers winning; nested mappings merge, lists are replaced."""
    merged: dict = {}
    for layer in layers:
        for field, value in layer.items():
            below = merged.get(field)
            merged[field] = merge_tasks(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return merged


def clean_task(task: dict) -> dict:
    """The validated task with values normalised (CSV strings -> numbers); call after task_problems is empty."""
    return TaskFields.model_validate(task).model_dump(exclude_none=True)


def merged_problems(
    task: dict, where: str, model: str | None, distilled: bool | None, card: ModelCard | None = None
) -> list[str]:
    """Rules that need the whole merged task: required fields, model-card rules, cache steps."""
    return required_problems(task, where, model) + model_rule_problems(task, where, model, distilled, card)


def required_problems(task: dict, where: str, model: str | None) -> list[str]:
    """The required fields (and a model) are present and not empty."""
    problems = [f"{where}.{name}: required" for name in REQUIRED if is_missing(task.get(name))]
    if not model:
        problems.append("model: required (set the top-level `model:` or task.model)")
    return problems


def is_missing(value: Any) -> bool:
    """Whether a required field's value counts as not given."""
    return value in (None, "")


def model_rule_problems(
    task: dict, where: str, model: str | None, distilled: bool | None, card: ModelCard | None = None
) -> list[str]:
    """Model-card rules (guidance on distilled models) and cache-step consistency."""
    problems = []
    cfg = _float(task.get("CFGScale"))
    cfg_allowed = card.limits.cfg if card is not None else None
    if cfg is not None and cfg > 1 and (distilled or cfg_allowed is False):
        why = "is guidance-distilled" if distilled else "takes no guidance"
        problems.append(
            f"{where}.CFGScale: {model_label(model, card)} {why}, "
            f"so CFGScale must be absent or <= 1, got {task['CFGScale']!r}"
        )
    faces = task.get("ultralytics")
    if not isinstance(faces, dict):
        faces = {}
    face_cfg = _float(faces.get("CFGScale"))
    if face_cfg is not None and face_cfg > 1 and (distilled or cfg_allowed is False):
        why = "is guidance-distilled" if distilled else "takes no guidance"
        problems.append(
            f"{where}.ultralytics.CFGScale: {model_label(model, card)} {why}, so ultralytics.CFGScale must "
            f"be absent or <= 1 (the face pass then runs without guidance), got {faces['CFGScale']!r}"
        )
    problems += _cache_step_problems(task, where)
    return problems


def _cache_step_problems(task: dict, where: str) -> list[str]:
    options = task.get("acceleratorOptions")
    if not isinstance(options, dict):
        return []
    start, end = _float(options.get("cacheStartStep")), _float(options.get("cacheEndStep"))
    steps = _float(task.get("steps"))
    problems = [f"{where}.acceleratorOptions: {problem}" for problem in step_cache_option_problems(options)]
    if start is not None and end is not None and not start < end:
        problems.append(
            f"{where}.acceleratorOptions.cacheEndStep: must be greater than cacheStartStep ({start:g}), got {end:g}"
        )
    if end is not None and steps is not None and end > steps:
        problems.append(f"{where}.acceleratorOptions.cacheEndStep: must be <= steps ({steps:g}), got {end:g}")
    low, high = _float(options.get("cacheStartStepPercentage")), _float(options.get("cacheEndStepPercentage"))
    if low is not None and high is not None and not low < high:
        problems.append(
            f"{where}.acceleratorOptions.cacheEndStepPercentage: "
            f"must be greater than cacheStartStepPercentage ({low:g}), got {high:g}"
        )
    return problems


def _templated_paths(value: Any, path: tuple = ()) -> list[tuple]:
    if is_template(value):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _templated_paths(item, path + (key,))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _templated_paths(item, path + (index,))]
    return []


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- pydantic errors as one-line problems that name the field path --------------------------------


_KINDS: dict[str, str | None] = {
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "bool_type": "must be true or false",
    "literal_error": None,  # pydantic's own message names the allowed values
}


def join_path(prefix: str, loc: tuple[Any, ...]) -> str:
    """('inputs', 'referenceImages', 0) under 'task' -> 'task.inputs.referenceImages[0]'."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def format_errors(err: ValidationError | Sequence[ErrorDetails], prefix: str, model: type[BaseModel]) -> list[str]:
    """One line per pydantic error: '<path>: <what is allowed>, got <value>'."""
    lines = []
    for error in err.errors() if isinstance(err, ValidationError) else err:
        loc = tuple(error["loc"])
        lines.append(f"{join_path(prefix, loc) or prefix or 'recipe'}: {_message(error, loc, model)}")
    return list(dict.fromkeys(lines))


def _message(error: ErrorDetails, loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = submodel_at(model, loc)
        allowed = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field; {hint}allowed: {', '.join(allowed)}" if allowed else "unknown field"
    if kind == "missing":
        return "required"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = _KINDS.get(kind) or message
    if "got " not in message and kind != "value_error":
        message += f", got {shown(error.get('input'))}"
    return message


# --- schedule: cron expressions and time zones -----------------------------------------------------


CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def cron_problem(value: Any) -> str | None:
    """Why `value` is not a cron expression flowgen schedules (5 fields, minute resolution), or None."""
    allowed = (
        'a cron expression of 5 fields (minute hour day-of-month month day-of-week), e.g. "0 3 * * *", '
        f"or one of {', '.join(CRON_ALIASES)}"
    )
    if not isinstance(value, str) or not value.strip():
        return f"must be {allowed}, got {shown(value)}"
    text = value.strip()
    if text.startswith("@"):
        return None if text in CRON_ALIASES else f"must be {allowed}, got {shown(value)}"
    if len(text.split()) != 5:
        return f"must be {allowed}; {shown(value)} has {len(text.split())} fields"
    from croniter import croniter

    if not croniter.is_valid(text):
        return f"must be {allowed}; {shown(value)} has a value out of range or a bad field"
    return None


def timezone_problem(value: Any) -> str | None:
    """Why `value` is not an IANA time zone name (zoneinfo), or None."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    allowed = "an IANA time zone name such as UTC, Europe/Berlin or America/New_York"
    if not isinstance(value, str) or not value.strip():
        return f"must be {allowed}, got {shown(value)}"
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return f"must be {allowed}, got {shown(value)}"
    return None


# --- What the local engine executes, accepts as a record only, or refuses (for now) ----------------
#
# Every field is first validated against the API spec (TaskFields); this table then decides what
# flowgen does with a valid value, from what the engine says it supports
# (flowgen.engine.catalog.capabilities: schedulers run / refused, acceleration values, lora,
# acceleratorOptions, ultralytics, reference inputs). Refusing beats silently ignoring: a recipe that
# asks for a webhook or a LoRA must not "succeed" without one. docs/recipes.md mirrors this table.
# Scheduler names outside the spec are the spec validation's to report.


NOT_YET = "not supported yet by the local engine"

# per-result placeholders the deliver step fills in uploadEndpoint (flowgen.run.deliver)
UPLOAD_PLACEHOLDERS = ("{result}", "{filename}", "{imageUUID}")

_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def support_problems(task: dict[str, Any], where: str) -> list[str]:
    """Problems for valid-per-spec values that the local engine cannot honour yet."""
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(f"{where}.{field}: {NOT_YET} ({why}); remove it")

    endpoint = task.get("uploadEndpoint")
    results = task.get("numberResults") or 1
    if (
        isinstance(endpoint, str)
        and isinstance(results, int)
        and results > 1
        and not endpoint.endswith("/")
        and not any(p in endpoint for p in UPLOAD_PLACEHOLDERS)
    ):
        problems.append(
            f"{where}.uploadEndpoint: numberResults is {results}, so every result would be uploaded to "
            "the same URL; end it with '/' (the file name is appended) or use "
            + ", ".join("{" + p + "}" for p in UPLOAD_PLACEHOLDERS)
            + " (written with doubled braces)"
        )
    if task.get("ttl") is not None and (task.get("outputType") or "URL") != "URL":
        problems.append(f"{where}.ttl: applies only to outputType 'URL', not {task.get('outputType')!r}; remove it")
    caps = capabilities()
    if task.get("acceleration") not in (None, *caps.acceleration):
        refuse("acceleration", caps.why_not["acceleration"])
    for field, supported in (
        ("acceleratorOptions", caps.accelerator_options),
        ("lora", caps.lora),
        ("ultralytics", caps.ultralytics),
    ):
        if task.get(field) is not None and not supported:
            refuse(field, caps.why_not[field])
    if caps.lora and isinstance(task.get("lora"), list):
        problems += lora_problems(task["lora"], where)
    scheduler = task.get("scheduler")
    if isinstance(scheduler, str) and scheduler in caps.refused_schedulers:
        refuse("scheduler", caps.refused_schedulers[scheduler])
    references = (task.get("inputs") or {}).get("referenceImages") if isinstance(task.get("inputs"), dict) else None
    for index, ref in enumerate(references or []):
        if isinstance(ref, str) and reference_kind(ref) not in caps.reference_inputs:
            refuse(f"inputs.referenceImages[{index}]", caps.why_not["inputs.referenceImages"])
    return problems


def lora_problems(entries: list, where: str) -> list[str]:
    """Each LoRA's file exists (a path, or a name in the LoRA folder: flowgen.engine.lora.source) and
    holds only tensors of a format flowgen reads, and its `transformer` stage fits FLUX.2 [klein],
    which has one. Templated models are judged per item."""
    from flowgen.engine import checked_lora_path

    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue  # the spec validation reports it
        model, stage = entry.get("model"), entry.get("transformer")
        if stage not in (None, "both") and not is_template(stage):
            problems.append(
                f"{where}.lora[{index}].transformer: FLUX.2 [klein] has one transformer stage, so only "
                f"'both' (the default) applies, got {shown(stage)}; remove it"
            )
        if isinstance(model, str) and model.strip() and not is_template(model):
            try:
                checked_lora_path(model, f"{where}.lora[{index}].model")
            except FlowgenError as err:
                problems.append(str(err))
    return problems


def reference_kind(ref: str) -> str:
    """Which of flowgen.engine.catalog.capabilities.REFERENCE_KINDS a reference string is."""
    if ref.startswith(("http://", "https://")):
        return "url"
    if ref.startswith("data:"):
        return "data_uri"
    return "uuid" if _UUID.match(ref) else "file"


# --- Model cards: which model a recipe names and whether it is distilled --------------------------
#
# Cards are flowgen.engine.catalog.cards.ModelCard (typed, JAX-free): `resolve_model(name) -> ModelCard`.
# A model no card resolves is a recipe problem; only then (card None) do the curated Runware AIR ids
# fall back to a small table (spec.DISTILLED_AIRS) and other models get no model-specific rules.


DISTILLED_STEPS = 4


def find_card(model: str) -> tuple[ModelCard | None, str | None]:
    """(card, None) when found; (None, problem) when no card resolves the name."""
    try:
        return model_engine.resolve_model(model), None
    except (FlowgenError, LookupError, ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        return None, f"model: {message}"


def is_distilled(model: str | None, card: ModelCard | None) -> bool | None:
    """True/False from the card (or the AIR table); None when nothing is known."""
    if card is not None:
        return card.distilled
    return DISTILLED_AIRS.get(model or "")


def card_defaults(card: ModelCard | None, distilled: bool | None) -> dict:
    """imageInference defaults from the card (steps, CFGScale, width, height), lowest precedence in a task."""
    raw = card.defaults.model_dump(by_alias=True) if card is not None else {}  # aliases = request names
    defaults = {k: v for k, v in raw.items() if k in TaskFields.model_fields and v is not None}
    if distilled:
        defaults.setdefault("steps", DISTILLED_STEPS)
        if float(defaults.get("CFGScale", 1)) > 1:  # a distilled model runs without guidance
            defaults.pop("CFGScale")
    return defaults


def model_label(model: str | None, card: ModelCard | None) -> str:
    """How messages name the model: 'runware:400@6 (klein-9b-kv)' when a card is known."""
    name = card.name if card is not None else None
    return f"{model} ({name})" if name and name != model else str(model)


# --- Which task fields a rule looks at: lets the item builder run a rule once per recipe ----------
#
# A rule is a deterministic function of the task. Run on a recipe's static fields, if it never reads
# a field that varies per item, it takes the same path for every item and returns the same problems.


class ReadRecorder(dict):
    """A task dict that notes the fields read through it; iterating or measuring it reads them all."""

    def __init__(self, task: dict[str, Any]):
        super().__init__(task)
        self.fields_read: set[Any] = set()
        self.read_all = False

    def __getitem__(self, field: Any) -> Any:
        self.fields_read.add(field)
        return super().__getitem__(field)

    def get(self, field: Any, default: Any = None) -> Any:
        self.fields_read.add(field)
        return super().get(field, default)

    def __contains__(self, field: Any) -> bool:
        self.fields_read.add(field)
        return super().__contains__(field)

    def _everything(self) -> None:
        self.read_all = True

    def __iter__(self):
        self._everything()
        return super().__iter__()

    def __len__(self) -> int:
        self._everything()
        return super().__len__()

    def __eq__(self, other: object) -> bool:
        self._everything()
        return super().__eq__(other)

    __hash__ = None

    def keys(self):
        self._everything()
        return super().keys()

    def values(self):
        self._everything()
        return super().values()

    def items(self):
        self._everything()
        return super().items()

    def copy(self) -> dict:
        self._everything()
        return dict(super().items())


def constant_result(
    rule: Callable[[dict], list[str]], static_task: dict[str, Any], varying: Iterable[str]
) -> list[str] | None:
    """rule(task) for every task that shares `static_task`'s other fields, when that does not depend
    on the `varying` fields (the rule never reads them); None when it may (or when the rule fails)."""
    recorder = ReadRecorder(static_task)
    try:
        result = rule(recorder)
    except Exception:  # noqa: BLE001 - let the per-item path run (and report) it
        return None
    if recorder.read_all or recorder.fields_read & set(varying):
        return None
    return result


# --- Reference images: every file exists and its header is sane (no full decode) ------------------
#
# Limits (spec.py): at most 4 references per item (the spec's and the engine's capabilities().max_references),
# each side >= 64 px, aspect ratio <= 8, at most 150 MP. The file is opened as every reference is
# (flowgen.engine.references.files: a regular file, at most 1 GiB) and its header judged by the
# engine's own pixel check (flowgen.engine.references.images.image_header), so a file whose header claims
# 20000x20000 is rejected before any pixel is decoded, and a FIFO or /dev/zero before any byte is read.


REFERENCES_WHERE = "task.inputs.referenceImages"


def image_problem(path: Path, *, max_pixels: int = REFERENCE_MAX_PIXELS) -> str | None:
    """Why `path` is not a usable reference image (from its header only), or None. The text
    completes a sentence about the file ('does not exist', 'is 13000x13000 (...); the limit is ...').
    max_pixels: the server passes its lower limit for inputs (images.MAX_SERVE_INPUT_PIXELS)."""
    # PIL + numpy: imported when a reference is checked
    from flowgen.engine import ReferenceImageError, image_header

    try:
        width, height = image_header(path, max_pixels=max_pixels).size
    except ReferenceImageError as err:
        return err.problem
    if min(width, height) < REFERENCE_MIN_SIDE:
        return f"is {width}x{height}; each side must be at least {REFERENCE_MIN_SIDE} px"
    if max(width, height) > REFERENCE_MAX_ASPECT * min(width, height):
        return f"is {width}x{height}; the aspect ratio must be at most {REFERENCE_MAX_ASPECT}:1"
    return None


def reference_problems(items: Sequence[Item]) -> list[str]:
    """One problem per bad file (naming the first item using it) and per item with too many references."""
    users: dict[Path, list[str]] = {}
    problems = []
    limit = min(MAX_REFERENCES, capabilities().max_references)
    for item in items:
        if len(item.references) > limit:
            problems.append(
                f"{REFERENCES_WHERE}: item {item.key!r} has {len(item.references)} reference images; at most {limit}"
            )
        for path in item.references:
            users.setdefault(Path(path), []).append(item.key)
    for path, keys in users.items():
        problem = image_problem(path)
        if problem:
            more = f" and {len(keys) - 1} more item{'s' if len(keys) > 2 else ''} using it" if len(keys) > 1 else ""
            problems.append(f"{REFERENCES_WHERE}: {_shown_path(path)} {problem} (item {keys[0]!r}{more})")
    return problems


def _shown_path(path: Path) -> str:
    """Relative to the working folder when inside it (shorter), else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative
