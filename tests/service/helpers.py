"""Small things the service tests share: input images, a loopback file server, image checks."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from PIL import Image

from qwenserve.catalog import MODELS


def png_b64(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def body_for(slug: str, **overrides: object) -> dict[str, object]:
    """A valid request for ``slug``: its required fields plus small, fast choices."""
    body: dict[str, object] = {"prompt": "a lighthouse at dusk"}
    spec = MODELS[slug]
    if spec.param("steps") is not None:
        body["steps"] = 2
    if spec.param("image") is not None:
        body["image"] = png_b64()
    if spec.param("image_1") is not None:
        body["image_1"] = png_b64()
    if slug == "qwen-image-2512":
        body.update(width=256, height=256)
    body.update(overrides)
    return body


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes, str, float]]] = {}

    def do_GET(self) -> None:
        status, data, content_type, delay_s = self.routes.get(
            self.path, (404, b"not found", "text/plain", 0.0)
        )
        if delay_s:
            time.sleep(delay_s)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        return


@contextmanager
def file_server(routes: dict[str, tuple[int, bytes, str, float]]) -> Iterator[str]:
    """A loopback HTTP server answering ``routes`` (path → status, body, type, delay)."""
    handler = type("Handler", (_Handler,), {"routes": routes})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
