"""The imageInference request for FLUX.2 [klein] as pydantic models, names exactly as the spec.

Every field is optional here: which ones are required is checked on the merged task
(defaults + task + top-level model) in task_rules.py, so `defaults:` can be validated alone.
Ranges: shared/spec/000_b07fdd4e16f4303e.txt. Enumerations: spec_values.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict

from flowgen.recipe import spec_values as spec
from flowgen.recipe.fields import boolean, integer, number, one_of, sized_list, text, uri, uuid_v4


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Safety(_Fields):
    checkContent: Optional[boolean()] = None


class Inputs(_Fields):
    referenceImages: Optional[Annotated[list[text(1)], sized_list(1, spec.MAX_REFERENCES, "reference images")]] = None


class AcceleratorOptions(_Fields):
    cacheEndStep: Optional[integer(1)] = None
    cacheEndStepPercentage: Optional[integer(1, 100)] = None
    cacheMaxConsecutiveSteps: Optional[integer(1, 5)] = None
    cacheStartStep: Optional[integer(0)] = None
    cacheStartStepPercentage: Optional[integer(0, 99)] = None
    fbCache: Optional[boolean()] = None
    fbCacheThreshold: Optional[number(0, 1, 0.01)] = None
    teaCache: Optional[boolean()] = None
    teaCacheDistance: Optional[number(0, 1, 0.01)] = None
    dbCache: Optional[boolean()] = None
    dbCacheThreshold: Optional[number(0, 1, 0.01)] = None
    dbCacheSkipInterval: Optional[integer(1)] = None


class Lora(_Fields):
    model: text(1)
    weight: Optional[number(-4, 4, 0.01)] = None
    transformer: Optional[one_of(spec.LORA_TRANSFORMERS)] = None


class Ultralytics(_Fields):
    CFGScale: Optional[number(0, 50, 0.1)] = None
    confidence: Optional[number(0, 1, 0.01)] = None
    inpaintSize: Optional[integer(128, 2048)] = None
    maskBlur: Optional[integer(0, 100)] = None
    maskPadding: Optional[integer(0, 20)] = None
    negativePrompt: Optional[text()] = None
    positivePrompt: Optional[text()] = None
    steps: Optional[integer(1, 100)] = None
    strength: Optional[number(None, 1, 0.01)] = None


class TaskFields(_Fields):
    """One imageInference request. Dump with `model_dump(exclude_none=True)` for the resolved task."""

    taskType: Optional[one_of(["imageInference"])] = None
    taskUUID: Optional[uuid_v4()] = None
    model: Optional[text(1)] = None
    positivePrompt: Optional[text(1, 10000)] = None
    negativePrompt: Optional[text(2, 3000)] = None
    width: Optional[integer(spec.SIDE_MIN, spec.SIDE_MAX, spec.SIDE_STEP)] = None
    height: Optional[integer(spec.SIDE_MIN, spec.SIDE_MAX, spec.SIDE_STEP)] = None
    steps: Optional[integer(1, 50)] = None
    seed: Optional[integer(0, spec.SEED_MAX)] = None
    numberResults: Optional[integer(1, 20)] = None
    scheduler: Optional[one_of(spec.SCHEDULERS, "scheduler names listed in docs/recipes.md")] = None
    CFGScale: Optional[number(1, 20, 0.01)] = None
    outputType: Optional[one_of(spec.OUTPUT_TYPES)] = None
    outputFormat: Optional[one_of(spec.OUTPUT_FORMATS)] = None
    outputQuality: Optional[integer(20, 99)] = None
    webhookURL: Optional[uri()] = None
    uploadEndpoint: Optional[uri()] = None
    deliveryMethod: Optional[one_of(spec.DELIVERY_METHODS)] = None
    ttl: Optional[integer(60)] = None
    includeCost: Optional[boolean()] = None
    safety: Optional[Safety] = None
    acceleration: Optional[one_of(spec.ACCELERATIONS)] = None
    acceleratorOptions: Optional[AcceleratorOptions] = None
    lora: Optional[Annotated[list[Lora], sized_list(1, None, "entries")]] = None
    ultralytics: Optional[Ultralytics] = None
    inputs: Optional[Inputs] = None


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


