"""Model-affinity routing: a job goes to a worker that already holds its model when one is free.

Pure functions over what workers announce (``qwenserve.store.workers``), so the rule is tested
without processes. A worker first claims the slugs whose base weights it holds; then the slugs
that no *idle* peer holds (loading 40 GB of weights is worth it only when nobody who has them is
free). A slug held only by busy peers is fair game, or the queue would wait on one worker.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from qwenserve.catalog import MODELS
from qwenserve.store.workers import WorkerInfo


@dataclass(frozen=True)
class ClaimPlan:
    """Slugs to claim from, in order of preference."""

    warm: tuple[str, ...]
    cold: tuple[str, ...]


def base_of(slug: str) -> str:
    return MODELS[slug].recipe.base_weights


def plan_claims(
    *,
    served: Sequence[str],
    resident: Collection[str],
    peers: Sequence[WorkerInfo],
    worker_id: str,
) -> ClaimPlan:
    """Which slugs this worker should claim first (warm) and which it may load (cold)."""
    warm = tuple(s for s in served if base_of(s) in resident)
    idle_peers = [p for p in peers if p.worker_id != worker_id and not p.busy]

    def an_idle_peer_has(slug: str) -> bool:
        return any(base_of(slug) in peer.resident and _serves(peer, slug) for peer in idle_peers)

    cold = tuple(s for s in served if s not in warm and not an_idle_peer_has(s))
    return ClaimPlan(warm=warm, cold=cold)


def _serves(peer: WorkerInfo, slug: str) -> bool:
    return not peer.slugs or slug in peer.slugs


def idle_peer_serves(slug: str, peers: Sequence[WorkerInfo], worker_id: str) -> bool:
    """True when a peer other than ``worker_id`` is idle and serves ``slug``: a busy worker
    should not claim ahead what that peer would start at once."""
    return any(p.worker_id != worker_id and not p.busy and _serves(p, slug) for p in peers)
