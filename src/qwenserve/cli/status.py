"""`qwenserve status`: queue depth per model, workers and what they hold, oldest waiting job."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from qwenserve.backends import open_backend
from qwenserve.cli.common import add_settings_options, settings_from


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="show queues and workers")
    add_settings_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    backend = open_backend(settings)
    now = time.time()
    try:
        stats = backend.store.stats(now=now)
        workers = backend.registry.alive(now=now)
    finally:
        backend.close()
    if args.json:
        print(
            json.dumps(
                {
                    "queued": stats.queued_by_model,
                    "processing": stats.processing_by_model,
                    "oldest_queued_age_s": stats.oldest_queued_age_s,
                    "workers": [
                        {
                            "worker_id": w.worker_id,
                            "host": w.host,
                            "models": list(w.slugs) or "all",
                            "resident": list(w.resident),
                            "current_job": w.current_job,
                            "seen_s_ago": round(now - w.last_seen, 1),
                        }
                        for w in workers
                    ],
                }
            )
        )
        return 0
    console = Console()
    queues = Table("model", "queued", "processing", title="queues")
    for slug in sorted(set(stats.queued_by_model) | set(stats.processing_by_model)):
        queues.add_row(
            slug,
            str(stats.queued_by_model.get(slug, 0)),
            str(stats.processing_by_model.get(slug, 0)),
        )
    console.print(queues)
    oldest = stats.oldest_queued_age_s
    console.print(f"oldest waiting job: {'none' if oldest is None else f'{oldest:.1f}s'}")
    table = Table("worker", "host", "models", "resident", "current job", "seen", title="workers")
    for w in workers:
        table.add_row(
            w.worker_id,
            w.host,
            ", ".join(w.slugs) or "all",
            ", ".join(w.resident) or "-",
            w.current_job or "idle",
            f"{now - w.last_seen:.1f}s ago",
        )
    console.print(table)
    return 0
