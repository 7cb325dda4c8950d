"""Which base pipelines stay loaded: least recently used first out, under a count and a byte budget.

Plain bookkeeping, no torch: the engine tells it the size of what it loaded and gets back what to
drop. The entry just used is never evicted, so a budget smaller than one pipeline still serves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Residency(Generic[T]):
    """An LRU map of residency key → loaded value, bounded by count and estimated bytes."""

    def __init__(
        self,
        *,
        max_items: int,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = lambda _value: 0,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._sizes: dict[str, int] = {}

    def get(self, key: str) -> T | None:
        """The value for ``key``, now the most recently used; None when not resident."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def make_room(self) -> list[tuple[str, T]]:
        """Evict (LRU first) so one more entry fits the count; returns what was evicted."""
        evicted = []
        while len(self._entries) >= self.max_items:
            evicted.append(self._pop_oldest())
        return evicted

    def put(self, key: str, value: T) -> list[tuple[str, T]]:
        """Add ``value`` as the most recent entry; returns the entries evicted to fit it."""
        evicted = [] if key in self._entries else self.make_room()
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._sizes[key] = self._size_of(value)
        if self.max_bytes is not None:
            while len(self._entries) > 1 and self.total_bytes > self.max_bytes:
                evicted.append(self._pop_oldest())
        return evicted

    def pop(self, key: str) -> T | None:
        self._sizes.pop(key, None)
        return self._entries.pop(key, None)

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def _pop_oldest(self) -> tuple[str, T]:
        key, value = self._entries.popitem(last=False)
        self._sizes.pop(key, None)
        return key, value
