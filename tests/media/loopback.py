"""Real loopback HTTP(S) servers with scripted routes, and small helpers for the media tests."""

from __future__ import annotations

import contextlib
import http.server
import io
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from PIL import Image

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on purpose (size limits, timeouts) are expected here


class LoopbackServer:
    """A threaded HTTP server on a loopback address; routes map a path to a handler.

    ``hits`` counts requests per path, so tests can assert what was (not) fetched, and
    ``stopping`` lets slow handlers give up when the test ends.
    """

    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()
        self.stopping = threading.Event()
        owner = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                owner.hits[path] += 1
                handler = owner.routes.get(path)
                if handler is None:
                    send(self, 404, b"not found")
                    return
                handler(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server((host, 0), _Handler)
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def send(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """Answer with a fixed body and its Content-Length."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def body_route(body: bytes, content_type: str = "application/octet-stream") -> Handler:
    return lambda h: send(h, 200, body, {"Content-Type": content_type})


def redirect_route(location: str, status: int = 302) -> Handler:
    return lambda h: send(h, status, b"", {"Location": location})


def chunked_route(total_bytes: int, chunk_bytes: int = 65536) -> Handler:
    """A body sent chunked (no Content-Length), so only streaming can bound it."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        chunk = b"x" * chunk_bytes
        try:
            while sent < total_bytes:
                piece = chunk[: total_bytes - sent]
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    return handle


def make_image_bytes(
    image_format: str = "PNG", size: tuple[int, int] = (32, 24), **save: Any
) -> bytes:
    image = Image.new("RGB", size, (200, 30, 40))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return buffer.getvalue()


def sleep_route(server: LoopbackServer, seconds: float) -> Handler:
    """Answer only after ``seconds`` (or when the test ends)."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        server.stopping.wait(seconds)
        with contextlib.suppress(OSError):
            send(h, 200, b"late")

    return handle


def drip_route(server: LoopbackServer, interval_s: float, total_bytes: int) -> Handler:
    """Send one byte every ``interval_s``: each read is quick, the whole body is slow."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total_bytes))
        h.end_headers()
        try:
            for _ in range(total_bytes):
                if server.stopping.is_set():
                    return
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(interval_s)
        except OSError:
            pass

    return handle


def header_drip_route(server: LoopbackServer, interval_s: float, total_bytes: int) -> Handler:
    """Send the status line, then a header one byte every ``interval_s``: the headers never end
    in time, though every single read is quick (a per-read timeout never fires)."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            h.wfile.flush()
            for _ in range(total_bytes):
                if server.stopping.is_set():
                    return
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(interval_s)
        except OSError:
            pass

    return handle
