"""The `qwenserve` command: the composition root that wires settings, store, workers and API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from qwenserve import __version__
from qwenserve.backends import parse_store_url
from qwenserve.cli import keys, run, serve, status, worker
from qwenserve.cli.common import settings_from
from qwenserve.errors import StoreUnavailable
from qwenserve.media.storage import MediaConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenserve",
        description="Self-hosted, Segmind-compatible serving for the Qwen-Image models.",
    )
    parser.add_argument("--version", action="version", version=f"qwenserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve.register(subparsers)
    run.register(subparsers)
    keys.register(subparsers)
    worker.register(subparsers)
    status.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Commands that configure no logging (keys, status) say a store outage once, in the exit
    # line below, not also as Python's last-resort warning; serve and worker log it as usual.
    store_log = logging.getLogger("qwenserve.store")
    if not store_log.handlers:
        store_log.addHandler(logging.NullHandler())
    try:
        code: int = args.handler(args)
    except MediaConfigError as error:
        # A bucket that cannot be used: refuse to start, in one line, rather than fail jobs.
        raise SystemExit(f"qwenserve: media store: {error}") from None
    except StoreUnavailable as error:
        # The store did not answer (after its client's retries): one line, not a traceback.
        raise SystemExit(f"qwenserve: {store_unreachable(args, error)}") from None
    return code


def store_unreachable(args: argparse.Namespace, error: StoreUnavailable) -> str:
    """What a command says when the store cannot be reached: where it looked (no password)
    and the client's reason, which ``unavailable_as_503`` keeps only as the exception's
    context."""
    try:
        target = parse_store_url(settings_from(args).store)
    except (SystemExit, ValueError):  # pragma: no cover - the command parsed them already
        target = None
    where = f" at {target.describe()}" if target is not None else ""
    cause = error.__cause__ or error.__context__
    reason = f": {cause}" if cause is not None else ""
    return f"the job store{where} cannot be reached{reason} (--store, QWENSERVE_STORE)"


if __name__ == "__main__":
    sys.exit(main())
