"""The `qwenserve` command: the composition root that wires settings, store, workers and API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qwenserve import __version__
from qwenserve.cli import keys, run, serve, status, worker


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
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
