"""`qwenserve keys ...`: create, list, update, revoke and top up API keys, and report their usage
(safe while the server runs)."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from qwenserve.accounts.keys import create_api_key, webhook_secret
from qwenserve.backends import open_backend
from qwenserve.cli.common import add_settings_options, settings_from
from qwenserve.errors import QwenServeError, StoreUnavailable
from qwenserve.store import rules
from qwenserve.store.history import DAY_S, DEFAULT_USAGE_DAYS, parse_instant


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys")
    actions = parser.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key; prints it as the last line")
    add_settings_options(create)
    create.add_argument("--name", default="default", help="a label for the key")
    create.add_argument("--credits", type=float, default=10.0, help="starting balance in USD")
    create.add_argument("--rpm", type=int, default=60, help="requests per minute (0: no limit)")
    create.add_argument("--models", default="", help="comma-separated slugs (default: all)")
    create.add_argument(
        "--max-queued", type=int, default=0, help="most jobs queued at once (0: no limit)"
    )
    create.add_argument(
        "--weight", type=float, default=1.0, help="share of the GPUs against other keys (> 0)"
    )
    create.add_argument(
        "--max-running", type=int, default=0, help="most jobs running at once (0: no limit)"
    )
    create.set_defaults(handler=_create)

    update = actions.add_parser("update", help="change a key's credits or limits")
    add_settings_options(update)
    update.add_argument("key_id")
    update.add_argument(
        "--credits", type=float, help="set the balance to this many USD (topup adds instead)"
    )
    update.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    update.add_argument("--max-queued", type=int, help="most jobs queued at once (0: no limit)")
    update.add_argument("--weight", type=float, help="share of the GPUs against other keys (> 0)")
    update.add_argument("--max-running", type=int, help="most jobs running at once (0: no limit)")
    update.set_defaults(handler=_update)

    listing = actions.add_parser("list", help="list keys (never the secrets)")
    add_settings_options(listing)
    listing.set_defaults(handler=_list)

    revoke = actions.add_parser("revoke", help="revoke a key by id")
    add_settings_options(revoke)
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)

    topup = actions.add_parser("topup", help="add credits to a key")
    add_settings_options(topup)
    topup.add_argument("key_id")
    topup.add_argument("amount", type=float, help="USD to add")
    topup.set_defaults(handler=_topup)

    secret = actions.add_parser(
        "webhook-secret", help="show a key's webhook signing secret (whsec_...)"
    )
    add_settings_options(secret)
    secret.add_argument("key_id")
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one")
    secret.set_defaults(handler=_webhook_secret)

    usage = actions.add_parser(
        "usage", help="requests, charges and GPU time per day and model (default: last 30 days)"
    )
    add_settings_options(usage)
    usage.add_argument("key_id", nargs="?", help="one key (default: every key)")
    usage.add_argument("--since", help="from (Unix seconds or ISO 8601; UTC unless it says)")
    usage.add_argument("--until", help="to (default: now)")
    usage.set_defaults(handler=_usage)


def _create(args: argparse.Namespace) -> int:
    backend = open_backend(settings_from(args))
    store = backend.store
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        plaintext, key = create_api_key(
            store,
            name=args.name,
            credits_usd=args.credits,
            rpm=args.rpm,
            models=models,
            now=time.time(),
            max_queued=args.max_queued,
            weight=args.weight,
            max_running=args.max_running,
        )
        secret = webhook_secret(store, key.id)
    except StoreUnavailable:
        raise  # not the key's fault: ``main`` says where the store is, as for every command
    except QwenServeError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.message}")
        return 2
    finally:
        backend.close()
    console = Console(stderr=True)
    console.print(
        f"created key [bold]{key.id}[/bold] ({key.name}): ${key.balance_usd:.4f}, "
        f"rpm {key.rpm or 'unlimited'}, max queued {key.max_queued or 'unlimited'}, "
        f"weight {key.weight:g}, max running {key.max_running or 'unlimited'}, "
        f"models {', '.join(key.models) or 'all'}"
    )
    console.print("store it now: it is shown only once")
    console.print(f"webhook signing secret: {secret} (again: qwenserve keys webhook-secret)")
    print(plaintext, flush=True)
    return 0


def _list(args: argparse.Namespace) -> int:
    backend = open_backend(settings_from(args))
    store = backend.store
    try:
        keys = store.list_keys()
    finally:
        backend.close()
    table = Table(
        "id",
        "name",
        "balance (USD)",
        "rpm",
        "max queued",
        "weight",
        "max running",
        "models",
        "revoked",
    )
    for key in keys:
        table.add_row(
            key.id,
            key.name,
            f"{key.balance_usd:.6f}",
            str(key.rpm or "unlimited"),
            str(key.max_queued or "unlimited"),
            f"{key.weight:g}",
            str(key.max_running or "unlimited"),
            ", ".join(key.models) or "all",
            "yes" if key.revoked else "",
        )
    Console().print(table)
    return 0


def _update(args: argparse.Namespace) -> int:
    """Each value given is set, all in one atomic store step (``Store.update_key``):
    ``--credits`` sets the balance to that amount (``topup`` adds instead)."""
    given = (
        ("--credits", args.credits),
        ("--rpm", args.rpm),
        ("--max-queued", args.max_queued),
        ("--max-running", args.max_running),
    )
    errors = [
        f"{flag} must be 0 or more"
        for flag, value in given
        if value is not None and not (math.isfinite(value) and value >= 0)
    ]
    if args.weight is not None and not (math.isfinite(args.weight) and args.weight > 0):
        errors.append("--weight must be more than 0")
    if all(value is None for _, value in given) and args.weight is None:
        errors.append(
            "nothing to change: give --credits, --rpm, --max-queued, --weight or --max-running"
        )
    if errors:
        Console(stderr=True).print(f"[red]error:[/red] {'; '.join(errors)}")
        return 2
    backend = open_backend(settings_from(args))
    store = backend.store
    try:
        key = store.update_key(
            args.key_id,
            rpm=args.rpm,
            max_queued=args.max_queued,
            weight=args.weight,
            max_running=args.max_running,
            balance_usd=args.credits,
        )
    finally:
        backend.close()
    if key is None:
        Console(stderr=True).print(f"[red]error:[/red] no key {args.key_id}")
        return 1
    print(
        f"{key.id}: balance ${key.balance_usd:.6f}, rpm {key.rpm or 'unlimited'}, "
        f"max queued {key.max_queued or 'unlimited'}, weight {key.weight:g}, "
        f"max running {key.max_running or 'unlimited'}"
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    backend = open_backend(settings_from(args))
    store = backend.store
    try:
        done = store.revoke_key(args.key_id)
    finally:
        backend.close()
    if not done:
        Console(stderr=True).print(f"[red]error:[/red] no key {args.key_id}")
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _topup(args: argparse.Namespace) -> int:
    if args.amount <= 0:
        Console(stderr=True).print("[red]error:[/red] amount must be positive")
        return 2
    backend = open_backend(settings_from(args))
    store = backend.store
    try:
        balance = store.topup(args.key_id, args.amount)
    except KeyError:
        Console(stderr=True).print(f"[red]error:[/red] no key {args.key_id}")
        return 1
    finally:
        backend.close()
    print(f"{args.key_id}: balance ${balance:.6f}")
    return 0


def _webhook_secret(args: argparse.Namespace) -> int:
    backend = open_backend(settings_from(args))
    try:
        secret = webhook_secret(backend.store, args.key_id, rotate=args.rotate)
    finally:
        backend.close()
    if secret is None:
        Console(stderr=True).print(f"[red]error:[/red] no key {args.key_id}")
        return 1
    print(secret, flush=True)
    return 0


def _usage(args: argparse.Namespace) -> int:
    try:
        until = parse_instant(args.until, "--until") or time.time()
        since = parse_instant(args.since, "--since") or until - DEFAULT_USAGE_DAYS * DAY_S
    except QwenServeError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.message}")
        return 2
    backend = open_backend(settings_from(args))
    try:
        rows = backend.store.usage(args.key_id, since=since, until=until)
    finally:
        backend.close()
    table = Table("day", "key", "model", "requests", "cost (USD)", "GPU seconds")
    for row in rows:
        table.add_row(
            row.day,
            row.key_id,
            row.model,
            str(row.count),
            f"{row.cost_usd:.6f}",
            f"{row.gpu_seconds:.3f}",
        )
    table.add_row(
        "total",
        "",
        "",
        str(sum(r.count for r in rows)),
        f"{rules.to_usd(sum(rules.to_micro(r.cost_usd) for r in rows)):.6f}",
        f"{sum(r.gpu_seconds for r in rows):.3f}",
        style="bold",
    )
    Console(width=120).print(table)
    return 0
