"""The Runware task protocol's wire shapes (see ../shared/reference/runware_protocol.md).

A request is a JSON array of task objects; an answer is `{"data": [...]}` or `{"errors": [...]}`,
never both (the new SDK's REST transport reads one or the other). Every error names the task's
`taskUUID` when the task had one: the old SDK waits for an answer to that UUID until it times out.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

TASK_TYPES = ("authentication", "ping", "imageInference", "imageUpload", "mediaStorage", "getResponse")

_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# a taskUUID as it appears in a body that did not parse (too deep): the errors still name the tasks
_TASK_UUID_IN_TEXT = re.compile(r'"taskUUID"\s*:\s*"([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})"')

# What a body may hold, so the work spent on one stays bounded (a task has ~50 spec fields, nested
# at most 4 deep; these leave room and still refuse 50,000 unknown fields before validation).
MAX_DEPTH = 32  # nesting of arrays and objects, the body's array counting as 1
MAX_FIELDS = 256  # keys of one object
MAX_VALUES = 100_000  # JSON values in the whole body

# The output types and the result key each one fills.
OUTPUT_KEYS = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}
MIME_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ProtocolError(Exception):
    """One error item: `code` is a Runware-style camelCase code, `message` one line."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        parameter: str | None = None,
        task_type: str | None = None,
        task_uuid: str | None = None,
        http_status: int = 400,
    ):
        super().__init__(message)
        self.code, self.message, self.parameter = code, message, parameter
        self.task_type, self.task_uuid, self.http_status = task_type, task_uuid, http_status

    def item(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.parameter:
            out["parameter"] = self.parameter
        if self.task_type:
            out["taskType"] = self.task_type
        if self.task_uuid:
            out["taskUUID"] = self.task_uuid
        return {k: v for k, v in out.items() if v is not None}

    def for_task(self, task: Any) -> ProtocolError:
        """This error, naming `task`'s type and UUID where it did not already."""
        if isinstance(task, dict):
            self.task_type = self.task_type or _str_or_none(task.get("taskType"))
            self.task_uuid = self.task_uuid or _str_or_none(task.get("taskUUID"))
        return self


def errors_frame(errors: list[ProtocolError]) -> dict[str, Any]:
    return {"errors": [error.item() for error in errors]}


def data_frame(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": items}


class BodyErrors(Exception):
    """A body refused as a whole, with one error per task it names (at least one)."""

    def __init__(self, errors: list[ProtocolError]):
        super().__init__(errors[0].message)
        self.errors = errors


def parse_tasks(body: bytes | str) -> list[Any]:
    """The task objects of a request body; ProtocolError for malformed JSON or a non-array body,
    BodyErrors for one nested too deeply to parse (one error per taskUUID it names). A task that
    is too large (depth, fields) is left in the list: `check_task_size` refuses it by name."""
    # each comma outside a string separates two values: far more commas than values allowed is
    # refused unparsed (parsing 32 MiB of small values holds the event loop for seconds); commas in
    # strings only count against it in absurd numbers
    if (body.count(b",") if isinstance(body, bytes) else body.count(",")) > 2 * MAX_VALUES:
        raise _too_many_values()
    try:
        value = json.loads(body)
    except RecursionError:  # deeper than Python's recursion limit: refused unparsed, naming the tasks
        raise BodyErrors(_too_deep_errors(body)) from None
    except (ValueError, UnicodeDecodeError) as err:
        reason = getattr(err, "msg", None) or type(err).__name__
        raise ProtocolError("invalidJSON", f"the request body is not valid JSON ({reason})") from None
    if not isinstance(value, list):
        # a lone task object names its UUID: the error carries it, so the client's wait for it ends
        raise ProtocolError(
            "invalidRequestBody", f"the request body must be a JSON array of task objects, got {_json_type(value)}"
        ).for_task(value)
    if not value:
        raise ProtocolError("invalidRequestBody", "the request body is an empty array: send at least one task")
    if _count_values(value, MAX_VALUES) > MAX_VALUES:
        raise _too_many_values()
    return value


def _too_many_values() -> ProtocolError:
    return ProtocolError(
        "requestTooLarge",
        f"the request body holds more than {MAX_VALUES:,} JSON values; send fewer or smaller tasks",
        http_status=413,
    )


def check_task_size(task: Any) -> None:
    """ProtocolError (naming the task) for a task nested deeper than MAX_DEPTH or with an object of
    more than MAX_FIELDS keys: refused before any validation works on it."""
    stack = [(task, 2)]  # the body's array is level 1
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if len(value) > MAX_FIELDS:
                raise ProtocolError(
                    "invalidRequestBody",
                    f"an object in the task has {len(value):,} fields; at most {MAX_FIELDS} are allowed",
                ).for_task(task)
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise ProtocolError(
                "invalidRequestBody", f"the task nests arrays and objects more than {MAX_DEPTH} levels deep"
            ).for_task(task)
        stack.extend((child, depth + 1) for child in children)


def _count_values(value: Any, limit: int) -> int:
    """How many JSON values `value` holds (counting stops past `limit`)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _too_deep_errors(body: bytes | str) -> list[ProtocolError]:
    message = f"the request body nests arrays and objects too deeply to parse; at most {MAX_DEPTH} levels are allowed"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    uuids = list(dict.fromkeys(match.lower() for match in _TASK_UUID_IN_TEXT.findall(text)))
    if not uuids:
        return [ProtocolError("invalidRequestBody", message)]
    return [ProtocolError("invalidRequestBody", message, task_uuid=uuid) for uuid in uuids]


def task_type_of(task: Any) -> str:
    """The task's taskType; ProtocolError (with the task's UUID) when it is not one served here."""
    if not isinstance(task, dict):
        raise ProtocolError("invalidTask", f"each task must be a JSON object, got {_json_type(task)}")
    task_type = task.get("taskType")
    if task_type not in TASK_TYPES:
        shown = "missing" if task_type is None else repr(task_type)
        raise ProtocolError(
            "unsupportedTaskType",
            f"taskType {shown} is not served here; use one of " + ", ".join(TASK_TYPES),
            parameter="taskType",
        ).for_task(task)
    return task_type


def task_uuid_of(task: dict[str, Any], task_type: str) -> str:
    """The task's taskUUID (a UUID string), required for tasks that answer with results."""
    value = task.get("taskUUID")
    if not isinstance(value, str) or not _UUID.match(value):
        shown = "missing" if value is None else f"{str(value)[:60]!r}"
        raise ProtocolError(
            "invalidTaskUUID",
            f"taskUUID: must be a UUID string, got {shown}",
            parameter="taskUUID",
            task_type=task_type,
        )
    return value.lower()


def problem_error(problem: str, task_type: str, task_uuid: str | None) -> ProtocolError:
    """A validation problem line ('task.width: must be ...') as an error naming its parameter."""
    path = problem.split(":", 1)[0].strip()
    parameter = path.removeprefix("task.") if path.startswith("task.") or path == "model" else None
    top = (parameter or "").split(".", 1)[0].split("[", 1)[0]
    code = "invalid" + (top[:1].upper() + top[1:] if top else "Request")
    return ProtocolError(code, problem, parameter=parameter, task_type=task_type, task_uuid=task_uuid)


def output_value(output_type: str, data: bytes, ext: str, url: str) -> tuple[str, str]:
    """(result key, value) of one image in the asked outputType."""
    key = OUTPUT_KEYS[output_type]
    if output_type == "URL":
        return key, url
    encoded = base64.b64encode(data).decode("ascii")
    return key, encoded if output_type == "base64Data" else f"data:{MIME_TYPES[ext]};base64,{encoded}"


def is_uuid(value: Any) -> bool:
    return isinstance(value, str) and bool(_UUID.match(value))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
