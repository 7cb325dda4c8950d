"""The README test's harness (tests/service/test_readme.py): the quick start's server, the
blocks run as a user would (bash or python, in one working folder, with what the quick start
exported), the webhook example's receiver, and the scale-out block's machines on one machine.

The harness rewrites only the address (``127.0.0.1:8000``, ``localhost:8000``), the OpenAI
example's placeholder key (``"qs_…"``) and the webhook example's URL
(``https://example.com/hook``: a loopback receiver here, so the server allows private URLs; the
suite sends nothing to another host).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from qwenserve.accounts.keys import authenticate, webhook_secret
from qwenserve.config import Settings
from qwenserve.store.sqlite import SqliteStore
from tests.processes import free_port
from tests.service.readme_blocks import Block

QUICK_START = "qwenserve serve &"
PLACEHOLDER_KEY = '"qs_…"'
WEBHOOK_URL = "https://example.com/hook"
SCALE_OUT_STORE = "redis://10.0.0.10:6379/0"
# Commands that run until stopped: in a block of several machines' commands (scale-out), they
# are started in the background, the others run once they answer, then they are stopped.
DAEMONS = ("qwenserve serve", "qwenserve worker")
BLOCK_TIMEOUT_S = 120
START_TIMEOUT_S = 180  # a process's start (imports torch) on a busy 2-core machine


@dataclass
class Ran:
    """What a block did: exit status, output, and the folder it ran in."""

    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    def json_objects(self) -> list[dict[str, Any]]:
        """The JSON objects it printed, in order (curl -s prints each answer with no newline
        after it, so two can share a line)."""
        decoder, text, out = json.JSONDecoder(), self.stdout, []
        index = text.find("{")
        while index != -1:
            try:
                value, end = decoder.raw_decode(text, index)
            except json.JSONDecodeError:
                index = text.find("{", index + 1)
                continue
            out.append(value)
            index = text.find("{", end)
        return out

    def image(self, name: str) -> Image.Image:
        image = Image.open(self.cwd / name)
        image.load()
        return image


@dataclass
class Hooks:
    """A loopback webhook receiver: every POST's headers and raw body, answered 204."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def wait(self, timeout_s: float = 60) -> tuple[dict[str, str], bytes]:
        deadline = time.monotonic() + timeout_s
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.received, f"no webhook delivery in {timeout_s:g} s"
        return self.received[0]


def _receiver() -> tuple[ThreadingHTTPServer, Hooks]:
    hooks = Hooks("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hooks.received.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    hooks.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, hooks


@dataclass
class Readme:
    """The quick start's server and the environment it left."""

    url: str
    port: int
    key: str
    env: dict[str, str]
    work: Path
    hooks: Hooks

    def rewrite(self, text: str) -> str:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        text = text.replace("localhost:8000", f"localhost:{self.port}")
        text = text.replace(WEBHOOK_URL, self.hooks.url)
        return text.replace(PLACEHOLDER_KEY, json.dumps(self.key))

    def webhook_secret(self) -> str:
        """The key's signing secret, as ``qwenserve keys webhook-secret`` shows it."""
        settings = Settings(data_dir=Path(self.env["HOME"]) / ".qwenserve")
        store = SqliteStore(settings.sqlite_path)
        try:
            secret = webhook_secret(store, authenticate(store, self.key).id)
        finally:
            store.close()
        assert secret is not None and secret.startswith("whsec_")
        return secret

    def run(self, block: Block) -> Ran:
        text = self.rewrite(block.text)
        if block.kind == "python":
            argv = [sys.executable, "-c", text]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", text]
        done = subprocess.run(
            argv,
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
            check=False,
        )
        return Ran(done.returncode, done.stdout, done.stderr, self.work)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"x-api-key": self.key}, timeout=10)

    def run_machines(self, block: Block, store_url: str) -> Ran:
        """A block of several machines' commands, on one: ``SCALE_OUT_STORE`` is a local
        redis-server, the API node listens on a free port, each machine's own HOME."""
        text = self.rewrite(block.text).replace(SCALE_OUT_STORE, store_url)
        commands = [line.split("#")[0].strip() for line in text.splitlines()]
        home = self.work.parent / "machines"
        home.mkdir(exist_ok=True)
        port = free_port()
        # COLUMNS: rich's tables as wide as they need (no wrapped cells in a pipe).
        env = {**self.env, "HOME": str(home), "QWENSERVE_PORT": str(port), "COLUMNS": "200"}
        log = (home / "daemons.log").open("wb")
        daemons = [
            subprocess.Popen(
                ["bash", "-c", f"exec {command}"], cwd=home, env=env, stdout=log, stderr=log
            )
            for command in commands
            if command.startswith(DAEMONS)
        ]
        try:
            _wait_for_worker(f"http://127.0.0.1:{port}", daemons, home / "daemons.log")
            once = "\n".join(c for c in commands if c and not c.startswith(DAEMONS))
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", once],
                cwd=home,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                check=False,
            )
        finally:
            for daemon in daemons:
                daemon.send_signal(signal.SIGTERM)
            for daemon in daemons:
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(10)
            log.close()
        return Ran(done.returncode, done.stdout, done.stderr, home)


def _wait_for_worker(url: str, daemons: list[subprocess.Popen[bytes]], log: Path) -> None:
    """Until the API node answers and sees a worker alive."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(d.poll() is not None for d in daemons):
            raise AssertionError(f"a machine's command exited:\n{log.read_text()}")
        try:
            health = httpx.get(f"{url}/healthz", timeout=1)
            if health.status_code == 200 and health.json()["workers"] >= 1:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no API node with a worker in {START_TIMEOUT_S} s:\n{log.read_text()}")


def _clean_environ(home: Path, port: int, cache: Path) -> dict[str, str]:
    """The caller's environment less any qwenserve/Segmind setting, in a fresh HOME, with this
    interpreter's scripts (``qwenserve``, ``python``) first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QWENSERVE_", "SEGMIND_", "OPENAI_"))
    }
    bindir = str(Path(sys.executable).parent)
    env.update(
        HOME=str(home),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        QWENSERVE_PORT=str(port),
        QWENSERVE_CACHE_DIR=str(cache),  # the session's tiny preset, built once
        QWENSERVE_ALLOW_PRIVATE_URLS="true",  # the webhook example's loopback receiver
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def quick_start(quick: Block, root: Path, cache: Path) -> Iterator[Readme]:
    """Runs the quick start block in ``root``; yields once its server answers and its key is
    created; stops the server (and the webhook receiver) after."""
    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    port = free_port()
    env = _clean_environ(home, port, cache)
    state = root / "state"
    # As a user's shell: the block, then what it left ($! and the exported key), then wait so
    # the server stays this bash's child (stopped with it below).
    script = quick.text + f'printf "%s\\n%s\\n" "$!" "$SEGMIND_API_KEY" > {state}\nwait\n'
    log = (root / "server.log").open("wb")
    shell = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    receiver, hooks = _receiver()
    try:
        key = _wait_ready(shell, state, url, root / "server.log")
        exported = {**env, "SEGMIND_API_KEY": key}
        yield Readme(url, port, key, exported, work, hooks)
    finally:
        receiver.shutdown()
        receiver.server_close()
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)  # its own session: bash and the server
            try:
                shell.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait(10)
        log.close()


def _wait_ready(shell: subprocess.Popen[bytes], state: Path, url: str, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if shell.poll() is not None:
            raise AssertionError(f"the quick start exited {shell.returncode}:\n{log.read_text()}")
        lines = state.read_text().splitlines() if state.exists() else []
        if len(lines) == 2:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return lines[1]
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(
        f"the quick start's server was not up in {START_TIMEOUT_S} s:\n{log.read_text()}"
    )


def png(color: tuple[int, int, int]) -> bytes:
    """A small PNG: the images a block opens as the user's own (``bottle.png``)."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buffer, "PNG")
    return buffer.getvalue()
