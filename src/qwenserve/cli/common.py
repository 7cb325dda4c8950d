"""Options shared by every subcommand, and turning them into Settings."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, TextIO

from pydantic import ValidationError

from qwenserve.config import Settings


def add_settings_options(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    """--data-dir (and --store, --media): every other option also comes from QWENSERVE_*
    variables."""
    parser.add_argument("--data-dir", help="data folder (env QWENSERVE_DATA_DIR)")
    if store:
        parser.add_argument(
            "--store", help="'sqlite' (default) or redis://HOST:PORT/DB (env QWENSERVE_STORE)"
        )
        parser.add_argument(
            "--media",
            help="s3://BUCKET/PREFIX: images in an S3-compatible bucket, credentials and endpoint "
            "from AWS_* variables (env QWENSERVE_MEDIA; default: beside the store)",
        )


def settings_from(args: argparse.Namespace, **mapping: str) -> Settings:
    """Settings from the environment, overridden by the options the user gave.

    ``mapping`` maps Settings fields to argparse destinations beyond data_dir and store.
    """
    overrides: dict[str, Any] = {}
    for field, dest in {
        "data_dir": "data_dir",
        "store": "store",
        "media": "media",
        **mapping,
    }.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[field] = value
    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SystemExit(f"qwenserve: invalid setting {where}: {first.get('msg')}") from None


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Rich's handler on a terminal; one plain line per record (time, level, logger, message)
    when ``stream`` (stdout) is piped or captured (CI, systemd, docker logs), where rich would
    hard-wrap at 80 columns and split a line that log tools read as one."""
    stream = stream or sys.stdout
    handler: logging.Handler
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=stream), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
