"""Options shared by every subcommand, and turning them into Settings."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pydantic import ValidationError

from qwenserve.config import Settings


def add_settings_options(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    """--data-dir (and --store): every other option also comes from QWENSERVE_* variables."""
    parser.add_argument("--data-dir", help="data folder (env QWENSERVE_DATA_DIR)")
    if store:
        parser.add_argument(
            "--store", help="'sqlite' (default) or redis://HOST:PORT/DB (env QWENSERVE_STORE)"
        )


def settings_from(args: argparse.Namespace, **mapping: str) -> Settings:
    """Settings from the environment, overridden by the options the user gave.

    ``mapping`` maps Settings fields to argparse destinations beyond data_dir and store.
    """
    overrides: dict[str, Any] = {}
    for field, dest in {"data_dir": "data_dir", "store": "store", **mapping}.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[field] = value
    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SystemExit(f"qwenserve: invalid setting {where}: {first.get('msg')}") from None


def configure_logging(level: str) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
