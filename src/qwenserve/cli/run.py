"""`qwenserve run SLUG ...`: generate one image locally, no server, no store.

The request goes through the same contract (``validate_request``), input loading (the media
layer), engine and encoder as a served job, so what it prints is what the API would return.
With ``--server URL`` a running server does the work instead (``cli/remote.py``).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qwenserve.catalog import GenerationRequest, ModelSpec, get_model, validate_request
from qwenserve.cli.common import add_settings_options, settings_from
from qwenserve.errors import InvalidRequest, QwenServeError, UnknownModel

if TYPE_CHECKING:
    from qwenserve.config import Settings

EXIT_INVALID_INPUT = 2
EXIT_ENGINE_FAILURE = 1
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand to the ``qwenserve`` parser."""
    parser = subparsers.add_parser(
        "run",
        help="generate one image locally (no server)",
        description="Generate one image with a model's contract, e.g. "
        "qwenserve run qwen-image-fast --prompt 'a lighthouse at dusk' --out out.png",
    )
    parser.add_argument("slug", help="model slug, e.g. qwen-image-fast")
    parser.add_argument("--prompt", help="the prompt (required by every model)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a request parameter; VALUE is read as JSON when it parses (42, true, null), "
        "else as a string. Repeatable.",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH|URL",
        help="an input image, filling the model's image fields in order. Repeatable.",
    )
    parser.add_argument(
        "--weights",
        help="tiny (random CPU preset), hub, or a weights folder (env QWENSERVE_WEIGHTS)",
    )
    parser.add_argument("--out", required=True, type=Path, help="where to write the image")
    remote = parser.add_argument_group("remote (run on a server over v2)")
    remote.add_argument(
        "--server",
        metavar="URL",
        help="a qwenserve (or Segmind-compatible) server, e.g. http://127.0.0.1:8000; the job "
        "is queued there, followed with a progress bar and ETA; Ctrl-C cancels it",
    )
    remote.add_argument(
        "--api-key", help="the key for --server (default: QWENSERVE_API_KEY or SEGMIND_API_KEY)"
    )
    remote.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the result (--server)"
    )
    add_settings_options(parser, store=False)
    parser.set_defaults(handler=handle)


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, JSON value or the raw string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidRequest(f"--param {text!r} is not KEY=VALUE", field="param")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _image_source(text: str) -> str:
    """A local file becomes base64 (as a client would send it); URLs and data pass through."""
    if text.lower().startswith(("http://", "https://", "data:")):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"--image {text!r}: no such file (or an http(s) URL)", field="image")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def build_body(
    spec: ModelSpec,
    *,
    prompt: str | None,
    params: list[str],
    images: list[str],
    out: Path | None = None,
) -> dict[str, Any]:
    """The request body a client would send: what the user gave, nothing more (the server fills
    every parameter's default, a page's "required" ``steps`` included)."""
    body: dict[str, Any] = {}
    if prompt is not None:
        body["prompt"] = prompt
    for text in params:
        key, value = parse_param(text)
        body[key] = value
    fields = spec.image_fields
    if len(images) > len(fields):
        raise InvalidRequest(
            f"{spec.slug} takes at most {len(fields)} image(s), got {len(images)}",
            field=fields[0] if fields else "image",
        )
    for name, source in zip(fields, images, strict=False):
        body[name] = _image_source(source)
    fmt = spec.param("image_format")
    if out is not None and fmt is not None and "image_format" not in body:
        inferred = _SUFFIX_FORMATS.get(out.suffix.lower())
        if inferred is not None and fmt.allowed is not None and inferred in fmt.allowed:
            body["image_format"] = inferred
    return body


def check_out(out: Path, request: GenerationRequest) -> None:
    """Refuse, before any work, an ``--out`` whose extension is not the format the request
    makes (a .gif, or .jpg for a PNG request): the file would lie about its contents."""
    suffix = out.suffix.lower()
    if not suffix:
        return
    wanted = _SUFFIX_FORMATS.get(suffix)
    if wanted is None:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise InvalidRequest(
            f"--out {out}: cannot write {suffix} files; use one of {known}", field="out"
        )
    if wanted != request.image_format:
        raise InvalidRequest(
            f"--out {out}: {request.slug} makes {request.image_format} here, not {wanted} "
            f"(set --param image_format=... to one it allows, or change the extension)",
            field="out",
        )


def handle(args: argparse.Namespace) -> int:
    """Run the ``run`` subcommand; returns the process exit code."""
    console = Console(stderr=True)
    try:
        if args.server:
            from qwenserve.cli.remote import run_remote

            return run_remote(args, console)
        return _run(args, settings_from(args, weights="weights"), console)
    except (InvalidRequest, UnknownModel) as error:
        where = (
            f"{error.field}: " if error.field and not error.message.startswith(error.field) else ""
        )
        # One line however long (a path in it): rich would fold it at 80 columns off a terminal.
        console.print(f"[red]invalid input:[/red] {where}{error.message}", soft_wrap=True)
        return EXIT_INVALID_INPUT
    except QwenServeError as error:
        console.print(f"[red]failed:[/red] {error.message}", soft_wrap=True)
        return EXIT_ENGINE_FAILURE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


def _run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    spec = get_model(args.slug)
    body = build_body(spec, prompt=args.prompt, params=args.param, images=args.image, out=args.out)
    request = validate_request(spec.slug, body)
    check_out(args.out, request)
    if settings.engine.weights == "hub":
        from qwenserve.runtime.hub_access import require_hub_repo

        # Seconds, before torch loads: the hub unreachable, or offline and the repo not cached.
        require_hub_repo(spec.recipe.base_weights)

    from qwenserve.media.encode import encode_image
    from qwenserve.worker.inputs import MediaInputLoader

    inputs = MediaInputLoader.from_settings(settings)
    images = inputs.load_images(request)
    loras = inputs.load_loras(request)

    from qwenserve.cli.compose import engine_config
    from qwenserve.runtime import Engine

    # The same switches as a served engine (tiling, offload, fp8, ...); one model at a time.
    engine = Engine(engine_config(settings, resident_models=1))
    console.print(f"engine: {engine.describe()}")
    if engine.is_tiny:
        console.print(
            "[yellow]warning:[/yellow] tiny preset: random weights, the image is noise "
            "(use --weights hub or a weights folder for real images)"
        )
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{spec.slug}: loading", total=request.steps)

        def on_step(done: int, total: int) -> None:
            progress.update(
                task, description=f"{spec.slug}: denoising", completed=done, total=total
            )

        result = engine.generate(request, images=images, extra_loras=loras, on_step=on_step)
    data = encode_image(result.image, request.image_format, request.quality)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    console.print(
        f"wrote [bold]{out}[/bold]: {result.width}x{result.height} {request.image_format}, "
        f"{len(data)} bytes, seed {result.seed}, "
        f"{result.inference_time_s:.2f}s inference ({time.perf_counter() - started:.2f}s total)"
    )
    return 0
