"""A least-recently-used map bounded by the bytes its values hold, not by how many there are.

Entries differ in size by orders of magnitude (a 64x64 reference and a 1 MP one; a tiny model's
reference K/V and a 9B model's 2 GiB), so a count says nothing about the memory held. JAX-free.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """At most `max_bytes` of values (each measured once by `size_of`), least recently used first out.

    A value larger than the whole budget is handed back but not kept, unless `keep_newest`: then the
    newest value is always kept (alone, if need be) until the next one arrives, for values that cost
    more to remake than to hold. Not thread-safe: its owner serialises access.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int], *, keep_newest: bool = False):
        self.max_bytes = max(0, int(max_bytes))
        self._size_of = size_of
        self._keep_newest = keep_newest
        self._items: collections.OrderedDict[Hashable, tuple[V, int]] = collections.OrderedDict()
        self.nbytes = 0  # bytes held now

    def get(self, key: Hashable) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        self._drop(key)
        size = int(self._size_of(value))
        if size > self.max_bytes and not self._keep_newest:
            return
        self._items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._items) > 1:  # the oldest go; the newest stays
            self._drop(next(iter(self._items)))

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: Hashable) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]
