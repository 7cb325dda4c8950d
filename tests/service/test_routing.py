"""Model-affinity routing and the worker registry."""

from __future__ import annotations

from pathlib import Path

from qwenserve.store.workers import SqliteWorkerRegistry, WorkerInfo
from qwenserve.worker.routing import plan_claims

ALL = [
    "qwen-image",
    "qwen-image-fast",
    "qwen-image-2512",
    "qwen-image-edit-fast",
    "qwen-image-edit-plus-product-photography",
]


def peer(
    worker_id: str, resident: tuple[str, ...], busy: bool = False, slugs: tuple[str, ...] = ()
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        host="h",
        slugs=slugs,
        resident=resident,
        current_job="job" if busy else None,
        started_at=0.0,
        last_seen=100.0,
    )


def test_resident_models_come_first_and_share_bases() -> None:
    plan = plan_claims(served=ALL, resident={"Qwen/Qwen-Image"}, peers=[], worker_id="me")
    assert plan.warm == ("qwen-image", "qwen-image-fast")
    assert set(plan.cold) == set(ALL) - {"qwen-image", "qwen-image-fast"}


def test_cold_models_held_by_an_idle_peer_are_left_to_it() -> None:
    peers = [peer("other", ("Qwen/Qwen-Image-Edit",))]
    plan = plan_claims(served=ALL, resident=set(), peers=peers, worker_id="me")
    assert "qwen-image-edit-fast" not in plan.cold
    assert "qwen-image" in plan.cold


def test_busy_or_non_serving_peers_do_not_hold_back() -> None:
    busy = [peer("other", ("Qwen/Qwen-Image-Edit",), busy=True)]
    assert (
        "qwen-image-edit-fast"
        in plan_claims(served=ALL, resident=set(), peers=busy, worker_id="me").cold
    )
    narrow = [peer("other", ("Qwen/Qwen-Image",), slugs=("qwen-image",))]
    plan = plan_claims(served=ALL, resident=set(), peers=narrow, worker_id="me")
    assert "qwen-image" not in plan.cold and "qwen-image-fast" in plan.cold


def test_sqlite_registry_announce_lapse_remove(tmp_path: Path) -> None:
    registry = SqliteWorkerRegistry(tmp_path / "db.sqlite")
    registry.announce(peer("a", ("Qwen/Qwen-Image",)), ttl_s=15)
    registry.announce(peer("b", (), busy=True), ttl_s=15)
    assert [w.worker_id for w in registry.alive(now=110)] == ["a", "b"]
    assert registry.alive(now=110)[0].resident == ("Qwen/Qwen-Image",)
    assert registry.alive(now=110)[1].busy
    assert registry.alive(now=116) == []
    registry.remove("a")
    assert [w.worker_id for w in registry.alive(now=101)] == ["b"]
