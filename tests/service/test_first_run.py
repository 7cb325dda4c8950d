"""What a first `qwenserve serve` prints: logs one line per record when they go to a file or a
pipe (never wrapped at 80 columns), and the engine said once however many workers run it."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest

from qwenserve.cli.common import configure_logging
from tests.processes import Server


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logs_to_a_pipe_are_plain_unwrapped_lines(restore_logging: None) -> None:
    stream = io.StringIO()  # not a terminal, as under CI, systemd or docker
    configure_logging("INFO", stream)
    message = "job abc started " + "x" * 300
    logging.getLogger("qwenserve.worker").info(message)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(f"INFO qwenserve.worker: {message}")


def test_the_startup_says_the_engine_once(make_server: Callable[..., Server]) -> None:
    server = make_server("--workers", "2").start()
    server.terminate()
    lines = server.logs().splitlines()
    engine_lines = [line for line in lines if "engine:" in line]
    assert len(engine_lines) == 1, engine_lines
    assert engine_lines[0].count("engine") == 1
    assert engine_lines[0].endswith("2 worker(s)")  # one line (> 80 columns), not wrapped
    assert "images are noise" in engine_lines[0]
    # Each worker's engine child says it is ready, by its pid, without repeating the engine.
    ready = [line for line in lines if "qwenserve.engine.child: engine process" in line]
    assert len(ready) == 2 and all(line.endswith(" ready") for line in ready), ready
