"""Which task fields a rule looks at: lets the item builder run a rule once per recipe, not per item.

A rule is a deterministic function of the task. Run on a recipe's static fields, if it never reads
a field that varies per item, it takes the same path for every item and returns the same problems.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


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

    __hash__ = None  # type: ignore[assignment]

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


def constant_result(rule: Callable[[dict], list[str]], static_task: dict[str, Any], varying: Iterable[str]) -> list[str] | None:
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
