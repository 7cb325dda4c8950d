"""LRU residency bookkeeping: count and byte budgets."""

from __future__ import annotations

from qwenserve.runtime.residency import Residency


def test_count_budget_evicts_least_recently_used() -> None:
    lru: Residency[str] = Residency(max_items=2)
    assert lru.put("a", "A") == []
    assert lru.put("b", "B") == []
    assert lru.get("a") == "A"  # a is now the most recent
    assert lru.put("c", "C") == [("b", "B")]
    assert lru.keys() == ["a", "c"]


def test_byte_budget_evicts_until_it_fits_but_keeps_the_newest() -> None:
    sizes = {"a": 40, "b": 40, "c": 70, "huge": 500}
    lru: Residency[str] = Residency(max_items=10, max_bytes=100, size_of=sizes.__getitem__)
    lru.put("a", "a")
    lru.put("b", "b")
    assert lru.put("c", "c") == [("a", "a"), ("b", "b")]
    assert lru.put("huge", "huge") == [("c", "c")]
    assert lru.keys() == ["huge"]  # bigger than the budget, still served
